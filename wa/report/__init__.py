"""Run folders, JSON results and markdown reports."""

from __future__ import annotations

import datetime
import json
import os

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


def write_json(path: str, obj) -> None:
    """Writes atomically, so an interrupted run never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_default)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)
