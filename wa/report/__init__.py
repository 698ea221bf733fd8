"""Run folders, JSON results and markdown reports."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile

import numpy as np


def workdir(path: str | None, job: str) -> str:
    """``path`` or ``runs/<job>-<UTC time>``, created."""
    if not path:
        path = os.path.join("runs", f"{job}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}")
    os.makedirs(path, exist_ok=True)
    return path


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


@contextlib.contextmanager
def atomic(path: str):
    """Yields a temporary name beside ``path``, renamed onto it only when the block succeeds: readers see the
    old file or the whole new one, never half of one. The name is unique per writer, so two processes never
    write the same temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the user's group
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    """Writes atomically, so an interrupted run never leaves a half-written file."""
    text = json.dumps(obj, indent=2, default=_default) + "\n"  # serialise first: a bad value writes nothing
    write_text(path, text)


def write_text(path: str, text: str) -> None:
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def number(x, nd=3) -> str:
    """A figure for a table: – for None, scientific notation when very large or small, else nd decimals."""
    if x is None:
        return "–"
    if isinstance(x, float) and (abs(x) >= 1e4 or (abs(x) < 1e-3 and x != 0)):
        return f"{x:.2e}"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)
