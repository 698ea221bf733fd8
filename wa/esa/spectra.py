"""The data-free spectral view of every scored matrix beside its sensitivity.

Per matrix, WeightWatcher's metrics (``wa.weights.spectral``: power-law α of the eigenvalues of WᵀW, α̂ = α·log10
λ_max, stable rank, log10 λ_max; Martin & Mahoney 2021 read α < 2 as over-trained, 2-6 as well trained, > 6 as
under-trained) and each score's mean per weight relative to the mean over all scored weights; per layer the mean
metrics over its matrices and its relative mean score; and, over matrices, the Spearman correlation of each metric
with each score: does the weights' spectrum, read without data, say where the model is sensitive?
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sstats

from wa.esa import select, tally
from wa.weights import spectral

SHOWN = ("alpha", "alpha_weighted", "stable_rank", "log_spectral_norm")


def study(flat: dict, kept: list, describe, first: dict, signed: dict) -> dict:
    """``first``: metric -> {path: score array} (the first seed's); ``signed``: metric -> whether its scores are
    signed (compared by magnitude)."""
    size = {p: int(np.prod(flat[p].shape)) for p in kept}
    sums = {m: {p: tally.total(sc[p], signed[m]) for p in kept} for m, sc in first.items()}
    n = sum(size.values())
    mean = {m: sum(s.values()) / n if n else float("nan") for m, s in sums.items()}
    rows = []
    device = select.device_steps()   # on an accelerator the SVD runs where the weights live (float32)
    for p in kept:
        if len(flat[p].shape) != 2:
            continue
        info = describe(p)
        rows.append({"path": p, "layer": info.layer, "component": info.component, "role": info.role,
                     **(spectral.from_esd(_device_esd(flat[p])) if device else
                        spectral.layer(np.asarray(flat[p], np.float32))),
                     **{f"score/{m}": sums[m][p] / size[p] / mean[m] if mean[m] else float("nan") for m in first}})
    layers: dict = {}
    for r in rows:
        if r["layer"] is not None:
            layers.setdefault(int(r["layer"]), []).append(r)
    by_layer = {}
    for L in sorted(layers):
        rs = layers[L]
        by_layer[str(L)] = {f: _nanmean([r[f] for r in rs]) for f in SHOWN} | {
            f"score/{m}": _nanmean([r[f"score/{m}"] for r in rs]) for m in first}
    corr = {}
    for m in first:
        corr[m] = {}
        for f in SHOWN:
            x = np.array([r[f] for r in rows], np.float64)
            y = np.array([r[f"score/{m}"] for r in rows], np.float64)
            ok = np.isfinite(x) & np.isfinite(y)
            corr[m][f] = ({"spearman": float(sstats.spearmanr(x[ok], y[ok]).statistic), "matrices": int(ok.sum())}
                          if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0 else None)
    return {"matrices": rows, "by_layer": by_layer, "correlation": corr}


def _nanmean(xs) -> float:
    a = np.asarray(xs, np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


@jax.jit
def _singular_values(w):
    return jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)


def _device_esd(w) -> np.ndarray:
    """The ESD of a 2-D weight matrix from its singular values computed on device: only those reach the host."""
    sv = np.asarray(_singular_values(w), np.float64)
    return np.sort(sv * sv)
