"""Per-weight importance scores, computed under jit on sharded parameters.

Every score is a dict ``{parameter path: array shaped like the parameter}`` (float32, sharded
like the parameter). How each one aggregates over the calibration batches b = 1..B, where
``c_b`` is the number of loss terms in batch b (predicted tokens for a causal LM) and
``g_b = ∇ L_b`` the gradient of batch b's mean loss:

- ``magnitude``      |w|. No data.
- ``grad_x_weight``  |w ⊙ ḡ| with ḡ = Σ_b c_b g_b / Σ_b c_b, the gradient of the mean loss over
                     all calibration tokens (first-order Taylor estimate of the loss change when
                     the weight is removed, SNIP-style).
- ``grad_squared``   Σ_b c_b g_b² / Σ_b c_b: the token-weighted mean of squared batch gradients
                     (empirical Fisher diagonal at batch granularity).
- ``hutchinson_diag`` Σ_b c_b (1/P) Σ_p v_bp ⊙ (H_b v_bp) / Σ_b c_b with P Rademacher probes v per
                     batch (fresh for each batch and seed) and H_b the Hessian of L_b; H v is
                     forward-over-reverse (``jax.jvp`` of ``jax.grad``), probes vmapped in chunks.
                     An unbiased estimate of diag(H); signed.
- ``act_mag``        |W_ij| · ‖X_i‖₂ (Wanda) for each linear kernel, X_i the i-th input feature of
                     that layer over every real (unmasked) calibration token, ‖·‖₂ accumulated as
                     a sum of squares across batches. Inputs are captured with
                     ``flax.linen.intercept_methods``, without editing model code. Only linear
                     kernels get this score.

Adding a score is one function registered in ``SCORES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm import tqdm

from wa import errors
from wa.parallel import rules as rules_lib


class ScoreError(errors.ConfigError):
    pass


@dataclasses.dataclass
class Calibration:
    """What a data-dependent score needs: the model, global batches and a seed key."""
    loaded: object
    batches: list[dict]
    key: jax.Array
    probes: int = 16
    probe_chunk: int = 4
    progress: bool = True

    def rng(self, b: int):
        return jax.random.fold_in(self.key, b)


def _flat(tree):
    return rules_lib.flatten(tree)


def _progress(cal, it, desc):
    return tqdm(it, desc=desc, disable=not cal.progress or jax.process_index() > 0)


def _mean_loss(loaded, params, batch, rng):
    total, count = loaded.token_nll(params, batch, rng)
    return total / jnp.maximum(count, 1.0), count


def magnitude(params, cal: Calibration | None = None):
    return {p: jnp.abs(w).astype(jnp.float32) for p, w in _flat(params).items()}


def _grads(params, cal: Calibration):
    """Yields (count, flat gradient of the batch's mean loss) per batch."""
    loaded = cal.loaded
    fn = loaded.compiled("esa/grad", lambda: jax.jit(
        jax.grad(lambda p, b, r: _mean_loss(loaded, p, b, r), has_aux=True),
        out_shardings=(loaded.shardings, None)))
    for i, batch in enumerate(_progress(cal, cal.batches, "gradients")):
        g, count = fn(params, batch, cal.rng(i))
        yield float(count), _flat(g)


def _weighted_mean(pairs):
    acc, total = None, 0.0
    for c, tree in pairs:
        acc = {p: c * v for p, v in tree.items()} if acc is None else {p: acc[p] + c * v for p, v in tree.items()}
        total += c
    if not total:
        raise ScoreError("the calibration batches hold no loss terms (all tokens masked?)")
    return {p: v / total for p, v in acc.items()}


def grad_x_weight(params, cal: Calibration):
    g = _weighted_mean(_grads(params, cal))
    return {p: jnp.abs(w * g[p]).astype(jnp.float32) for p, w in _flat(params).items()}


def grad_squared(params, cal: Calibration):
    return _weighted_mean((c, {p: jnp.square(v) for p, v in g.items()}) for c, g in _grads(params, cal))


def _rademacher_like(key, params, n):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.rademacher(k, (n,) + w.shape, jnp.float32) for k, w in zip(keys, leaves, strict=True)])


def hvp_diag_chunk(loss_fn, params, key, chunk: int, weights):
    """Σ_i weights_i · v_i ⊙ (H v_i) over ``chunk`` Rademacher probes, vmapped."""
    vs = _rademacher_like(key, params, chunk)
    grad = jax.grad(loss_fn)

    def one(v):
        return jax.jvp(grad, (params,), (v,))[1]

    hv = jax.vmap(one)(vs)
    return jax.tree_util.tree_map(
        lambda v, h: jnp.tensordot(weights, (v * h.astype(jnp.float32)), axes=1), vs, hv)


def hutchinson_diag(params, cal: Calibration):
    loaded = cal.loaded
    if cal.probes < 1 or cal.probe_chunk < 1:
        raise ScoreError(f"hutchinson_diag needs probes >= 1 and probe_chunk >= 1, got {cal.probes}, "
                         f"{cal.probe_chunk}")
    chunk = min(cal.probe_chunk, cal.probes)
    n_chunks = -(-cal.probes // chunk)

    def build():
        @jax.jit
        def step(params, batch, rng, key, weights):
            count = loaded.token_nll(params, batch, rng)[1]
            f = lambda p: _mean_loss(loaded, p, batch, rng)[0]  # noqa: E731
            return hvp_diag_chunk(f, params, key, chunk, weights), count
        return step

    step = loaded.compiled(("esa/hutchinson", chunk), build)

    def per_batch():
        for i, batch in enumerate(_progress(cal, cal.batches, "hutchinson")):
            rng = cal.rng(i)
            est, count = None, 0.0
            for j in range(n_chunks):
                # The last chunk may be partly padding: its extra probes get weight 0.
                live = min(chunk, cal.probes - j * chunk)
                weights = (jnp.arange(chunk) < live).astype(jnp.float32) / cal.probes
                key = jax.random.fold_in(jax.random.fold_in(cal.key, 1_000_003 + i), j)
                part, count = step(params, batch, rng, key, weights)
                part = _flat(part)
                est = part if est is None else {p: est[p] + part[p] for p in part}
            yield float(count), est

    return _weighted_mean(per_batch())


def linear_input_axis(module) -> int | None:
    """Which kernel axis multiplies the input features, for the linear layers wa knows."""
    if isinstance(module, nn.Dense):
        return 0
    if type(module).__name__ == "FlaxConv1D":  # GPT-2: kernel [out, in]
        return 1
    return None


def input_sq_norms(loaded, params, batch):
    """{kernel path: (input axis, Σ over real tokens of x_i²)} for every linear layer call."""
    mask = batch.get("attention_mask")
    out = {}

    def interceptor(next_fun, args, kwargs, context):
        axis = linear_input_axis(context.module) if context.method_name == "__call__" else None
        if axis is not None and args:
            x = args[0].astype(jnp.float32)
            if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x * mask[..., None].astype(jnp.float32)
            path = "/".join(context.module.path) + "/kernel"
            sq = jnp.sum(jnp.square(x.reshape(-1, x.shape[-1])), axis=0)
            prev = out.get(path)
            out[path] = (axis, sq if prev is None else prev[1] + sq)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        loaded.forward(params, batch["input_ids"], mask)
    return out


def act_mag(params, cal: Calibration):
    loaded = cal.loaded
    flat = _flat(params)
    axes: dict[str, int] = loaded.compiled("esa/act_mag_axes", dict)

    def build():
        @jax.jit
        def step(params, batch):
            res = input_sq_norms(loaded, params, batch)
            axes.update({p: a for p, (a, _) in res.items()})
            return {p: sq for p, (_, sq) in res.items() if p in flat}
        return step

    step = loaded.compiled("esa/act_mag", build)
    acc = None
    for batch in _progress(cal, cal.batches, "activations"):
        sq = step(params, batch)
        acc = sq if acc is None else {p: acc[p] + sq[p] for p in sq}
    if not acc:
        raise ScoreError("act_mag captured no linear-layer inputs; the model has no nn.Dense/Conv1D layers")
    out = {}
    for p, sq in acc.items():
        w = flat[p]
        norm = jnp.sqrt(sq)
        shape = [1] * w.ndim
        shape[axes[p]] = w.shape[axes[p]]
        out[p] = (jnp.abs(w).astype(jnp.float32) * norm.reshape(shape))
    return out


@dataclasses.dataclass(frozen=True)
class Score:
    fn: Callable
    needs_data: bool
    signed: bool = False


SCORES: dict[str, Score] = {
    "magnitude": Score(magnitude, needs_data=False),
    "grad_x_weight": Score(grad_x_weight, needs_data=True),
    "grad_squared": Score(grad_squared, needs_data=True),
    "hutchinson_diag": Score(hutchinson_diag, needs_data=True, signed=True),
    "act_mag": Score(act_mag, needs_data=True),
}


def compute(metric: str, params, cal: Calibration | None) -> dict:
    if metric not in SCORES:
        raise ScoreError(f"unknown metric {metric!r}; known: {', '.join(SCORES)}")
    s = SCORES[metric]
    if s.needs_data and (cal is None or not cal.batches):
        raise ScoreError(f"metric {metric!r} needs calibration batches")
    return s.fn(params, cal)
