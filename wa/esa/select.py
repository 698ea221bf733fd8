"""Choosing weights by score: top-k, bottom-k and random-k, per layer or global; set statistics.

A selection is ``{parameter path: int64 flat indices}``, best first. Ranking is by score,
descending (by ``|score|`` for signed scores such as the Hessian diagonal), ties broken toward
the lower flat index (``jax.lax.top_k``'s rule), and in ``global`` mode toward the tensor that
comes first in path order. ``per_layer`` selection runs per tensor on device (``jax.lax.top_k``) and
only the k winners come to the host. ``global`` selection on an accelerator finds the model-wide threshold on
device (a bisection over the float32 keys' bit patterns: 32 counting passes, each a reduction over the sharded
scores) and brings only the k winners to the host (``device_global_top_k``), so a whole model's scores never
cross to the host; on CPU, where device memory is host memory, one partition of the scores' concatenation is
faster (``host_global_top_k``: 0.61 s against 3.6 s for SmolLM2-135M's 106M scores on 2 cores,
``experiments/bench_host_steps.py``). Both pick the same weights. ``device_steps`` says which path runs (the
heavy-tail figures and the pruning masks follow it too).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import math
import os
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from wa import errors

DEFAULT_FILTER = r"kernel$"  # weight matrices: attention, MLP and head kernels; no embeddings, norms, biases


class SelectionError(errors.ConfigError):
    pass


def device_steps() -> bool:
    """Whether the steps that read a whole model's scores run where the scores live (on an accelerator) rather
    than on a host copy (on CPU, where device memory is host memory and a partition is faster). ``WA_DEVICE_STEPS``
    (1 or 0) overrides: tests run the accelerator's path on forced CPU devices."""
    env = os.environ.get("WA_DEVICE_STEPS")
    return env == "1" if env in ("0", "1") else jax.default_backend() != "cpu"


def filter_paths(paths, regex: str) -> list[str]:
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise SelectionError(f"param_filter {regex!r} is not a valid regex ({e})") from e
    kept = [p for p in paths if pat.search(p)]
    if not kept:
        raise SelectionError(f"param_filter {regex!r} matches no parameter; paths look like "
                             f"{list(paths)[:3]}")
    return kept


def resolve_k(topk, n: int) -> int:
    """``topk`` as a count (int >= 1, capped at ``n``) or a fraction in (0, 1)."""
    if isinstance(topk, bool) or not isinstance(topk, (int, float, np.integer, np.floating)):
        raise SelectionError(f"topk must be a positive count or a fraction in (0, 1), got {topk!r}")
    if topk <= 0:
        raise SelectionError(f"topk must be positive, got {topk}")
    if isinstance(topk, (float, np.floating)) and topk < 1:
        return max(1, math.ceil(topk * n))
    if isinstance(topk, (float, np.floating)) and topk != int(topk):
        raise SelectionError(f"topk={topk}: a count must be a whole number (fractions lie in (0, 1))")
    return min(int(topk), n)


def _topk_values(x, k):
    return jax.lax.top_k(x.reshape(-1), k)


_topk = jax.jit(_topk_values, static_argnums=1)


def _rank_key(score, signed: bool):
    s = jnp.abs(score) if signed else score
    return s.astype(jnp.float32)


def top_k(scores: dict, topk, mode: str = "per_layer", param_filter: str = DEFAULT_FILTER,
          signed: bool = False, largest: bool = True, on_device: bool | None = None) -> tuple[dict, dict]:
    """(selection, selected score values) for the highest (or lowest) scores. ``on_device``: the global
    threshold searched where the scores live (default: on an accelerator, not on CPU)."""
    if mode not in ("per_layer", "global"):
        raise SelectionError(f"mode must be 'per_layer' or 'global', got {mode!r}")
    paths = filter_paths(list(scores), param_filter)
    sizes = {p: int(np.prod(scores[p].shape)) for p in paths}
    if mode == "global":
        if on_device is None:
            on_device = device_steps()
        fn = device_global_top_k if on_device else host_global_top_k
        return fn(scores, paths, resolve_k(topk, sum(sizes.values())), signed, largest)
    sel, val = {}, {}
    for p in paths:
        k = min(resolve_k(topk, sizes[p]), sizes[p])
        key = _rank_key(scores[p], signed)
        vals, idx = jax.device_get(_topk(key if largest else -key, k))   # the k winners only
        sel[p] = np.asarray(idx, np.int64)
        val[p] = np.asarray(vals if largest else -vals, np.float64)
    return sel, val


def host_global_top_k(scores: dict, paths: list, k: int, signed: bool, largest: bool) -> tuple[dict, dict]:
    """Model-wide: the k best of all values at once (``lowest_masks`` of the keys on the host, negated for the
    largest; a per-tensor ``top_k`` with k in the hundreds of thousands took minutes per metric on a 135M model);
    ties at the threshold go to the earlier path, then the lower index; each tensor's picks best first."""
    keys = {p: np.asarray(_rank_key(scores[p], signed)).ravel() for p in paths}
    if largest:
        keys = {p: -v for p, v in keys.items()}
    sel, val = {}, {}
    for p, m in lowest_masks(keys, k):
        idx = np.flatnonzero(m)
        if len(idx):
            v = keys[p]
            idx = idx[np.lexsort((idx, v[idx]))].astype(np.int64)   # best first, ties to the lower index
            sel[p] = idx
            val[p] = (-v[idx] if largest else v[idx]).astype(np.float64)
    return sel, val


def _ordered(key):
    """float32 keys -> uint32 codes in the same order (IEEE-754: negative floats bit-flipped, positive ones with
    the sign bit set); -0.0 is made +0.0 first, so equal floats get equal codes (by a select: XLA folds
    ``x + 0.0`` to ``x``, which keeps -0.0)."""
    key = jnp.where(key == 0, jnp.float32(0.0), key)
    bits = jax.lax.bitcast_convert_type(key, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _key(score, signed: bool, negate: bool):
    """The float32 ranking key of a score inside a jitted reduction (fused there: no copy of the scores)."""
    k = _rank_key(score, signed)
    return -k if negate else k


@functools.partial(jax.jit, static_argnames=("signed", "negate"))
def _kth_code(scores: list, k, signed: bool = False, negate: bool = False):
    """The code of the k-th largest of all keys together (k >= 1, traced): the largest c with at least k codes
    >= c, built bit by bit from the top. Keys: the scores (|score| when ``signed``; negated with ``negate``, for
    the k-th lowest), formed inside, so no tensor of keys is made."""
    keys = [_key(x, signed, negate) for x in scores]

    def at_least_k(c):
        # Per-tensor counts fit int32; their total over an 8B model does not, so it saturates at k.
        acc = jnp.int32(0)
        for x in keys:
            n = jnp.sum(_ordered(x) >= c, dtype=jnp.int32)
            acc = jnp.where(n >= k - acc, k, acc + n)
        return acc >= k

    def step(i, prefix):
        cand = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(at_least_k(cand), cand, prefix)

    code = jax.lax.fori_loop(0, 32, step, jnp.uint32(0))
    above = jnp.stack([jnp.sum(_ordered(x) > code) for x in keys])
    equal = jnp.stack([jnp.sum(_ordered(x) == code) for x in keys])
    return code, above, equal


@functools.partial(jax.jit, static_argnames=("size", "signed", "negate"))
def _winners(score, code, take_equal, size: int, signed: bool = False, negate: bool = False):
    """Flat indices of the key's codes above ``code`` and of its first ``take_equal`` equal to it (lower index
    first), padded with -1 to ``size``; their keys."""
    key = _key(score, signed, negate)
    o = _ordered(key.ravel())
    eq = o == code
    keep = (o > code) | (eq & (jnp.cumsum(eq, dtype=jnp.int32) <= take_equal))
    idx = jnp.nonzero(keep, size=size, fill_value=-1)[0]
    return idx, key.ravel()[jnp.maximum(idx, 0)]


def device_global_top_k(scores: dict, paths: list, k: int, signed: bool, largest: bool) -> tuple[dict, dict]:
    """Model-wide: the k best of all values at once, found where the scores live (a sharded score stays sharded:
    the threshold search reduces over it in place, and only each tensor's winners, padded to a power of two,
    come to the host). Ties at the threshold go to the earlier path, then the lower index; each tensor's picks
    best first. (A per-tensor ``top_k`` with k in the hundreds of thousands took minutes per metric on a 135M
    model on CPU; a host partition copies every score to the host.)"""
    negate = not largest
    code, above, equal = jax.device_get(_kth_code([scores[p] for p in paths], k, signed, negate))
    above, equal = np.asarray(above, np.int64), np.asarray(equal, np.int64)
    ties = k - int(above.sum())
    sel, val = {}, {}
    for p, a, e in zip(paths, above, equal, strict=True):
        t = min(ties, int(e))
        ties -= t
        n = int(a) + t
        if not n:
            continue
        # A static length per power of two: one compile serves every tensor of a shape whose count rounds alike.
        idx, v = jax.device_get(_winners(scores[p], code, t, 1 << (n - 1).bit_length(), signed, negate))
        idx, v = np.asarray(idx[:n], np.int64), np.asarray(v[:n], np.float64)
        order = np.lexsort((idx, -v))      # best first, ties to the lower index
        sel[p] = idx[order]
        val[p] = (v if largest else -v)[order]
    return sel, val


def lowest_masks(values: dict, k: int):
    """Yields (path, flat boolean mask) of the ``k`` lowest of all of ``values`` together, path by path, by a
    partition at the threshold (no full sort); ties at the threshold go to the earlier path, then the lower
    index, so exactly k are taken."""
    yield from masks_at(values, *thresholds(values, [k])[0])


def thresholds(values: dict, ks) -> list[tuple]:
    """For each count k in ``ks``, the (cut, ties) ``masks_at`` takes the k lowest of all of ``values`` with: one
    partition of one concatenated copy serves every k."""
    ks = [int(k) for k in ks]
    live = sorted({k for k in ks if k > 0})
    if not live:
        return [(None, 0)] * len(ks)
    flat = np.concatenate([np.ravel(values[p]) for p in values])
    flat.partition([k - 1 for k in live])      # in place: the concatenation is already a copy
    out = {}
    for k in live:
        cut = flat[k - 1]
        # After the partition every value below the cut lies in flat[:k]; the rest of the k are ties.
        out[k] = (cut, k - int((flat[:k] < cut).sum()))
    return [out.get(k, (None, 0)) for k in ks]


def masks_at(values: dict, cut, ties: int):
    """Yields (path, flat boolean mask) of the values below ``cut`` and the first ``ties`` values equal to it (the
    earlier path, then the lower index); ``cut`` None: none."""
    for p in values:
        v = np.ravel(values[p])
        if cut is None:
            yield p, np.zeros(v.size, bool)
            continue
        m = v < cut
        if ties > 0:
            tied = np.flatnonzero(v == cut)[:ties]
            m[tied] = True
            ties -= len(tied)
        yield p, m


def random_k(scores: dict, topk, mode: str, param_filter: str, seed: int) -> dict:
    """A uniformly random selection of the sizes top-k would pick (per matrix, or k of all the matrices' weights
    together), drawn without replacement by numpy from ``seed`` and each path's name; indices ascending.

    Only the k indices are drawn (top-k of a uniform draw over every weight took 1-2 s per set on a 135M model)."""
    paths = filter_paths(list(scores), param_filter)
    sizes = [int(np.prod(scores[p].shape)) for p in paths]
    if mode == "global":
        picks = np.sort(np.random.default_rng([seed, 0]).choice(sum(sizes), resolve_k(topk, sum(sizes)),
                                                                   replace=False))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        return {p: (picks[a:b] - starts[i]).astype(np.int64) for i, p in enumerate(paths)
                if (a := np.searchsorted(picks, starts[i])) < (b := np.searchsorted(picks, starts[i + 1]))}
    if mode != "per_layer":
        raise SelectionError(f"mode must be 'per_layer' or 'global', got {mode!r}")
    return {p: np.sort(np.random.default_rng([seed, zlib.crc32(p.encode())]).choice(
        n, min(resolve_k(topk, n), n), replace=False)).astype(np.int64) for p, n in zip(paths, sizes, strict=True)}


def fingerprint(sel: dict) -> str:
    """A digest of the set ``sel`` picks (order within a tensor ignored): equal for equal sets."""
    h = hashlib.sha1()
    for p in sorted(sel):
        if len(sel[p]):
            h.update(p.encode() + b"\0" + np.sort(np.asarray(sel[p], np.int64)).tobytes())
    return h.hexdigest()


def size(sel: dict) -> int:
    return sum(len(v) for v in sel.values())


def as_set(sel: dict) -> set:
    return {(p, int(i)) for p, idx in sel.items() for i in idx}


def _common(a: dict, b: dict) -> int:
    """|A ∩ B|, tensor by tensor on the index arrays (a 135M-parameter model's top-0.2% is 212k weights: sets
    of Python tuples would take minutes per pair)."""
    return sum(len(np.intersect1d(a[p], b[p], assume_unique=True)) for p in a.keys() & b.keys())


def jaccard(a: dict, b: dict) -> float:
    inter = _common(a, b)
    union = size(a) + size(b) - inter
    return inter / union if union else 1.0


def overlap(a: dict, b: dict) -> float:
    """|A ∩ B| / min(|A|, |B|): the share of the smaller set the other one also picked."""
    na, nb = size(a), size(b)
    return _common(a, b) / min(na, nb) if na and nb else 1.0


def _sort(x: np.ndarray) -> None:
    """Sorts ``x`` in place: parts sorted in threads (numpy's sort releases the GIL), then one stable sort, which
    merges the sorted runs (on 2 cores 106M float32 took 4.3 s this way, 5.7 s in one sort)."""
    parts = min(len(os.sched_getaffinity(0)), 8) if len(x) >= 1 << 22 else 1
    if parts < 2:
        x.sort()
        return
    bounds = np.linspace(0, len(x), parts + 1).astype(int)
    with concurrent.futures.ThreadPoolExecutor(parts) as ex:
        list(ex.map(lambda i: x[bounds[i]:bounds[i + 1]].sort(), range(parts)))
    x.sort(kind="stable")


def heavy_tail(scores: dict, param_filter: str = DEFAULT_FILTER, signed: bool = False,
               on_device: bool | None = None) -> dict:
    """How concentrated the scores are, over every filtered weight (|score| for signed scores); with the
    histogram a report plots. ``on_device`` (default: on an accelerator, not on CPU): computed where the scores
    live by ``tally.heavy_tail`` (radix histograms; the Gini coefficient within its reported ``gini_error``);
    otherwise one host copy sorted (exact)."""
    from wa.esa import tally  # here: tally builds on this module
    if on_device is None:
        on_device = device_steps()
    if on_device:
        return tally.heavy_tail(scores, param_filter, signed)
    # One float32 copy sorted in place (the scores are float32 or narrower); sums in float64, in chunks, so a
    # 135M-parameter model needs no float64 copy of its scores.
    x = np.concatenate([np.asarray(_rank_key(scores[p], signed)).ravel()
                        for p in filter_paths(list(scores), param_filter)])
    _sort(x)                                   # ascending
    n = len(x)
    total = weighted = 0.0
    for i in range(0, n, 1 << 23):
        part = x[i:i + (1 << 23)].astype(np.float64)
        total += float(part.sum())
        # Σ_i (i + 1) x_(i) over the ascending order, for the Gini coefficient.
        weighted += float(part @ np.arange(i + 1, i + 1 + len(part), dtype=np.float64))
    top1 = x[n - max(1, n // 100):].astype(np.float64)
    top01 = x[n - max(1, n // 1000):].astype(np.float64)
    median = float(x[n // 2]) if n % 2 else float((np.float64(x[n // 2 - 1]) + x[n // 2]) / 2)
    # Gini of a non-negative sample from its ascending order: 2 Σ i x_(i) / (n Σ x) - (n + 1) / n.
    gini = float(2 * weighted / (n * total) - (n + 1) / n) if total > 0 else 0.0
    return {
        "n": n,
        "top1pct_mean_over_median": float(top1.mean() / median) if median > 0 else float("inf"),
        "gini": gini,
        "top01pct_share": float(top01.sum() / total) if total > 0 else 0.0,
        "median": median,
        "max": float(x[-1]),
        "gini_error": 0.0,
        "histogram": tally.host_plot(x),
    }


def counts(sel: dict, classify) -> dict:
    """Selected weights by layer, component and role (``classify(path) -> ParamInfo``); in an MoE model also by
    expert index ("-": outside the experts)."""
    out = {"layer": {}, "component": {}, "role": {}, "layer_component": {}}
    moe = any(classify(p).expert is not None for p in sel)
    if moe:
        out["expert"] = {}
    for p, idx in sel.items():
        info = classify(p)
        n = len(idx)
        layer = "-" if info.layer is None else str(info.layer)
        for k, v in (("layer", layer), ("component", info.component), ("role", info.role),
                     ("layer_component", f"{layer}/{info.component}")) + \
                (("expert", "-" if info.expert is None else str(info.expert)),) * moe:
            out[k][v] = out[k].get(v, 0) + n
    return out
