"""Bit-flip attack search on a model's weight matrices as they are stored.

The progressive bit search of Rakin, He & Fan (2019, "Bit-Flip Attack: Crushing Neural Network with Progressive
Bit Search", ICCV): an attacker who can flip bits of the stored weights (Rowhammer) looks for the fewest flips that
destroy the model. Each step:

1. the gradient g of the attack loss (mean next-token NLL on the attacker's own batch) at the current weights;
2. for every weight and every bit of its code, the first-order loss change g·(w' - w) of flipping that bit, w' the
   value the flipped code decodes to (a flip to a non-finite value counts as +inf); the ``candidates`` best flips
   of each matrix;
3. the ``exact`` best of those, over all matrices, evaluated exactly on the attack batch, and the one that raises
   the attack loss most is made (the paper's in-layer then cross-layer search);
4. the held-out perplexity is measured; the search stops when it passes ``threshold`` x the stored model's own, or
   is not finite, or after ``max_flips``.

Encodings (``ENCODINGS``, one record each): ``float32``; ``bfloat16`` (the weights rounded to bfloat16, as a model
stored in it); ``int8``, symmetric per-output-channel quantization as deployed (scale = max|w| / 127 over each output
unit's inputs, or over each token's vector for an embedding table; codes in [-127, 127], two's complement; the model
runs on code x scale). The model under attack is the encoded one, and its own perplexity is the reference.

Controls without search flip one bit (``Encoding.control_bit``: int8's sign bit, a float's top exponent bit) of
weights taken in a fixed order, an ESA score's ranking or a random draw; how many flips pass the threshold is found by
doubling the count and then bisecting, which assumes that flipping more of one ordered list does not repair the
model (stated in the report).

Adding an encoding is one ``Encoding`` record here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from wa import errors
from wa.esa import perturb


class AttackError(errors.ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class Encoding:
    name: str
    bits: int
    storage: object       # the unsigned dtype the code is flipped in
    control_bit: int      # the bit the no-search controls flip
    encode: Callable      # (float32 weights, group axis) -> (codes, scale or None), traced
    decode: Callable      # (codes, scale) -> float32 values, traced

    def field(self, bit: int) -> str:
        if self.name == "int8":
            return "sign (-128)" if bit == 7 else f"magnitude 2^{bit}"
        return perturb.bit_field(bit, self.name)


def _float_codec(dtype, storage):
    def encode(w, axis):
        return jax.lax.bitcast_convert_type(w.astype(dtype), storage), None

    def decode(codes, scale):
        return jax.lax.bitcast_convert_type(codes, dtype).astype(jnp.float32)
    return encode, decode


def _int8_encode(w, axis):
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return jax.lax.bitcast_convert_type(q, jnp.uint8), scale


def _int8_decode(codes, scale):
    return jax.lax.bitcast_convert_type(codes, jnp.int8).astype(jnp.float32) * scale


ENCODINGS = {e.name: e for e in (
    Encoding("float32", 32, jnp.uint32, 30, *_float_codec(jnp.float32, jnp.uint32)),
    Encoding("bfloat16", 16, jnp.uint16, 14, *_float_codec(jnp.bfloat16, jnp.uint16)),
    Encoding("int8", 8, jnp.uint8, 7, _int8_encode, _int8_decode),
)}


def check(encodings, threshold: float, max_flips: int, candidates: int, exact: int) -> tuple[str, ...]:
    """The attack's settings, refused in one line before any compute."""
    names = tuple(encodings)
    bad = [e for e in names if e not in ENCODINGS]
    if bad or not names:
        raise AttackError(f"--config.attack_encodings={','.join(names)!r}: unknown {bad}; expected some of "
                          f"{', '.join(ENCODINGS)}")
    if not threshold > 1:
        raise AttackError(f"--config.attack_threshold={threshold}: the perplexity factor that counts as destroyed "
                          "must be > 1 (10: ten times the stored model's perplexity)")
    for name, v in (("attack_max_flips", max_flips), ("attack_candidates", candidates), ("attack_exact", exact)):
        if int(v) < 1:
            raise AttackError(f"--config.{name}={v}: expected a positive integer")
    return names


@dataclasses.dataclass
class Stored:
    """The attacked matrices as stored: codes, scales and the values the model runs on."""
    encoding: Encoding
    codes: dict           # path -> codes (storage dtype)
    scales: dict          # path -> scale (int8) or None
    flat: dict            # every parameter; attacked paths hold their decoded values (parameter dtype)
    paths: tuple          # the attacked paths

    def values(self, p):
        return self.encoding.decode(self.codes[p], self.scales[p])

    def flipped(self, p: str, index: int, bit: int) -> tuple[jax.Array, float, float]:
        """The codes of ``p`` with ``bit`` of entry ``index`` flipped, and the entry's value before and after."""
        c = self.codes[p].reshape(-1)
        one = c[index] ^ jnp.asarray(1 << bit, self.encoding.storage)
        new = c.at[index].set(one).reshape(self.codes[p].shape)
        scale = self.scales[p]
        s = 1.0 if scale is None else jnp.broadcast_to(scale, self.codes[p].shape).reshape(-1)[index]
        before = float(self.encoding.decode(c[index], None if scale is None else s))
        after = float(self.encoding.decode(one, None if scale is None else s))
        return new, before, after

    def with_codes(self, p: str, codes) -> dict:
        flat = dict(self.flat)
        flat[p] = self.encoding.decode(codes, self.scales[p]).astype(self.flat[p].dtype)
        return flat

    def apply(self, p: str, index: int, bit: int) -> None:
        new, _, _ = self.flipped(p, index, bit)
        self.codes[p] = new
        self.flat = self.with_codes(p, new)

    def copy(self) -> Stored:
        return Stored(self.encoding, dict(self.codes), dict(self.scales), dict(self.flat), self.paths)


def group_axis(describe, input_axis, path: str, ndim: int) -> int:
    """The axis one quantization scale spans: an output unit's inputs, or an embedding row's vector."""
    if ndim < 2:
        return 0
    return ndim - 1 if describe(path).component == "embedding" else input_axis(path)


def store(flat: dict, paths, encoding: str, axis_of: Callable[[str], int]) -> Stored:
    """``flat`` with ``paths`` encoded (``axis_of(path)``: the axis a quantization scale spans)."""
    enc = ENCODINGS[encoding]
    codes, scales, out = {}, {}, dict(flat)
    for p in paths:
        c, s = jax.jit(enc.encode, static_argnums=1)(jnp.asarray(flat[p]), axis_of(p))
        codes[p], scales[p] = c, s
        out[p] = enc.decode(c, s).astype(flat[p].dtype)
    return Stored(enc, codes, scales, out, tuple(paths))


@functools.partial(jax.jit, static_argnames=("encoding", "m"))
def best_flips(grad, codes, scale, encoding: str, m: int):
    """The ``m`` flips of one matrix with the largest first-order loss increase g·(w' - w): (gains, flat indices,
    bits). Each weight's best bit is kept as bits are scanned, so memory is a few copies of the matrix."""
    enc = ENCODINGS[encoding]
    cur = enc.decode(codes, scale)
    g = grad.astype(jnp.float32)
    best = jnp.full(codes.shape, -jnp.inf, jnp.float32)
    which = jnp.zeros(codes.shape, jnp.int32)
    for b in range(enc.bits):
        new = enc.decode(codes ^ jnp.asarray(1 << b, enc.storage), scale)
        d = new - cur
        gain = jnp.where(jnp.isfinite(new) & jnp.isfinite(d), g * d, jnp.inf)
        gain = jnp.where(jnp.isnan(gain), -jnp.inf, gain)
        better = gain > best
        best = jnp.where(better, gain, best)
        which = jnp.where(better, b, which)
    gains, idx = jax.lax.top_k(best.reshape(-1), min(m, best.size))
    return gains, idx, which.reshape(-1)[idx]


@dataclasses.dataclass(frozen=True)
class Model:
    """What the search reads of a model, as functions of the flat parameters: the attack loss and its gradient on
    the attacker's batch, and the held-out perplexity."""
    grad: Callable          # flat -> {path: gradient of the attack loss}
    attack_loss: Callable   # flat -> mean attack loss (nats; +inf when not finite)
    perplexity: Callable    # flat -> held-out perplexity (+inf when not finite)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


def search(model: Model, stored: Stored, threshold: float, max_flips: int, candidates: int = 4, exact: int = 8,
           progress: Callable | None = None) -> dict:
    """Progressive bit search on ``stored`` (changed in place): one flip per step, each the best of the ``exact``
    top first-order candidates by the exact attack loss, until the held-out perplexity passes ``threshold`` x the
    stored model's own. Returns the base perplexity, each flip and the perplexity after it."""
    base = _finite(model.perplexity(stored.flat))
    target = threshold * base
    flips, t0 = [], time.time()
    ppl = base
    while len(flips) < max_flips and ppl < target:
        grads = model.grad(stored.flat)
        pool = []
        for p in stored.paths:
            gains, idx, bits = best_flips(grads[p], stored.codes[p], stored.scales[p], stored.encoding.name,
                                          candidates)
            pool += [(float(gv), p, int(i), int(b)) for gv, i, b in zip(np.asarray(gains), np.asarray(idx),
                                                                         np.asarray(bits), strict=True)]
        pool.sort(key=lambda t: -t[0])
        tried = []
        for gain, p, i, b in pool[:exact]:
            codes, _, _ = stored.flipped(p, i, b)
            tried.append((_finite(model.attack_loss(stored.with_codes(p, codes))), gain, p, i, b))
        loss, gain, p, i, b = max(tried, key=lambda t: t[0])
        _, before, after = stored.flipped(p, i, b)
        stored.apply(p, i, b)
        ppl = _finite(model.perplexity(stored.flat))
        flips.append({"path": p, "index": i, "bit": b, "field": stored.encoding.field(b), "before": before,
                      "after": after, "first_order_gain": gain, "attack_loss": loss, "ppl": ppl,
                      "seconds": round(time.time() - t0, 2)})
        if progress:
            progress(len(flips), ppl)
    return {"ppl_base": base, "threshold_ppl": target, "flips": flips, "passed": ppl >= target,
            "n_flips": len(flips) if ppl >= target else None}


def ordered_flips(model: Model, stored: Stored, order: list[tuple[str, int]], threshold: float,
                  base: float | None = None) -> dict:
    """Flip ``Encoding.control_bit`` of the first n weights of ``order`` ((path, flat index) pairs, no search): the
    least n whose held-out perplexity passes ``threshold`` x the stored model's, by doubling n then bisecting."""
    base = _finite(model.perplexity(stored.flat)) if base is None else base
    target = threshold * base
    bit = stored.encoding.control_bit
    seen: dict[int, float] = {}

    def ppl_after(n: int) -> float:
        if n not in seen:
            s = stored.copy()
            by_path: dict[str, list[int]] = {}
            for p, i in order[:n]:
                by_path.setdefault(p, []).append(i)
            for p, idx in by_path.items():
                c = s.codes[p].reshape(-1)
                ix = jnp.asarray(idx)
                c = c.at[ix].set(c[ix] ^ jnp.asarray(1 << bit, s.encoding.storage)).reshape(s.codes[p].shape)
                s.codes[p] = c
                s.flat = s.with_codes(p, c)
            seen[n] = _finite(model.perplexity(s.flat))
        return seen[n]

    n, last_fail = 1, 0
    while n < len(order) and ppl_after(n) < target:
        last_fail, n = n, min(2 * n, len(order))
    if ppl_after(n) < target:
        return {"n_flips": None, "tried_up_to": n, "ppl": seen, "threshold_ppl": target, "ppl_base": base}
    lo, hi = last_fail, n              # ppl(lo) < target <= ppl(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ppl_after(mid) >= target:
            hi = mid
        else:
            lo = mid
    return {"n_flips": hi, "tried_up_to": n, "ppl": dict(sorted(seen.items())), "threshold_ppl": target,
            "ppl_base": base}


def ranking_metrics(metrics) -> list[str]:
    """The scores whose value ranks weights (the signed Hutchinson diagonal does not: its sign is not importance)."""
    from wa.esa import scores
    return [m for m in metrics if not scores.SCORES[m].signed]


def score_order(scores: dict, paths, n: int) -> list[tuple[str, int]]:
    """The ``n`` highest-scoring weights over ``paths`` ((path, flat index), best first)."""
    from wa.esa import select
    tops = []
    for p in paths:   # each matrix's n best found where its scores live; only those reach the host
        k = min(n, int(np.prod(scores[p].shape)))
        vals, idx = jax.device_get(select._topk(jnp.asarray(scores[p], jnp.float32), k))
        tops += [(float(v), p, int(i)) for v, i in zip(vals, idx, strict=True)]
    tops.sort(key=lambda t: -t[0])
    return [(p, i) for _, p, i in tops[:n]]


def random_order(sizes: dict, n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` distinct weights drawn uniformly over all entries of ``sizes`` (path -> number of entries)."""
    paths = list(sizes)
    ends = np.cumsum([sizes[p] for p in paths])
    rng = np.random.default_rng(seed)
    picks = rng.choice(int(ends[-1]), size=min(n, int(ends[-1])), replace=False)
    where = np.searchsorted(ends, picks, side="right")
    starts = np.concatenate([[0], ends[:-1]])
    return [(paths[w], int(x - starts[w])) for w, x in zip(where, picks, strict=True)]


def percentile(scores: dict, paths, path: str, index: int) -> float:
    """The share of the weights of ``paths`` that score strictly below weight ``index`` of ``path`` (1.0: the top)."""
    from wa.esa import tally
    v = float(tally.at(scores[path], [index])[0])
    below = sum(int(jnp.sum(jnp.asarray(scores[p]) < v)) for p in paths)   # counted where the scores live
    total = sum(int(np.prod(scores[p].shape)) for p in paths)
    return below / max(total - 1, 1)


def lm_model(loaded, attack_batches: list[dict], eval_ids: np.ndarray, eval_mask: np.ndarray,
             batch_size: int) -> Model:
    """``Model`` of a loaded causal LM: the attack loss on ``attack_batches`` (global batches, the attacker's
    text), the perplexity on the held-out windows ``eval_ids`` / ``eval_mask``. Every function compiles once: the
    parameters are an argument, so a flipped matrix is a new value, not a new program."""
    from wa.esa import evaluate, scores
    from wa.parallel import rules as rules_lib
    tree = rules_lib.unflattener(loaded.params)
    step = evaluate.nll_step(loaded)

    def grad(flat):
        cal = scores.Calibration(loaded, attack_batches, jax.random.key(0), progress=False)
        return scores._weighted_mean(scores._grads(tree(flat), cal))

    def attack_loss(flat):
        t, total, count = tree(flat), 0.0, 0.0
        for b in attack_batches:
            s, c = step(t, b)
            total, count = total + float(s), count + float(c)
        return _finite(total / max(count, 1.0))

    def perplexity(flat):
        return _finite(evaluate.nll(step, loaded.mesh, tree(flat), eval_ids, eval_mask, batch_size,
                                    progress=False)["ppl"])
    return Model(grad, attack_loss, perplexity)
