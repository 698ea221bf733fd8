"""Scores of a checkpoint on a mesh; run as a subprocess by the ESA sharding tests.

  python -m tests.esa_worker CKPT MESH OUT.npz [COORD NUM_PROCESSES PROCESS_ID]
"""

import sys

import jax

from wa import parallel

METRICS = ("grad_x_weight", "grad_squared", "hutchinson_diag", "act_mag")


def main(ckpt, mesh_spec, out, coord=None, nproc=None, pid=None):
    if coord:
        parallel.initialize(coord, int(nproc), int(pid))
    import numpy as np
    from jax.experimental import multihost_utils

    from wa import models
    from wa.esa import scores, select

    loaded = models.load(ckpt, mesh=mesh_spec)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, loaded.config.vocab_size, size=(16, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[5, 8:] = 0
    batches = list(parallel.iter_batches(loaded.mesh, {"input_ids": ids, "attention_mask": mask}, 8))
    cal = scores.Calibration(loaded, batches, jax.random.key(7), probes=4, probe_chunk=2, progress=False)
    res = {}
    for m in METRICS:
        sc = multihost_utils.process_allgather(scores.compute(m, loaded.params, cal), tiled=True)
        sel, _ = select.top_k(sc, 5, "per_layer", signed=scores.SCORES[m].signed)
        for p, v in sc.items():
            res[f"{m}:{p}"] = np.asarray(v)
        res[f"{m}:topk"] = np.asarray(sorted(select.as_set(sel)), dtype=object).astype(str)
    if jax.process_index() == 0:
        np.savez(out, n_devices=jax.device_count(), n_processes=jax.process_count(), **res)


if __name__ == "__main__":
    main(*sys.argv[1:])
