"""Statistics for perturbation experiments (scipy.stats, not hand-written)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def mean_ci(x, confidence: float = 0.95, seed: int = 0, n_resamples: int = 9999) -> dict:
    """Mean with a percentile bootstrap CI; a single value has a zero-width interval.

    A sample holding +inf (a destroyed model) has mean +inf and CI [its smallest value, +inf].
    """
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    if not np.all(np.isfinite(x)):
        return {"mean": float(np.mean(x)), "ci95": [float(np.min(x)), float("inf")], "n": int(x.size)}
    if x.size == 1 or np.all(x == x[0]):
        return {"mean": float(x.mean()), "ci95": [float(x.mean())] * 2, "n": int(x.size)}
    r = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                        method="percentile", random_state=np.random.default_rng(seed))
    return {"mean": float(x.mean()), "ci95": [float(r.confidence_interval.low), float(r.confidence_interval.high)],
            "n": int(x.size)}


def greater(a, b) -> dict:
    """One-sided Mann–Whitney U test that ``a`` tends to exceed ``b`` (e.g. top-k vs random-k ΔPPL)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0 or b.size == 0:
        return {"p_value": float("nan"), "u": float("nan"), "n_a": int(a.size), "n_b": int(b.size)}
    r = stats.mannwhitneyu(a, b, alternative="greater", method="auto")
    return {"p_value": float(r.pvalue), "u": float(r.statistic), "n_a": int(a.size), "n_b": int(b.size)}


def monotone(xs, ys) -> dict:
    """Whether ys rises with xs (non-strictly), with Spearman's rho."""
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    order = np.argsort(xs)
    ys = ys[order]
    rho = float(stats.spearmanr(xs[order], ys).statistic) if len(xs) > 2 else float("nan")
    return {"monotone_increasing": bool(np.all(np.diff(ys) >= 0)), "spearman_rho": rho}
