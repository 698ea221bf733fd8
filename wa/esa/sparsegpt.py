"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

A linear layer's output on calibration inputs X is kept as close as it can be while weights are removed: for each
output row w, min ‖w'X − wX‖² subject to the row's mask, with H = XᵀX shared by every row. Optimal Brain Surgeon
(Hassibi & Stork 1993) removes one weight q at a time and moves the others by −(w_q / [H⁻¹]_qq)·H⁻¹[q, :];
SparseGPT visits the columns (inputs) left to right, removes the masked weights of column i in every row at once
and updates only the columns still to come, so each step needs the inverse Hessian of the remaining columns, which
is row i of the upper Cholesky factor of H⁻¹ (up to a scale). The columns go in blocks of 128: inside a block the
updates are applied at once per column, and the block's accumulated errors reach the later columns in one matrix
product ("lazy batch" updates). The mask is chosen per block from w² / [U]_ii² (adaptive mask selection), or for an
N:M pattern per group of M columns just before the group is visited.

Here everything runs in JAX, one jit per matrix shape, on the device the weights live on; kernels are taken as
[outputs, inputs] rows (``wa.esa.saliency.rows``), so Flax's [in, out] kernels and GPT-2's [out, in] read alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wa.esa import saliency

BLOCK = 128      # the paper's block size
DAMP = 0.01      # λ = 1% of the mean diagonal of H, the paper's dampening


def _inverse_cholesky(h: jax.Array, damp: float) -> jax.Array:
    """U upper-triangular with UᵀU = (H + λI)⁻¹, λ = ``damp`` · mean diag H."""
    n = h.shape[0]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n, dtype=h.dtype)
    low = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(n, dtype=h.dtype))
    return jnp.linalg.cholesky(hinv).T


def prune_rows(w: jax.Array, gram: jax.Array, spec, block: int = BLOCK, damp: float = DAMP):
    """(pruned rows, reconstruction error Σ (w_q − q)² / U_qq² over the removed weights) of ``w`` [rows, cols]
    for a calibration Gram matrix ``gram`` = Σ x xᵀ over tokens [cols, cols]; ``spec`` a fraction removed (the same
    share of every block) or (N, M). Computed in float32. A fraction is an argument of the compiled program, not
    part of it: OWL's per-layer sparsities share one compilation per matrix shape."""
    if isinstance(spec, tuple):
        return _prune_rows(w, gram, jnp.float32(0.0), spec, block, damp)
    return _prune_rows(w, gram, jnp.float32(spec), None, block, damp)


@functools.partial(jax.jit, static_argnames=("nm_spec", "block", "damp"))
def _prune_rows(w, gram, fraction, nm_spec, block, damp):
    spec = nm_spec if nm_spec is not None else fraction
    w = w.astype(jnp.float32)
    h = gram.astype(jnp.float32)
    rows, cols = w.shape
    # An input that was never non-zero carries no information: its weights go (they never act) and its Hessian
    # entry is set to 1 so H stays invertible, as the reference implementation does.
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[None, :], 0.0, w)
    nm = nm_spec is not None
    if nm:
        n_prune, m = spec
    step = m if nm else 1                 # a block holds whole N:M groups
    block = min(max(step, block - block % step), -(-cols // step) * step)
    padded = -(-cols // block) * block
    pad = padded - cols
    # Padding columns: zero weights with an identity Hessian block, so they neither move nor are moved.
    w = jnp.pad(w, ((0, 0), (0, pad)))
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(padded) >= cols).astype(h.dtype)
    u = _inverse_cholesky(h, damp)
    real = jnp.arange(padded) < cols
    n_blocks = padded // block

    def column(i, carry):
        w1, u1, mask1, err1, loss = carry
        if nm:
            # At the start of each group of M columns its N lowest w² / U_ii² are chosen, on the weights as
            # the earlier columns' updates left them.
            start = (i // m) * m
            g = jax.lax.dynamic_slice_in_dim(w1, start, m, axis=1)
            dg = jax.lax.dynamic_slice_in_dim(jnp.diag(u1), start, m)
            score = jnp.square(g) / jnp.square(dg)[None, :]
            ranks = jnp.argsort(jnp.argsort(score, axis=1, stable=True), axis=1, stable=True)
            fresh = jax.lax.dynamic_update_slice_in_dim(mask1, ranks < n_prune, start, axis=1)
            mask1 = jnp.where(i % m == 0, fresh, mask1)
        wi = w1[:, i]
        d = u1[i, i]
        q = jnp.where(mask1[:, i], 0.0, wi)
        e = (wi - q) / d
        # U is upper-triangular, so this moves columns > i only; column i becomes q (set, not left to rounding).
        w1 = (w1 - e[:, None] * u1[i][None, :]).at[:, i].set(q)
        err1 = err1.at[:, i].set(e)
        return w1, u1, mask1, err1, loss + jnp.sum(jnp.square(e))

    def one_block(b, carry):
        w, loss = carry
        b0 = b * block
        w1 = jax.lax.dynamic_slice_in_dim(w, b0, block, axis=1)
        u1 = jax.lax.dynamic_slice(u, (b0, b0), (block, block))
        live = jax.lax.dynamic_slice_in_dim(real, b0, block)
        if nm:
            mask1 = jnp.zeros((rows, block), bool)
        else:
            # Adaptive mask selection: the block's lowest w² / U_ii², the same share of its real weights.
            score = jnp.where(live[None, :], jnp.square(w1) / jnp.square(jnp.diag(u1))[None, :], jnp.inf)
            k = jnp.round(spec * rows * jnp.sum(live)).astype(jnp.int32)
            rank = jnp.argsort(jnp.argsort(score.ravel(), stable=True), stable=True)
            mask1 = (rank < k).reshape(rows, block)
        init = (w1, u1, mask1, jnp.zeros((rows, block), jnp.float32), loss)
        w1, _, _, err1, loss = jax.lax.fori_loop(0, block, column, init)
        # The block's errors reach every later column at once; the block's own columns are already final.
        u_rows = jax.lax.dynamic_slice_in_dim(u, b0, block, axis=0)
        later = (jnp.arange(padded) >= b0 + block)[None, :]
        w = w - jnp.where(later, err1 @ u_rows, 0.0)
        w = jax.lax.dynamic_update_slice_in_dim(w, w1, b0, axis=1)
        return w, loss

    w, loss = jax.lax.fori_loop(0, n_blocks, one_block, (w, jnp.zeros((), jnp.float32)))
    return w[:, :cols], loss


def prune_kernel(kernel, gram, spec, input_axis: int = 0, block: int = BLOCK, damp: float = DAMP):
    """``kernel`` pruned by SparseGPT, in its own shape and dtype: (pruned, reconstruction error)."""
    spec = saliency.pattern(spec)
    k = np.asarray(kernel) if not isinstance(kernel, jax.Array) else kernel
    shape, dtype = k.shape, k.dtype
    r = jnp.moveaxis(jnp.asarray(k), input_axis, -1).reshape(-1, shape[input_axis])
    if isinstance(spec, tuple) and shape[input_axis] % spec[1]:
        raise ValueError(f"N:M sparsity {spec[0]}:{spec[1]} needs each row's input count to be a multiple of "
                         f"{spec[1]}; a matrix has {shape[input_axis]} inputs")
    out, loss = prune_rows(r, jnp.asarray(gram), spec, block, damp)
    moved = [s for i, s in enumerate(shape) if i != input_axis] + [shape[input_axis]]
    return jnp.moveaxis(out.reshape(moved), -1, input_axis).astype(dtype), float(loss)


def grams(loaded, params, batches, paths, progress: bool = True) -> dict:
    """{kernel path: Σ x xᵀ over every real calibration token} for the linear layers at ``paths``, from the model
    as it is (one forward pass per batch; the reference implementation instead feeds each block the outputs of
    the blocks already pruned before it, at one pass per block)."""
    from tqdm import tqdm

    from wa.esa import scores
    paths = frozenset(paths)

    def build():
        return jax.jit(lambda params, batch: scores.input_grams(loaded, params, batch, paths))

    step = loaded.compiled(("esa/grams", paths), build)
    acc = None
    for batch in tqdm(batches, desc="sparsegpt hessians", disable=not progress or jax.process_index() > 0):
        g = step(params, batch)
        acc = g if acc is None else {p: acc[p] + g[p] for p in g}
    return acc or {}


def prune(flat: dict, paths, hessians: dict, spec, input_axis=lambda p: 0):
    """Yields (path, pruned kernel, reconstruction error) for each of ``paths`` that has a Gram matrix in
    ``hessians``; a path without one (a layer the calibration pass did not see) is not yielded. ``spec``: one
    sparsity, or {path: fraction} (OWL's layer sparsities)."""
    for p in paths:
        if p in hessians:
            w, err = prune_kernel(flat[p], hessians[p], spec[p] if isinstance(spec, dict) else spec, input_axis(p))
            yield p, w, err
