"""Data-free spectral metrics per layer, as WeightWatcher computes them (Martin & Mahoney 2021, "Predicting
trends in the quality of state-of-the-art neural networks without access to training or testing data", Nature
Communications 12:4122; the ``weightwatcher`` package, version 0.7.7, ``analyze()`` with its defaults;
``experiments/spectral_crosscheck.py`` compares the two on the same matrices).

A layer's empirical spectral density (ESD) is the set of eigenvalues λ of WᵀW, i.e. its squared singular values,
with no 1/N normalisation. A dense kernel is one matrix; a k×k convolution kernel [k, k, in, out] is k·k matrices
[in, out], one per tap, whose eigenvalues are pooled into one ESD after each tap is scaled by 1/√2 (the package's
``conv2d_norm``, on by default: it halves a convolution's eigenvalues and leaves α alone).

Per layer:

- ``alpha``: exponent of a power law p(λ) ∝ λ^(−α) fitted to the tail of the nonzero eigenvalues (> 1e-5): for
  every candidate x_min among the sorted eigenvalues (all but the largest), the continuous maximum-likelihood
  α = 1 + n / Σ ln(λ_i / x_min) over the n eigenvalues ≥ x_min, and the Kolmogorov–Smirnov distance of that
  fit to the tail's empirical distribution; the candidate with the smallest distance wins (Clauset, Shalizi &
  Newman 2009, as the package's own fitter does). Below ``SMALL_N`` nonzero eigenvalues the package (and wa)
  fits only tails of at least ``SMALL_N_TAIL`` eigenvalues with the bias-corrected α = 1 + (n − 1) / Σ ln(λ_i /
  x_min). NaN where the ESD holds fewer than ``MIN_EVALS`` eigenvalues (the package skips such layers).
- ``alpha_weighted`` = α · log10 λ_max (the paper's α̂);
- ``stable_rank`` = Σλ / λ_max;
- ``log_spectral_norm`` = log10 λ_max (λ_max = σ_max²);
- ``log_norm`` = log10 Σλ (the squared Frobenius norm).

Vectors (LayerNorm scales) have no spectrum: their features are NaN.
"""

from __future__ import annotations

import numpy as np

FEATURES = ("alpha", "alpha_weighted", "stable_rank", "log_spectral_norm", "log_norm")
MIN_EVALS = 8         # the package's default min_evals (0.7.7; 10 in earlier releases): smaller ESDs are not fitted
EVALS_THRESH = 1e-5   # eigenvalues at or below this are left out of the fit (numerically zero)
CONV_SCALE = 0.5      # conv2d_norm: each tap's matrix times 1/√2, so its eigenvalues times 1/2
SMALL_N = 20          # fewer nonzero eigenvalues than this: the small-sample fit
SMALL_N_TAIL = 8      # its shortest tail


def matrices(kernel) -> tuple[list[np.ndarray], float]:
    """The 2-D matrices whose eigenvalues form a layer's ESD, and the factor its eigenvalues are scaled by."""
    w = np.asarray(kernel, np.float64)
    if w.ndim == 4:          # [k, k, in, out]
        return [w[i, j] for i in range(w.shape[0]) for j in range(w.shape[1])], CONV_SCALE
    if w.ndim == 3 and w.shape[0] == 1:   # a [1, T, d] table (the patch transformer's positions)
        return [w[0]], 1.0
    if w.ndim == 2:
        return [w], 1.0
    return [], 1.0


def esd(kernel) -> np.ndarray:
    """Sorted eigenvalues of WᵀW over the layer's matrices (empty for a vector)."""
    mats, scale = matrices(kernel)
    if not mats:
        return np.zeros(0)
    sv = np.concatenate([np.linalg.svd(m, compute_uv=False) for m in mats])
    return np.sort(sv * sv * scale)


def fit_alpha(evals: np.ndarray) -> dict:
    """Power-law tail fit of an ESD: {"alpha", "xmin", "D", "n_tail"} (alpha NaN when it cannot be fitted)."""
    x = np.sort(np.asarray(evals, np.float64))
    x = x[x > EVALS_THRESH]
    nan = {"alpha": float("nan"), "xmin": float("nan"), "D": float("nan"), "n_tail": 0}
    if len(x) < 2:
        return nan
    logx = np.log(x)
    tail_log_sum = np.cumsum(logx[::-1])[::-1]     # Σ_{j >= i} ln x_j
    small = len(x) < SMALL_N
    best = (np.inf, None)
    for i in range(len(x) - 1):
        n = len(x) - i
        denom = tail_log_sum[i] - n * logx[i]
        if denom <= (1e-12 if small else 0) or (small and n < SMALL_N_TAIL):
            continue
        a = 1.0 + (n - 1 if small else n) / denom
        if a <= 1.0:
            continue
        cdf = 1.0 - np.exp((1.0 - a) * (logx[i:] - logx[i]))
        d = float(np.max(np.abs(cdf - np.arange(n) / n)))
        if d < best[0]:
            best = (d, (a, x[i], n))
    if best[1] is None:
        return nan
    a, xmin, n = best[1]
    return {"alpha": float(a), "xmin": float(xmin), "D": best[0], "n_tail": int(n)}


def layer(kernel) -> dict:
    """The five metrics of one layer's kernel (NaN for a vector; alpha NaN below ``MIN_EVALS`` eigenvalues)."""
    return from_esd(esd(kernel))


def from_esd(ev: np.ndarray) -> dict:
    """``layer``'s metrics from a sorted ESD (eigenvalues of WᵀW, ascending)."""
    ev = np.asarray(ev, np.float64)
    if ev.size == 0 or ev[-1] <= 0:
        return {f: float("nan") for f in FEATURES}
    lmax, total = float(ev[-1]), float(ev.sum())
    a = fit_alpha(ev)["alpha"] if ev.size >= MIN_EVALS else float("nan")
    return {"alpha": a, "alpha_weighted": float(a * np.log10(lmax)), "stable_rank": total / lmax,
            "log_spectral_norm": float(np.log10(lmax)), "log_norm": float(np.log10(total))}


def features(params: dict, family: str, n_layers: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(vector, names) of every layer's metrics in forward order, padded (NaN) to ``n_layers`` with the head last,
    in the same layer slots as ``wa.weights.stats.features``."""
    from wa.weights import stats as stats_lib  # here, so that the metrics above need numpy alone

    vec, names = [], []
    for tag, t in stats_lib.slots(params, family, n_layers):
        m = layer(t[1]) if t is not None else {f: float("nan") for f in FEATURES}
        vec += [m[f] for f in FEATURES]
        names += [f"{tag}/spectral/{f}" for f in FEATURES]
    return np.asarray(vec, np.float32), names


def matrix(params: list, families, n_layers: int | None = None) -> tuple[np.ndarray, int]:
    """``features`` of many networks as one [networks, F] matrix (NaN where a metric is undefined)."""
    from wa.weights import stats as stats_lib

    n = n_layers or max(stats_lib.n_layers(p, f) for p, f in zip(params, families, strict=True))
    return np.stack([features(p, f, n)[0] for p, f in zip(params, families, strict=True)]), n
