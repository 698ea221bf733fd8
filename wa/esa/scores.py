"""Per-weight importance scores, computed under jit on sharded parameters.

Every score is a dict ``{parameter path: array shaped like the parameter}`` (float32, sharded
like the parameter). How each one aggregates over the calibration batches b = 1..B, where
``c_b`` is the number of loss terms in batch b (predicted tokens for a causal LM) and
``g_b = ∇ L_b`` the gradient of batch b's mean loss:

- ``magnitude``      |w|. No data.
- ``grad_x_weight``  (1/W) Σ_w |g_w ⊙ w| over the W calibration windows (sequences), g_w the gradient of
                     window w's mean loss: the first-order Taylor estimate of the loss change when the
                     weight is removed, accumulated per sample (Molchanov et al. 2019). Averaging the
                     gradient first (|w ⊙ ḡ|) would keep mostly sampling noise at a trained model, where
                     the mean gradient is near zero; per window the magnitudes add up.
- ``grad_squared``   (1/W) Σ_w g_w²: the empirical Fisher diagonal at window granularity.
- ``taylor_squared`` (1/W) Σ_w (g_w ⊙ w)²: the squared Taylor term, the second reading of "grad²" (the
                     estimated loss change squared, where ``grad_squared`` is a sensitivity).
- ``hutchinson_diag`` Σ_b c_b (1/P) Σ_p v_bp ⊙ (H_b v_bp) / Σ_b c_b with P Rademacher probes v per
                     batch (fresh for each batch and seed) and H_b the Hessian of L_b; H v is
                     forward-over-reverse (``jax.jvp`` of ``jax.grad``), probes vmapped in chunks.
                     An unbiased estimate of diag(H); signed.
- ``act_mag``        |W_ij| · ‖X_i‖₂ (Wanda) for each linear kernel, X_i the i-th input feature of
                     that layer over every real (unmasked) calibration token, ‖·‖₂ accumulated as
                     a sum of squares across batches. Inputs are captured with
                     ``flax.linen.intercept_methods``, without editing model code. Only linear
                     kernels get this score.

Per-window gradients are vmapped ``window_chunk`` windows at a time inside one compiled scan over the batch,
so memory is ``window_chunk`` gradients, not one per window. Encoders (SimCSE loss, whose negatives are the
other sequences of the batch) have no per-window loss: for them both scores use the batch gradient in place
of g_w, weighted by loss terms.

Adding a score is one function registered in ``SCORES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm import tqdm

from wa import errors, parallel
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
    window_chunk: int = 8

    def rng(self, b: int):
        return jax.random.fold_in(self.key, b)


def window_batches(loaded, ids, mask, batch_size: int) -> list[dict]:
    """LM windows ``ids`` / ``mask`` as the global batches a ``Calibration`` holds."""
    return list(parallel.iter_batches(loaded.mesh, {"input_ids": ids, "attention_mask": mask}, batch_size))


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


# Each per-window score is a function of the window's gradient times a function of the weights (|g·w| = |g|·|w|,
# (g·w)² = g²·w²): windows accumulate only the gradient's part (grad² and (g·w)² share theirs), and the weights'
# part multiplies the sums where a score is read (``_window_means``). With w inside the per-window reduction,
# XLA's CPU backend fused |g·w| into a reduction that took minutes where one gradient takes seconds, whenever
# grad_x_weight was the only score and the head was untied (experiments/bench_esa.py: per_window_scores).
GRAD_PARTS = {"abs": jnp.abs, "square": jnp.square}
PER_WINDOW = {"grad_x_weight": ("abs", jnp.abs), "grad_squared": ("square", None),
              "taylor_squared": ("square", jnp.square)}


def _window_means(loaded, name: str, sums: dict, windows: float, params) -> dict:
    """(1/W) Σ_w score_name(g_w, w) from the gradient parts' sums ``sums`` ({part: {path: Σ_w part(g_w)}}), one
    name at a time, so a stage holds the sums and one score's tree, not every score's."""
    part, w_part = PER_WINDOW[name]

    def build():
        def means(g, w, windows):
            return jax.tree.map(lambda gi, wi: (gi if w_part is None else gi * w_part(wi.astype(jnp.float32)))
                                / windows, g, w)
        return jax.jit(means)
    return loaded.compiled(("esa/window_means", name), build)(sums[part], _flat(params), jnp.float32(windows))


def _per_window_names(names) -> tuple[str, ...]:
    names = tuple(names)
    bad = [n for n in names if n not in PER_WINDOW]
    if bad or not names:
        raise ScoreError(f"{bad or names!r} not accumulated per window; per-window metrics: {', '.join(PER_WINDOW)}")
    return names


def _window_sums(params, cal: Calibration, names: tuple[str, ...], acts: bool = False):
    """Yields (windows so far, {part: {path: Σ_w part(g_w)} so far}) after each calibration batch, for the gradient
    parts (``PER_WINDOW``) the named scores need; ``_window_means`` turns them into a score. With ``acts`` (causal
    LMs), part ``"acts"`` holds every linear layer's Σ x_i² over the real tokens, read from the same forward
    passes (``act_mag`` without a pass of its own).

    Every named score comes from the same per-window gradient, so one pass serves them all. Windows without
    loss terms do not count.
    """
    names = _per_window_names(names)
    loaded = cal.loaded

    parts = tuple(sorted({PER_WINDOW[n][0] for n in names}))
    kernels = set(_flat(params))
    model = getattr(loaded, "model", None)
    head = None if getattr(model, "tied", True) else "/".join(model.head)

    if getattr(loaded.family, "kind", "causal_lm") != "causal_lm":
        if acts:
            raise ScoreError("activation sums ride on the per-window pass of causal LMs only")
        acc, total = None, 0.0
        for c, g in _grads(params, cal):
            part = {k: {p: c * GRAD_PARTS[k](v.astype(jnp.float32)) for p, v in g.items()} for k in parts}
            acc = part if acc is None else {k: {p: acc[k][p] + part[k][p] for p in part[k]} for k in parts}
            total += c
            yield total, acc
        return

    def build():
        def loss(p, batch, rng):
            if not acts:
                return _mean_loss(loaded, p, batch, rng)
            sq: dict = {}
            with nn.intercept_methods(_sq_interceptor(sq, batch["attention_mask"], head)):
                mean, count = _mean_loss(loaded, p, batch, rng)
            return mean, (count, {q: v for q, v in sq.items() if q in kernels})

        def one(params, ids, mask, rng):
            batch = {"input_ids": ids[None], "attention_mask": mask[None]}
            g, aux = jax.grad(lambda p: loss(p, batch, rng), has_aux=True)(params)
            count, sq = aux if acts else (aux, None)
            # A window without loss terms has a zero mean loss, so a zero gradient: it adds nothing to the sums.
            vals = {k: jax.tree.map(lambda gi, k=k: GRAD_PARTS[k](gi.astype(jnp.float32)), g) for k in parts}
            if acts:
                vals["acts"] = sq
            return vals, (count > 0).astype(jnp.float32)

        def step(params, batch, rng):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            n = ids.shape[0]
            chunk = max(c for c in range(1, min(cal.window_chunk, n) + 1) if n % c == 0)
            xs = (ids.reshape(n // chunk, chunk, -1), mask.reshape(n // chunk, chunk, -1))

            def body(acc, x):
                vals, live = jax.vmap(one, in_axes=(None, 0, 0, None))(params, *x, rng)
                # Window by window, not ``v.sum(0)``: XLA's CPU backend made that reduction over the vmapped axis
                # (fused with |g| or g²) take seconds for each 28M-entry embedding, more than the gradient.
                return (jax.tree.map(lambda a, v: sum((v[i] for i in range(chunk)), a), acc[0], vals),
                        acc[1] + live.sum()), None

            zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), params)
            init = {k: zeros for k in parts}
            if acts:   # the layers the interceptor sees, by their shapes in one window's pass
                shapes = jax.eval_shape(one, params, ids[0], mask[0], rng)[0]["acts"]
                init["acts"] = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), shapes)
            return jax.lax.scan(body, (init, jnp.zeros((), jnp.float32)), xs)[0]

        shard = {k: loaded.shardings for k in parts}
        return jax.jit(step, out_shardings=(shard | {"acts": None} if acts else shard, None))

    step = loaded.compiled(("esa/window", parts, cal.window_chunk, acts), build)
    acc, windows = None, 0.0
    what = "+".join(names + (("act_mag",) if acts else ()))
    for i, batch in enumerate(_progress(cal, cal.batches, f"{what} per window")):
        tot, n = step(params, batch, cal.rng(i))
        tot = {k: (v if k == "acts" else _flat(v)) for k, v in tot.items()}
        acc = tot if acc is None else {k: {p: acc[k][p] + v for p, v in tot[k].items()} for k in tot}
        windows += float(n)
        yield windows, acc


def prefix_means(names, params, cal: Calibration, points, reduce=None, acts: bool = False
                 ) -> dict[str, dict[int, object]]:
    """Per-window scores ``names`` after the first n calibration windows, for each n in ``points`` (at batch
    ends): one gradient pass gives every name's stability-curve scores and, at the last point, the score.

    ``reduce(name, n, scores)``, when given, is stored instead of the scores (e.g. their top-k), so that one
    copy of the model's scores per point need not be kept.
    """
    names = _per_window_names([names] if isinstance(names, str) else names)
    out, want = {n: {} for n in names}, sorted(set(points))
    acc = None
    for windows, acc in _window_sums(params, cal, names, acts):
        # Windows with loss terms so far: padding rows of the last batch have none, so they do not count.
        if int(windows) in want:
            for n in names:
                means = _window_means(cal.loaded, n, acc, windows, params)
                out[n][int(windows)] = reduce(n, int(windows), means) if reduce else means
    if acts:   # over every calibration token, as ``act_mag`` computes it: at the last point only
        out["act_mag"] = {max(want): act_mag_from(cal.loaded, params, acc["acts"])}
    missing = [w for w in want if w not in out[names[0]]]
    if missing:
        raise ScoreError(f"stability points {missing} do not fall at the end of a calibration batch")
    return out


def window_means(names, params, cal: Calibration, acts: bool = False) -> dict[str, dict]:
    """(1/W) Σ_w score_name(g_w, w) over every calibration window with at least one loss term, for every
    name, from one gradient pass (and ``act_mag`` from its forward passes, with ``acts``)."""
    names = _per_window_names([names] if isinstance(names, str) else names)
    windows, acc = 0.0, None
    for windows, acc in _window_sums(params, cal, names, acts):  # noqa: B007 - the last sums are the totals
        pass
    if not windows:
        raise ScoreError("the calibration batches hold no loss terms (all tokens masked?)")
    out = {n: _window_means(cal.loaded, n, acc, windows, params) for n in names}
    if acts:
        out["act_mag"] = act_mag_from(cal.loaded, params, acc["acts"])
    return out


def grad_x_weight(params, cal: Calibration):
    return window_means("grad_x_weight", params, cal)["grad_x_weight"]


def grad_squared(params, cal: Calibration):
    return window_means("grad_squared", params, cal)["grad_squared"]


def taylor_squared(params, cal: Calibration):
    return window_means("taylor_squared", params, cal)["taylor_squared"]


def _rademacher_like(key, params, n):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        # ±1 is exact in every float dtype, and jax.jvp wants tangents in the parameters' own dtype.
        treedef, [jax.random.rademacher(k, (n,) + w.shape, w.dtype) for k, w in zip(keys, leaves, strict=True)])


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


def _linear_kernel(module) -> bool:
    """A module call with its own 2-D kernel: a linear layer (Flax Dense, GPT-2's Conv1D, wa's own)."""
    return module.has_variable("params", "kernel") and module.get_variable("params", "kernel").ndim == 2


def _sum_sq(x2d):
    return jnp.sum(jnp.square(x2d), axis=0)


def _gram(x2d):
    return x2d.T @ x2d


def _sq_interceptor(out: dict, mask, head: str | None = None, reduce=_sum_sq):
    """A flax method interceptor adding each linear layer call's ``reduce`` of its inputs over real tokens (by
    default Σ x_i², per input feature) to ``out``; with ``head`` (an untied output matrix's path, which the chunked
    loss applies without a layer call), the final hidden states' too, as that matrix's input."""
    def add(path, x):
        x = x.astype(jnp.float32)
        if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
            x = x * mask[..., None].astype(jnp.float32)
        r = reduce(x.reshape(-1, x.shape[-1]))
        out[path] = r if path not in out else out[path] + r

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and args and _linear_kernel(context.module):
            add("/".join(context.module.path) + "/kernel", args[0])
        y = next_fun(*args, **kwargs)
        if head is not None and context.method_name == "hidden":
            add(head, y)
        return y
    return interceptor


def input_sq_norms(loaded, params, batch):
    """{kernel path: Σ over real tokens of x_i²} for every linear layer call (input features x)."""
    mask = batch.get("attention_mask")
    out = {}
    with nn.intercept_methods(_sq_interceptor(out, mask)):
        loaded.forward(params, batch["input_ids"], mask)
    return out


def input_grams(loaded, params, batch, paths) -> dict:
    """{kernel path: Σ over real tokens of x xᵀ} ([inputs, inputs], float32) for the linear layers at ``paths``
    (an untied output matrix is a layer call in the logits forward pass, so it is among them)."""
    mask = batch.get("attention_mask")
    out = {}
    with nn.intercept_methods(_sq_interceptor(out, mask, None, _gram)):
        loaded.forward(params, batch["input_ids"], mask)
    return {p: g for p, g in out.items() if p in paths}


def act_mag(params, cal: Calibration):
    loaded = cal.loaded
    flat = _flat(params)

    def build():
        @jax.jit
        def step(params, batch):
            return {p: sq for p, sq in input_sq_norms(loaded, params, batch).items() if p in flat}
        return step

    step = loaded.compiled("esa/act_mag", build)
    acc = None
    for batch in _progress(cal, cal.batches, "activations"):
        sq = step(params, batch)
        acc = sq if acc is None else {p: acc[p] + sq[p] for p in sq}
    return act_mag_from(loaded, params, acc)


def act_mag_from(loaded, params, acc: dict | None) -> dict:
    """|W_ij| · ‖X_i‖₂ from the linear layers' input sums of squares ``acc`` ({kernel path: Σ x_i²})."""
    if not acc:
        raise ScoreError("act_mag captured no linear-layer inputs; the model has no nn.Dense/Conv1D layers")
    flat = _flat(params)
    out = {}
    for p, sq in acc.items():
        w = flat[p]
        norm = jnp.sqrt(sq)
        shape = [1] * w.ndim
        axis = loaded.family.input_axis(p)
        shape[axis] = w.shape[axis]
        out[p] = (jnp.abs(w).astype(jnp.float32) * norm.reshape(shape))
    return out


@dataclasses.dataclass(frozen=True)
class Score:
    fn: Callable
    needs_data: bool
    signed: bool = False
    # Its work in forward-pass equivalents per calibration position (a gradient counts 3: the forward pass and two
    # matrix products per weight in the backward; a Hessian-vector product 2 gradients), for the stage's floor.
    passes: Callable[[Calibration], float] = lambda cal: 0.0


GRADIENT = 3.0

SCORES: dict[str, Score] = {
    "magnitude": Score(magnitude, needs_data=False),
    "grad_x_weight": Score(grad_x_weight, needs_data=True, passes=lambda cal: GRADIENT),
    "grad_squared": Score(grad_squared, needs_data=True, passes=lambda cal: GRADIENT),
    "taylor_squared": Score(taylor_squared, needs_data=True, passes=lambda cal: GRADIENT),
    "hutchinson_diag": Score(hutchinson_diag, needs_data=True, signed=True,
                             passes=lambda cal: 1 + 2 * GRADIENT * -(-cal.probes // cal.probe_chunk) * cal.probe_chunk),
    "act_mag": Score(act_mag, needs_data=True, passes=lambda cal: 1.0),
}


def compute(metric: str, params, cal: Calibration | None) -> dict:
    if metric not in SCORES:
        raise ScoreError(f"unknown metric {metric!r}; known: {', '.join(SCORES)}")
    s = SCORES[metric]
    if s.needs_data and (cal is None or not cal.batches):
        raise ScoreError(f"metric {metric!r} needs calibration batches")
    return s.fn(params, cal)
