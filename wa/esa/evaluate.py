"""Held-out loss and perplexity, exact over batches, shards and processes."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from wa import parallel
from wa.parallel import rules as rules_lib


def nll_step(loaded):
    """A jitted ``(params, batch) -> (nll_sum, n_targets)`` on sharded inputs."""
    return loaded.compiled("esa/nll", lambda: jax.jit(lambda params, batch: loaded.token_nll(params, batch)))


def evaluate(loaded, params, ids: np.ndarray, mask: np.ndarray, batch_size: int,
             progress: bool = True, desc: str = "eval", step=None) -> dict:
    """Mean next-token NLL (nats) and perplexity over LM windows ``ids`` / ``mask``.

    The last batch is padded with fully masked rows; sums are accumulated in float64 on the
    host, so the figure is independent of the batch size and the mesh.
    """
    return nll(step or nll_step(loaded), loaded.mesh, params, ids, mask, batch_size, progress, desc)


def nll(step, mesh, params, ids: np.ndarray, mask: np.ndarray, batch_size: int, progress: bool = True,
        desc: str = "eval") -> dict:
    """``evaluate`` with any jitted ``(params, batch) -> (nll_sum, n_targets)`` on ``mesh`` (a model being
    trained has no loaded checkpoint)."""
    batches = parallel.iter_batches(mesh, {"input_ids": ids, "attention_mask": mask}, batch_size)
    total, count = 0.0, 0.0
    for batch in tqdm(batches, total=-(-len(ids) // batch_size), desc=desc,
                      disable=not progress or jax.process_index() > 0):
        s, c = step(params, batch)
        total += float(s)
        count += float(c)
    nll = total / max(count, 1.0)
    ppl = math.exp(nll) if nll < 700 else float("inf")  # exp overflows past ~709; NaN stays NaN
    return {"nll": nll, "ppl": ppl, "tokens": int(count), "windows": len(ids)}


BATCHING = ("serial", "map", "vmap")


def _with_changed(loaded):
    """``(changed, params) -> params`` with the flat entries ``changed`` swapped in."""
    tree = rules_lib.unflattener(loaded.params)

    def swap(changed, params):
        flat = rules_lib.flatten(params)
        flat.update(changed)
        return tree(flat)
    return swap


def _many_step(loaded, paths: tuple[str, ...], group: int, how: str):
    """A jitted ``(changed, params, batch) -> (nll sums, counts)`` for parameter sets that differ from ``params``
    only in ``paths``: one set per call (``how="serial"``), or ``group`` sets stacked on a leading axis, vmapped
    (``"vmap"``) or one after another inside the call (``"map"``, ``jax.lax.map``)."""
    def build():
        swap = _with_changed(loaded)

        def one(changed, params, batch):
            return loaded.token_nll(swap(changed, params), batch)

        if how == "serial":
            return jax.jit(one)
        if how == "vmap":
            return jax.jit(jax.vmap(one, in_axes=(0, None, None)))
        return jax.jit(lambda stacked, params, batch: jax.lax.map(lambda ch: one(ch, params, batch), stacked))
    return loaded.compiled(("esa/nll_many", paths, 1 if how == "serial" else group, how), build)


_stack = jax.jit(lambda sets: jax.tree.map(lambda *xs: jnp.stack(xs), *sets))


def evaluate_many(loaded, param_sets: Iterable[dict], paths, ids: np.ndarray, mask: np.ndarray, batch_size: int,
                  group: int = 8, progress=None, how: str = "map") -> Iterator[dict]:
    """``evaluate`` for many perturbed parameter sets.

    ``param_sets`` yields flat parameter dicts (``wa.parallel.rules.flatten`` of ``loaded.params``, perturbed
    in ``paths`` only; ``wa.esa.perturb.apply`` makes them). ``how="serial"`` evaluates one set per compiled
    call and holds one perturbed copy of ``paths`` at a time; ``"map"`` / ``"vmap"`` evaluate ``group`` sets
    per call, stacked, so ``2 × group`` copies exist at once (the sets and their stack; the last group is
    padded with copies of its first set). Sets are consumed lazily either way. Yields one result per set, in
    order, each exactly what ``evaluate`` returns for it (up to float summation order), with ``seconds``: the
    compiled calls' time per set (the first call's includes compiling). ``progress`` is called
    with the number of sets finished after each call.
    """
    if how not in BATCHING:
        raise ValueError(f"how must be one of {BATCHING}, got {how!r}")
    paths = tuple(sorted(paths))
    step = _many_step(loaded, paths, group, how)
    size = 1 if how == "serial" else group
    params_it = iter(param_sets)
    while True:
        sets = list(itertools.islice(params_it, size))
        if not sets:
            return
        n = len(sets)
        if how == "serial":
            args = {p: sets[0][p] for p in paths}
        else:
            args = _stack(tuple({p: s[p] for p in paths} for s in sets + [sets[0]] * (group - n)))
        del sets
        total, count = np.zeros(size), np.zeros(size)
        t = time.perf_counter()
        for batch in parallel.iter_batches(loaded.mesh, {"input_ids": ids, "attention_mask": mask}, batch_size):
            s, c = step(args, loaded.params, batch)
            total += np.asarray(s, np.float64)
            count += np.asarray(c, np.float64)
        seconds = (time.perf_counter() - t) / n
        del args
        for i in range(n):
            nll = total[i] / max(count[i], 1.0)
            yield {"nll": nll, "ppl": math.exp(nll) if nll < 700 else float("inf"), "tokens": int(count[i]),
                   "windows": len(ids), "seconds": seconds}
        if progress:
            progress(n)
