"""Whole-model figures of score tensors computed where the scores live: an accelerator's scores never cross to
the host whole, only histograms of a fixed size.

One pass builds a radix histogram of the float32 keys: the top 20 bits of their order-preserving codes pick one of
2^20 bins (a normal float's bin spans 2^-11 of its value); per bin the count, the sum of (value - the bin's lowest
value), the smallest and the largest value. A second pass makes any order statistic exact: a histogram of the
low 12 bits inside the bin that holds it, where every code is one value. From these come the median, the sums of
the top 1% and 0.1%, the maximum and the histogram a report plots, all as a sort would give them (sums in float32
on device, float64 on the host).

The Gini coefficient needs every weight's rank (Σ_i i x_(i) over the ascending order). Ranks across bins are
exact; inside a bin the order is unknown, so the bin's share is taken midway between its bounds
(``S_b (c_b + 1) / 2`` and that plus ``(hi_b - lo_b) c_b^2 / 8``) and the worst case is reported as
``gini_error`` (≤ Σ_b (hi_b - lo_b) c_b^2 / (8 n S)): 5.7e-9 for random half-normal scores of SmolLM2-135M's
matrix shapes (``experiments/bench_host_steps.py``).

Each local shard is counted on its own device into that device's histogram (replicas skipped): a histogram needs
no order, so no collective runs. Counts are int32 on device and are brought to the host (int64) before 2^31 keys
have been added; hosts' histograms are summed across processes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wa.esa import select

BITS = 20
LOW = 32 - BITS
BINS = 1 << BITS
SUB = 1 << LOW
PLOT_BINS = 80
_LIMIT = 2 ** 31 - 1


def decode(codes) -> np.ndarray:
    """uint32 order codes -> their float32 values (the inverse of ``select._ordered``)."""
    c = np.asarray(codes, np.uint32)
    bits = np.where(c >> 31 == 1, c & np.uint32(0x7FFFFFFF), ~c).astype(np.uint32)
    return bits.view(np.float32)


def _floor(code):
    """The value of the lowest code in ``code``'s bin (device)."""
    c = code & jnp.uint32(~(SUB - 1) & 0xFFFFFFFF)
    bits = jnp.where(c >> 31 == 1, c & jnp.uint32(0x7FFFFFFF), ~c)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@functools.partial(jax.jit, static_argnames="signed")
def _first_pass(xs: list, signed: bool = False):
    """One device's shards: per bin the count, Σ (key - bin floor), min and max; the non-positive count and the
    smallest positive key. The accumulators live inside the program (updated in place, never copied per tensor)."""
    cnt, res = jnp.zeros(BINS, jnp.int32), jnp.zeros(BINS, jnp.float32)
    lo, hi = jnp.full(BINS, jnp.inf, jnp.float32), jnp.full(BINS, -jnp.inf, jnp.float32)
    nonpos, pos_min = jnp.int32(0), jnp.float32(jnp.inf)
    for x in xs:
        x = select._rank_key(x, signed)   # not raveled: keys formed here, no copy
        o = select._ordered(x)
        b = (o >> LOW).astype(jnp.int32)
        cnt, res = cnt.at[b].add(1), res.at[b].add(x - _floor(o))
        lo, hi = lo.at[b].min(x), hi.at[b].max(x)
        nonpos = nonpos + jnp.sum(x <= 0, dtype=jnp.int32)
        pos_min = jnp.minimum(pos_min, jnp.min(jnp.where(x > 0, x, jnp.inf)))
    return cnt, res, lo, hi, nonpos, pos_min


@functools.partial(jax.jit, static_argnames="signed")
def _second_pass(xs: list, targets, edges, signed: bool = False):
    """One device's shards: per target bin, the counts of its 2^12 codes; and the counts of the positive keys
    between plot edges."""
    sub = jnp.zeros((targets.shape[0], SUB), jnp.int32)
    plot = jnp.zeros(edges.shape[0] + 1, jnp.int32)
    for x in xs:
        x = select._rank_key(x, signed)
        o = select._ordered(x)
        b = (o >> LOW).astype(jnp.int32)
        low = (o & jnp.uint32(SUB - 1)).astype(jnp.int32)
        for j in range(targets.shape[0]):
            sub = sub.at[j, jnp.where(b == targets[j], low, SUB)].add(1, mode="drop")
        at = jnp.where(x > 0, jnp.searchsorted(edges, x, side="right"), edges.shape[0] + 1)
        plot = plot.at[at].add(1, mode="drop")
    return sub, plot


def _passes(scores: list, signed: bool, step, flush, *args):
    """Runs ``step`` on every device over its local shards of the score tensors (one copy of each entry: replicas
    skipped), in groups of fewer than 2^31 entries so its int32 counts cannot overflow; ``flush`` brings each
    group's histograms home. A histogram needs no order, so shards need no collective: a sharded histogram left to
    XLA would all-reduce its 2^20 bins for every tensor (and on forced CPU devices those collectives can starve)."""
    groups: dict = {}   # device -> [[shards], entries]
    for x in scores:
        x = x if isinstance(x, jax.Array) else jnp.asarray(x)
        for shard in x.addressable_shards:
            if shard.replica_id:
                continue
            n = int(np.prod(shard.data.shape))
            g = groups.setdefault(shard.device, [[[], 0]])
            if g[-1][1] + n > _LIMIT and g[-1][0]:
                g.append([[], 0])
            g[-1][0].append(shard.data)
            g[-1][1] += n
    for g in groups.values():
        for shards, _ in g:
            flush(step(shards, *args, signed=signed))


class Histogram:
    """The radix histogram of a set of score tensors' float32 keys (|score| when ``signed``; host arrays over the
    2^20 bins), and order statistics."""

    def __init__(self, scores: list, signed: bool = False):
        self.scores, self.signed = scores, signed
        cnt = np.zeros(BINS, np.int64)
        res = np.zeros(BINS, np.float64)
        lo = np.full(BINS, np.inf)
        hi = np.full(BINS, -np.inf)
        extra = {"nonpos": 0, "pos_min": np.inf}

        def flush(acc):
            c, r, a, b, z, m = jax.device_get(acc)
            cnt[:] += c
            res[:] += r
            np.minimum(lo, a, out=lo)
            np.maximum(hi, b, out=hi)
            extra["nonpos"] += int(z)
            extra["pos_min"] = min(extra["pos_min"], float(m))

        _passes(scores, signed, _first_pass, flush)
        if jax.process_count() > 1:   # other hosts' shards
            cnt[:], res[:], lo[:], hi[:], extra["nonpos"], extra["pos_min"] = _across_processes(
                (cnt, res, lo, hi, extra["nonpos"], extra["pos_min"]),
                (np.sum, np.sum, np.min, np.max, np.sum, np.min))
        self.cnt, self.lo, self.hi = cnt, lo, hi
        self.n = int(cnt.sum())
        self.nonpos, self.pos_min = extra["nonpos"], extra["pos_min"]
        with np.errstate(invalid="ignore"):   # codes no float has decode to signalling NaNs
            floors = decode(np.arange(BINS, dtype=np.uint32) << LOW).astype(np.float64)
        self.sums = np.where(cnt > 0, cnt * np.where(cnt > 0, floors, 0.0) + res, 0.0)
        self.before = np.cumsum(cnt) - cnt

    def max(self) -> float:
        return float(self.hi[np.flatnonzero(self.cnt)[-1]])

    def refine(self, ranks, edges=None):
        """For each 0-based ascending rank: (its exact value, the sum of the keys at that rank and above); and, with
        float32 ``edges``, the counts of positive keys in [edges[i], edges[i + 1]) (the last bin open above, the
        first taking the positive keys below edges[1])."""
        ranks = [int(r) for r in ranks]
        ends = np.cumsum(self.cnt)
        bins = [int(np.searchsorted(ends, r, side="right")) for r in ranks]
        targets = sorted(set(bins))
        edges = np.zeros(2, np.float32) if edges is None else np.asarray(edges, np.float32)
        sub = np.zeros((len(targets), SUB), np.int64)
        plot = np.zeros(len(edges) - 1, np.int64)

        def flush(acc):
            s, h = jax.device_get(acc)
            sub[:] += s
            plot[:] += h

        _passes(self.scores, self.signed, _second_pass, flush, np.asarray(targets, np.int32),
                np.asarray(edges[1:-1]))
        if jax.process_count() > 1:
            sub[:], plot[:] = _across_processes((sub, plot))
        above = np.concatenate([np.cumsum(self.sums[::-1])[::-1][1:], [0.0]])   # Σ of the bins after each
        out = []
        for r, b in zip(ranks, bins, strict=True):
            s = sub[targets.index(b)]
            q = r - int(self.before[b])
            through = np.cumsum(s)
            low = int(np.searchsorted(through, q, side="right"))
            values = decode((np.uint32(b) << np.uint32(LOW)) | np.arange(SUB, dtype=np.uint32)).astype(np.float64)
            v = float(values[low])
            # Codes no key has may decode to NaN (a bin holding infinity): only the counted ones are summed.
            later = np.where(s[low + 1:] > 0, s[low + 1:] * values[low + 1:], 0.0)
            tail = float(above[b] + later.sum() + (int(through[low]) - q) * v)
            out.append((v, tail))
        return out, plot

    def gini(self) -> tuple[float, float]:
        """(Gini coefficient, its largest possible error) of non-negative keys."""
        c, s = self.cnt.astype(np.float64), self.sums
        total = float(s.sum())
        if total <= 0:
            return 0.0, 0.0
        live = self.cnt > 0
        spread = np.where(live, self.hi - self.lo, 0.0)
        slack = float((spread * (c * c - (self.cnt % 2)) / 8).sum())
        weighted = float((s * (self.before + (c + 1) / 2)).sum()) + slack / 2
        n = self.n
        return 2 * weighted / (n * total) - (n + 1) / n, slack / (n * total)


def _across_processes(parts, reducers=None):
    """Host arrays reduced over every process (``reducers``: one of np.sum, np.min, np.max per part; sums by
    default), exchanged as int32 pairs and float32 pairs, since JAX without x64 would narrow int64 and float64."""
    from jax.experimental import multihost_utils
    out = []
    for a, reduce in zip(parts, reducers or [np.sum] * len(parts), strict=True):
        a = np.asarray(a)
        if a.dtype.kind in "iu":
            a = a.astype(np.int64)
            hi_, lo_ = (a >> 31).astype(np.int32), (a & (2 ** 31 - 1)).astype(np.int32)
            g = multihost_utils.process_allgather((hi_, lo_))
            out.append(reduce(g[0].astype(np.int64) << 31 | g[1].astype(np.int64), axis=0).reshape(a.shape))
            continue
        a = a.astype(np.float64)
        top = a.astype(np.float32)
        g = multihost_utils.process_allgather((top, np.nan_to_num(a - top).astype(np.float32)))
        whole = g[0].astype(np.float64) + g[1].astype(np.float64)
        out.append(reduce(whole, axis=0).reshape(a.shape))
    return out


def plot_edges(pos_min: float, pos_max: float) -> np.ndarray:
    """The report's histogram edges: ``PLOT_BINS`` bins even in log10 between the smallest and largest positive key."""
    if not np.isfinite(pos_min) or pos_max <= 0:
        return np.array([1.0, 1.0], np.float32)
    return (10.0 ** np.linspace(np.log10(pos_min), np.log10(pos_max), PLOT_BINS + 1)).astype(np.float32)


def heavy_tail(scores: dict, param_filter: str = select.DEFAULT_FILTER, signed: bool = False) -> dict:
    """``select.heavy_tail``'s figures, computed where the scores live (two passes; only histograms reach the host)."""
    h = Histogram([scores[p] for p in select.filter_paths(list(scores), param_filter)], signed)
    n = h.n
    m1, m01 = max(1, n // 100), max(1, n // 1000)
    pos = n - h.nonpos
    ranks = [n // 2, n // 2 - 1 if n > 1 else 0, n - m1, n - m01]
    qs = _positive_ranks(pos)
    edges = plot_edges(h.pos_min, h.max())
    got, plot = h.refine(ranks + [h.nonpos + r for r in qs], edges)
    med = got[0][0] if n % 2 else (got[1][0] + got[0][0]) / 2
    total = float(h.sums.sum())
    gini, err = h.gini()
    return {
        "n": n,
        "top1pct_mean_over_median": got[2][1] / m1 / med if med > 0 else float("inf"),
        "gini": gini,
        "gini_error": err,
        "top01pct_share": got[3][1] / total if total > 0 else 0.0,
        "median": med,
        "max": h.max(),
        "histogram": _plot(edges, plot, pos, [v for v, _ in got[4:]]),
    }


def _positive_ranks(pos: int) -> list[int]:
    """Ranks among the positive keys of their median (two middle ones) and of the 99th percentile (the two it
    interpolates between, as ``np.quantile``)."""
    if pos == 0:
        return []
    q = (pos - 1) * 0.99
    return [(pos - 1) // 2, pos // 2, int(np.floor(q)), int(np.ceil(q))]


def _plot(edges, counts, pos: int, at: list) -> dict:
    """The report's score histogram: log10 edges, counts of positive keys, log10 of their median and 99th
    percentile."""
    if not pos:
        return {"log10_edges": [], "counts": [], "log10_median": None, "log10_q99": None}
    q = (pos - 1) * 0.99
    q99 = at[2] + (q - np.floor(q)) * (at[3] - at[2])
    return {"log10_edges": np.log10(edges.astype(np.float64)).tolist(), "counts": [int(c) for c in counts],
            "log10_median": float(np.log10((at[0] + at[1]) / 2)), "log10_q99": float(np.log10(q99))}


def host_plot(x_sorted: np.ndarray) -> dict:
    """``_plot`` from the ascending keys already on the host (``select.heavy_tail``'s host path)."""
    start = int(np.searchsorted(x_sorted, 0.0, side="right"))
    pos = len(x_sorted) - start
    if not pos:
        return _plot(None, None, 0, [])
    edges = plot_edges(float(x_sorted[start]), float(x_sorted[-1]))
    cuts = np.searchsorted(x_sorted, edges[1:-1], side="left")
    counts = np.diff(np.concatenate([[start], cuts, [len(x_sorted)]]))
    return _plot(edges, counts, pos, [float(x_sorted[start + r]) for r in _positive_ranks(pos)])


@functools.partial(jax.jit, static_argnames=("signed", "axes"))
def _sum(x, signed: bool, axes):
    return jnp.sum((jnp.abs(x) if signed else x).astype(jnp.float32), axis=axes)


def total(x, signed: bool = False) -> float:
    """The sum of a score tensor (of |score| when ``signed``), reduced where it lives (float32)."""
    return float(_sum(x, signed, None))


def along(x, axis: int, signed: bool = False) -> np.ndarray:
    """A score tensor summed over every axis but ``axis`` (|score| when ``signed``): one figure per row (float64
    on the host)."""
    axis = axis % len(x.shape)
    return np.asarray(_sum(x, signed, tuple(i for i in range(len(x.shape)) if i != axis)), np.float64)


def at(x, flat_index) -> np.ndarray:
    """The entries of ``x`` at flat indices, gathered where it lives (by coordinates: a flattened sharded tensor
    would be gathered onto every device)."""
    idx = np.asarray(flat_index, np.int64)
    coords = np.unravel_index(idx, tuple(x.shape))
    return np.asarray(jnp.asarray(x)[tuple(jnp.asarray(c, jnp.int32) for c in coords)])
