"""Pruning saliencies: the estimated cost of removing (zeroing) a weight, built from ESA's scores.

A sensitivity (g², the Hessian diagonal) says how sharply the loss curves along a weight; the cost of zeroing
the weight also depends on how far zeroing moves it. With δw_i = -w_i, the Taylor expansion of the loss gives
the saliencies below; pruning removes the weights whose saliency is lowest.

- ``magnitude``    |w_i|: the baseline (magnitude pruning).
- ``taylor``       |g_i w_i|, first order (Molchanov et al. 2019), from ``grad_x_weight``.
- ``obd_fisher``   ½ F_ii w_i², second order with the Fisher diagonal standing in for the Hessian (Optimal Brain
                   Damage, LeCun et al. 1990), from ``grad_squared``.
- ``obd_hessian``  ½ |H_ii| w_i², Optimal Brain Damage with the Hutchinson estimate of the Hessian diagonal
                   (its absolute value: the estimate can be negative), from ``hutchinson_diag``.
- ``wanda``        |W_ij| ‖X_j‖₂ (Sun et al. 2023), from ``act_mag``.

Which weights compete (``MODES``): every weight of the model (``global``), of its matrix (``per_layer``), or of
its output row (``per_output``: the weights that feed one output unit, Wanda's comparison group, which its paper
shows is what makes the score work on LLMs). A sparsity is a fraction, or a semi-structured pattern ``N:M``: N of
every M consecutive weights along a row's inputs are removed (2:4 and 4:8 are what sparse tensor cores run; as
in SparseGPT and Wanda, N counts the zeros), whatever the mode. With OWL (``owl``) each layer gets its own
fraction, set by its share of outlier scores.

On an accelerator (``on_device``, default: not on CPU) saliencies, masks and pruned copies are made where the
weights and scores live (``device_masks``: a model-wide or per-matrix threshold by ``select``'s bisection over the
keys' bit patterns, each row's by a bisection along it, N:M groups by pairwise comparison) and pick the same weights
as the host path, whose partitions and row sorts copy every saliency to the host.

Adding a saliency is one ``Saliency`` record in ``SALIENCIES``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from wa.esa import select

MODES = ("per_layer", "global", "per_output")


@dataclasses.dataclass(frozen=True)
class Saliency:
    name: str
    metric: str                                          # the ESA score it is computed from
    formula: str
    source: str
    fn: Callable[[jax.Array, jax.Array], jax.Array]   # (score, weight) -> saliency, same shape (jnp: on device)


SALIENCIES = {s.name: s for s in (
    Saliency("magnitude", "magnitude", "|w|", "magnitude pruning", lambda s, w: jnp.abs(w)),
    Saliency("taylor", "grad_x_weight", "|g·w|", "Molchanov et al. 2019", lambda s, w: jnp.abs(s)),
    Saliency("obd_fisher", "grad_squared", "½·F·w²", "LeCun et al. 1990 (Fisher diagonal)",
             lambda s, w: 0.5 * jnp.abs(s) * jnp.square(w)),
    Saliency("obd_hessian", "hutchinson_diag", "½·|H|·w²", "LeCun et al. 1990 (Hutchinson diagonal)",
             lambda s, w: 0.5 * jnp.abs(s) * jnp.square(w)),
    Saliency("wanda", "act_mag", "|w|·‖x‖₂", "Sun et al. 2023", lambda s, w: jnp.abs(s)),
)}


def _default_device(on_device: bool | None) -> bool:
    return select.device_steps() if on_device is None else on_device


def available(metrics) -> list[str]:
    """The saliencies whose score is among ``metrics``, in registry order."""
    return [n for n, s in SALIENCIES.items() if s.metric in metrics]


@functools.partial(jax.jit, static_argnums=0)
def _saliency(name: str, score, weight):
    return SALIENCIES[name].fn(score.astype(jnp.float32), weight.astype(jnp.float32))


def compute(name: str, scores: dict, weights: dict, on_device: bool | None = None) -> dict:
    """{path: float32 saliency} over the paths ``scores`` covers: computed where the scores live, kept there
    ``on_device`` (default: on an accelerator), else as numpy."""
    out = {p: _saliency(name, jnp.asarray(v), jnp.asarray(weights[p])) for p, v in scores.items()}
    return out if _default_device(on_device) else {p: np.asarray(v, np.float32) for p, v in out.items()}


def pattern(spec) -> float | tuple[int, int]:
    """A sparsity: a fraction in (0, 1) (``0.5``), or ``"N:M"`` (N of every M consecutive weights removed)."""
    if isinstance(spec, tuple):
        n, m = spec
    elif isinstance(spec, str) and ":" in spec:
        try:
            n, m = (int(x) for x in spec.split(":"))
        except ValueError:
            raise ValueError(f"sparsity {spec!r}: expected a fraction or N:M with integers, e.g. 2:4") from None
    else:
        f = float(spec)
        if not 0 < f < 1:
            raise ValueError(f"sparsity {spec!r}: a fraction must lie in (0, 1)")
        return f
    if not 0 < n < m:
        raise ValueError(f"sparsity {n}:{m}: N:M needs 0 < N < M (N of every M weights removed)")
    return (n, m)


def label(spec) -> str:
    """How a sparsity is written in tables and json keys: ``0.5``, ``2:4``."""
    p = pattern(spec)
    return f"{p[0]}:{p[1]}" if isinstance(p, tuple) else str(p)


def rows(x: np.ndarray, input_axis: int = 0) -> np.ndarray:
    """``x`` as [outputs, inputs]: one row per output unit, its inputs along the row (a view where it can be)."""
    x = np.asarray(x)
    if x.ndim < 2:
        return x.reshape(1, -1)
    return np.moveaxis(x, input_axis, -1).reshape(-1, x.shape[input_axis])


def unrows(r: np.ndarray, shape, input_axis: int = 0) -> np.ndarray:
    """The inverse of ``rows``: back to ``shape``."""
    if len(shape) < 2:
        return r.reshape(shape)
    moved = [s for i, s in enumerate(shape) if i != input_axis] + [shape[input_axis]]
    return np.moveaxis(r.reshape(moved), -1, input_axis)


def row_mask(sal_rows: np.ndarray, spec, chunk: int = 1024) -> np.ndarray:
    """Boolean [outputs, inputs] mask of the weights removed within each row: the round(f · inputs) lowest, or
    for N:M the N lowest of every M consecutive inputs. Ties go to the lower input index (a stable sort)."""
    p = pattern(spec)
    r, c = sal_rows.shape
    out = np.zeros((r, c), bool)
    if isinstance(p, tuple):
        n, m = p
        if c % m:
            raise ValueError(f"N:M sparsity {n}:{m} needs each row's input count to be a multiple of {m}; a "
                             f"matrix has {c} inputs")
        for a in range(0, r, chunk):   # row chunks keep the sort's index arrays small on large matrices
            g = sal_rows[a:a + chunk].reshape(-1, c // m, m)
            order = np.argsort(g, axis=-1, kind="stable")[..., :n]
            blk = np.zeros(g.shape, bool)
            np.put_along_axis(blk, order, True, axis=-1)
            out[a:a + chunk] = blk.reshape(-1, c)
        return out
    k = int(round(p * c))
    if k == 0:
        return out
    for a in range(0, r, chunk):
        order = np.argsort(sal_rows[a:a + chunk], axis=-1, kind="stable")[:, :k]
        np.put_along_axis(out[a:a + chunk], order, True, axis=-1)
    return out


def lowest(saliency: dict, fraction, mode: str, input_axes: dict | None = None) -> dict:
    """{path: flat indices} of the weights with the lowest saliency: ``fraction`` of each matrix (``per_layer``),
    of the model (``global``) or of each output row (``per_output``), or N:M along each row.

    Exactly round(fraction · n) weights per group; ties at the threshold go to the earlier path and index, so the
    choice is deterministic."""
    return {p: np.flatnonzero(m) for p, m in masks(saliency, fraction, mode, input_axes=input_axes)}


def prune(weights: dict, saliency: dict, fraction, mode: str, plan=None, input_axes: dict | None = None,
          on_device: bool | None = None):
    """Yields (path, the weight with its ``lowest`` weights zeroed), one tensor at a time: a pruned copy built
    from a boolean mask, without index arrays (at 70% of a 135M-parameter model they would take 600 MB).
    ``plan``: ``plans(saliency, fractions, mode)[fraction]``, when several fractions share one partition (host).
    ``input_axes``: {path: the axis of the kernel that multiplies its input} (0 where absent: Flax's [in, out]).
    ``on_device`` (default: on an accelerator): masks and copies made where the weights live (``device_masks``)."""
    if _default_device(on_device):
        for p, m in device_masks(saliency, fraction, mode, input_axes):
            yield p, _zeroed(jnp.asarray(weights[p]), m)
        return
    for p, m in masks(saliency, fraction, mode, plan, input_axes):
        w = np.asarray(weights[p])
        yield p, np.where(m.reshape(w.shape), np.zeros((), w.dtype), w)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def plans(saliency: dict, fractions, mode: str) -> dict:
    """{fraction: [(paths, cut, ties)]}: where ``masks`` cuts each group of paths (each matrix alone per layer,
    all together model-wide), from one partition per group for every fraction. Row-wise groups (``per_output``,
    N:M) need no shared partition: their entry is None."""
    _check_mode(mode)
    specs = [pattern(f) for f in fractions]
    out = {f: None for f in fractions}
    cut_at = [f for f, s in zip(fractions, specs, strict=True) if not isinstance(s, tuple)] \
        if mode != "per_output" else []
    if not cut_at:
        return out
    groups = [[p] for p in saliency] if mode == "per_layer" else [list(saliency)]
    for f in cut_at:
        out[f] = []
    for g in groups:
        n = sum(np.size(saliency[p]) for p in g)
        cuts = select.thresholds({p: saliency[p] for p in g}, [int(round(float(f) * n)) for f in cut_at])
        for f, (cut, ties) in zip(cut_at, cuts, strict=True):
            out[f].append((g, cut, ties))
    return out


OWL_M = 5.0       # an outlier: a score above M times its layer's mean (Yin et al. 2024's default for LLaMA)
OWL_LAMBDA = 0.08  # the layers' sparsities span at most ±λ around the target (their default)


def owl(scores: dict, layer_of: dict, fraction: float, m: float = OWL_M, lam: float = OWL_LAMBDA) -> dict:
    """Outlier-weighted layerwise sparsity (OWL, Yin et al. 2024): {path: its layer's sparsity}. A layer's share
    of outlier scores (|score| > m × the layer's mean, over all its matrices) sets how much of it is kept: the
    shares are scaled to [0, 2λ] and centred on 1 − ``fraction``, so layers with more outliers are pruned less
    and the mean over layers is ``fraction``. Paths outside any layer (``layer_of`` None) keep ``fraction``.
    ``scores`` are Wanda's |W|·‖X‖ in the paper."""
    from wa.esa import tally
    layers = sorted({v for v in layer_of.values() if v is not None})
    share = []
    for layer in layers:   # reduced where the scores live: a sum and a count per matrix
        ps = [p for p, at in layer_of.items() if at == layer]
        n = sum(int(np.prod(scores[p].shape)) for p in ps)
        cut = m * sum(tally.total(scores[p], signed=True) for p in ps) / n
        share.append(sum(int(_count_above(jnp.asarray(scores[p]), cut)) for p in ps) / n)
    share = np.asarray(share)
    spread = share.max() - share.min() if len(share) else 0.0
    scaled = (share - share.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(share)
    keep = scaled - scaled.mean() + (1 - fraction)
    per_layer = {layer: float(np.clip(1 - k, 0.0, 1.0)) for layer, k in zip(layers, keep, strict=True)}
    return {p: fraction if at is None else per_layer[at] for p, at in layer_of.items()}


@jax.jit
def _count_above(v, cut):
    return jnp.sum(jnp.abs(v) > cut, dtype=jnp.int32)


def _per_path(saliency: dict, fraction, mode: str):
    """(each path's own sparsity, or None where one threshold cuts a group of paths; the pattern)."""
    _check_mode(mode)
    own = isinstance(fraction, dict)
    if own and mode == "global":
        raise ValueError("a sparsity per matrix (OWL) needs per_layer or per_output, not one global threshold")
    spec = None if own else pattern(fraction)
    if own or isinstance(spec, tuple) or mode == "per_output":
        return {p: fraction[p] if own else spec for p in saliency}, spec
    return None, spec


def masks(saliency: dict, fraction, mode: str, plan=None, input_axes: dict | None = None):
    """Yields (path, flat boolean mask of the weights ``lowest`` picks), path by path. ``fraction`` may be a dict
    {path: fraction} (OWL's layer sparsities): each matrix, or each of its rows, takes its own."""
    per_path, spec = _per_path(saliency, fraction, mode)
    if per_path is not None:
        for p, v in saliency.items():
            v = np.asarray(v)
            f = per_path[p]
            if not isinstance(f, tuple) and f <= 0:
                yield p, np.zeros(v.size, bool)
            elif mode == "per_output" or isinstance(f, tuple):
                axis = (input_axes or {}).get(p, 0)
                yield p, unrows(row_mask(rows(v, axis), f), v.shape, axis).ravel()
            else:   # per_layer at this matrix's own fraction
                cut, ties = select.thresholds({p: v}, [int(round(f * v.size))])[0]
                yield from select.masks_at({p: v}, cut, ties)
        return
    for g, cut, ties in plan if plan is not None else plans(saliency, [fraction], mode)[fraction]:
        yield from select.masks_at({p: saliency[p] for p in g}, cut, ties)


@jax.jit
def _zeroed(w, mask):
    return jnp.where(mask, jnp.zeros((), w.dtype), w)


def _largest_at_least(keys, k, bits: int):
    """Per row (last axis), the largest c (``bits`` wide) with at least ``k`` of the row's keys >= c: built bit by
    bit from the top, each step a count along the row (an all-reduce where the row is sharded, no sort)."""
    def step(i, prefix):
        cand = prefix | (jnp.ones((), keys.dtype) << (bits - 1 - i).astype(keys.dtype))
        ok = jnp.sum(keys >= cand[..., None], axis=-1, dtype=jnp.int32) >= k
        return jnp.where(ok, cand, prefix)
    return jax.lax.fori_loop(0, bits, step, jnp.zeros(keys.shape[:-1], keys.dtype))


@functools.partial(jax.jit, static_argnames=("k", "nm", "axis"))
def _row_mask(v, k: int, nm, axis: int):
    """``row_mask`` where ``v`` lives, shaped like ``v``. A row's k lowest by a bisection over their codes, ties to
    the lower input index by a second one over the tied indices; N:M by comparing each group's M entries pairwise.
    Neither sorts along the input axis (a sharded one would be exchanged all-to-all first)."""
    r = jnp.moveaxis(v, axis, -1).astype(jnp.float32)
    cols = r.shape[-1]
    if nm is not None:
        n, m = nm
        g = r.reshape(*r.shape[:-1], cols // m, m)
        a, b = g[..., :, None], g[..., None, :]
        i = jnp.arange(m)
        # An entry's rank in its group: the entries below it, and the equal ones before it (a stable sort's order).
        rank = jnp.sum((b < a) | ((b == a) & (i[None, :] < i[:, None])), axis=-1)
        return jnp.moveaxis((rank < n).reshape(r.shape), -1, axis)
    o = ~select._ordered(r)                      # larger code: lower value
    code = _largest_at_least(o, k, 32)           # the k-th lowest value's code, per row
    below, eq = o > code[..., None], o == code[..., None]
    t = k - jnp.sum(below, axis=-1, dtype=jnp.int32)   # how many of the ties each row still takes (>= 1)
    rev = jnp.where(eq, cols - 1 - jnp.arange(cols, dtype=jnp.int32), -1)
    cut = _largest_at_least(rev, t, max(cols - 1, 1).bit_length())
    return jnp.moveaxis(below | (eq & (rev >= cut[..., None])), -1, axis)


@jax.jit
def _below(v, code):
    """Entries whose order code is below the cut's (strictly lower values: ``select._ordered`` of -v above)."""
    return select._ordered(-v.astype(jnp.float32)) > code


@jax.jit
def _at_or_below(v, code):
    return select._ordered(-v.astype(jnp.float32)) >= code


@functools.partial(jax.jit, static_argnames="take")
def _below_and_ties(v, code, take: int):
    """As ``_below``, plus the first ``take`` entries equal to the cut in flat order (flattened here: only when a
    tie is split, which float saliencies rarely do)."""
    o = select._ordered(-v.astype(jnp.float32))
    eq = (o == code).reshape(-1)
    first = (eq & (jnp.cumsum(eq, dtype=jnp.int32) <= take)).reshape(v.shape)
    return (o > code) | first


def _lowest_where(values: dict, k: int):
    """Yields (path, mask) of the ``k`` lowest of all of ``values`` together, found where they live: the cut by
    ``select._kth_code`` over the negated keys, ties to the earlier path, then the lower flat index."""
    paths = list(values)
    if k <= 0:
        for p in paths:
            yield p, jnp.zeros(values[p].shape, bool)
        return
    code, above, equal = jax.device_get(select._kth_code([values[p] for p in paths], k, False, True))
    ties = k - int(np.asarray(above, np.int64).sum())
    for p, e in zip(paths, np.asarray(equal, np.int64), strict=True):
        t = min(ties, int(e))
        ties -= t
        v = values[p]
        if t == 0:
            yield p, _below(v, code)
        elif t == e:
            yield p, _at_or_below(v, code)
        else:
            yield p, _below_and_ties(v, code, t)


def device_masks(saliency: dict, fraction, mode: str, input_axes: dict | None = None):
    """``masks`` where the saliencies live: yields (path, boolean mask shaped like the tensor) of the same weights,
    no saliency copied to the host (only each threshold search's per-matrix counts)."""
    per_path, spec = _per_path(saliency, fraction, mode)
    if per_path is not None:
        for p, v in saliency.items():
            f = per_path[p]
            shape = tuple(v.shape)
            if not isinstance(f, tuple) and f <= 0:
                yield p, jnp.zeros(shape, bool)
            elif mode == "per_output" or isinstance(f, tuple):
                axis = (input_axes or {}).get(p, 0) if len(shape) > 1 else 0
                if isinstance(f, tuple) and shape[axis] % f[1]:
                    raise ValueError(f"N:M sparsity {f[0]}:{f[1]} needs each row's input count to be a multiple "
                                     f"of {f[1]}; a matrix has {shape[axis]} inputs")
                nm = f if isinstance(f, tuple) else None
                k = 0 if nm else int(round(f * shape[axis]))
                if not nm and k == 0:
                    yield p, jnp.zeros(shape, bool)
                    continue
                yield p, _row_mask(jnp.asarray(v), k, nm, axis % max(len(shape), 1))
            else:
                yield from _lowest_where({p: v}, int(round(f * int(np.prod(shape)))))
        return
    groups = [[p] for p in saliency] if mode == "per_layer" else [list(saliency)]
    for g in groups:
        n = sum(int(np.prod(saliency[p].shape)) for p in g)
        yield from _lowest_where({p: saliency[p] for p in g}, int(round(float(spec) * n)))
