"""Held-out loss and perplexity, exact over batches, shards and processes."""

from __future__ import annotations

import math

import jax
import numpy as np
from tqdm import tqdm

from wa import parallel


def nll_step(loaded):
    """A jitted ``(params, batch) -> (nll_sum, n_targets)`` on sharded inputs."""
    return loaded.compiled("esa/nll", lambda: jax.jit(lambda params, batch: loaded.token_nll(params, batch)))


def evaluate(loaded, params, ids: np.ndarray, mask: np.ndarray, batch_size: int,
             progress: bool = True, desc: str = "eval", step=None) -> dict:
    """Mean next-token NLL (nats) and perplexity over LM windows ``ids`` / ``mask``.

    The last batch is padded with fully masked rows; sums are accumulated in float64 on the
    host, so the figure is independent of the batch size and the mesh.
    """
    step = step or nll_step(loaded)
    batches = parallel.iter_batches(loaded.mesh, {"input_ids": ids, "attention_mask": mask}, batch_size)
    total, count = 0.0, 0.0
    for batch in tqdm(batches, total=-(-len(ids) // batch_size), desc=desc,
                      disable=not progress or jax.process_index() > 0):
        s, c = step(params, batch)
        total += float(s)
        count += float(c)
    nll = total / max(count, 1.0)
    ppl = math.exp(nll) if nll < 700 else float("inf")  # exp overflows past ~709; NaN stays NaN
    return {"nll": nll, "ppl": ppl, "tokens": int(count), "windows": len(ids)}
