"""How much of a target a zoo can support: split-half reliability of its measurement.

A property measured on a finite evaluation set (test accuracy on 2,000 images, disparity from ~200 images per
class, PGD accuracy on 128 images) is the network's true value plus sampling noise. The zoo records every property
also on two disjoint halves of its evaluation images (``wa.zoo.properties``, ``<column>_half_a`` / ``_half_b``).
Across networks, the correlation r of the two halves is the reliability of a half-size measurement; the
Spearman–Brown formula (Spearman 1910; Brown 1910) gives that of the full one, ρ = 2r / (1 + r): the share of the
recorded target's variance across networks that is not measurement noise.

Ceilings a learner cannot pass (in expectation) on that target, even knowing each network's true value:

- R² ceiling = ρ (the noise variance, 1 − ρ of the total, is unpredictable from the weights);
- Kendall τ ceiling = (2/π)·arcsin(√ρ): τ of the recorded value with the true value when both are jointly
  Gaussian (Greiner's relation τ = (2/π)·arcsin(r), with corr(recorded, true) = √ρ).

A training setting (train fraction, label noise, ...) is known exactly: its ceiling is 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

HALF_SUFFIXES = ("_half_a", "_half_b")


def split_half(a, b) -> dict:
    """Reliability of a measurement whose two half-size versions across networks are ``a`` and ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"n": int(len(a)), "half_r": float("nan"), "reliability": float("nan"), "r2_ceiling": float("nan"),
                "tau_ceiling": float("nan")}
    r = float(np.corrcoef(a, b)[0, 1])
    rho = max(2 * r / (1 + r), 0.0) if r > -1 else 0.0
    return {"n": int(len(a)), "half_r": r, "reliability": rho, "r2_ceiling": rho,
            "tau_ceiling": float(2 / np.pi * np.arcsin(np.sqrt(rho)))}


def has_halves(rows: pd.DataFrame, column: str) -> bool:
    return all(column + s in rows for s in HALF_SUFFIXES)


def of_column(rows: pd.DataFrame, column: str) -> dict | None:
    """Split-half reliability of ``column`` over these rows; None where the zoo did not record halves."""
    if not has_halves(rows, column):
        return None
    return split_half(rows[column + HALF_SUFFIXES[0]], rows[column + HALF_SUFFIXES[1]])


def ceilings(rows: pd.DataFrame, tasks: dict) -> dict[str, dict]:
    """Per task (``wa.learners.data.TASKS`` entries): its label ceiling on these rows. A class task read from a
    training setting is exact; a measured one has its column's split-half figures, or ``{"measured": False}``
    where the zoo holds no halves (an imported zoo, or one built before halves were recorded)."""
    out = {}
    for name, task in tasks.items():
        if task.kind == "class":
            out[name] = {"exact": True, "why": "a training setting or architecture, known exactly"}
            continue
        r = of_column(rows, task.column)
        out[name] = ({"measured": False, "why": f"the zoo recorded no split halves of {task.column}"} if r is None
                     else {"measured": True, "column": task.column, **r})
    return out


def describe(c: dict | None, metric: str) -> str:
    """Short text of one task's ceiling for ``metric`` ("r2", "kendall_tau", or a classification metric)."""
    if not c:
        return "—"
    if c.get("exact"):
        return "exact"
    if not c.get("measured"):
        return "n/a"
    key = {"r2": "r2_ceiling", "kendall_tau": "tau_ceiling"}.get(metric)
    if key is None:   # a class task cut from a measured number: the reliability of that number
        return "nan" if not np.isfinite(c["reliability"]) else f"ρ {c['reliability']:.3f} ({c['column']})"
    v = c[key]
    return "nan" if not np.isfinite(v) else f"{v:.3f}"
