"""Held-out loss and perplexity, exact over batches, shards and processes."""

from __future__ import annotations

import math

import jax
import numpy as np
from tqdm import tqdm

from wa import parallel


def nll_step(loaded):
    """A jitted ``(params, batch) -> (nll_sum, n_targets)`` on sharded inputs."""
    return jax.jit(lambda params, batch: loaded.token_nll(params, batch))


def evaluate(loaded, params, ids: np.ndarray, mask: np.ndarray, batch_size: int,
             progress: bool = True, desc: str = "eval", step=None) -> dict:
    """Mean next-token NLL (nats) and perplexity over LM windows ``ids`` / ``mask``.

    The last batch is padded with fully masked rows; sums are accumulated in float64 on the
    host, so the figure is independent of the batch size and the mesh.
    """
    mesh = loaded.mesh
    parallel.check_batch_size(mesh, batch_size)
    step = step or nll_step(loaded)
    n = len(ids)
    total, count = 0.0, 0.0
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress or jax.process_index()):
        def rows(lo, hi, start=start):
            sel = np.arange(start + lo, start + hi)
            ok = sel < n
            sel = np.where(ok, sel, 0)
            return {"input_ids": ids[sel], "attention_mask": mask[sel] * ok[:, None]}
        batch = parallel.make_global_batch(mesh, batch_size, rows)
        s, c = step(params, batch)
        total += float(s)
        count += float(c)
    nll = total / max(count, 1.0)
    return {"nll": nll, "ppl": math.exp(nll), "tokens": int(count), "windows": n}
