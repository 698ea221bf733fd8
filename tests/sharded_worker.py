"""Loss and gradient of a checkpoint on a mesh; run as a subprocess by the sharding tests.

  python -m tests.sharded_worker CKPT MESH OUT.npz [COORD NUM_PROCESSES PROCESS_ID]
"""

import os
import sys

import jax

from wa import parallel


def main(ckpt, mesh_spec, out, coord=None, nproc=None, pid=None):
    if coord:
        parallel.initialize(coord, int(nproc), int(pid))
    import numpy as np
    from jax.experimental import multihost_utils

    from wa import models
    from wa.parallel import rules as rules_lib

    loaded = models.load(ckpt, mesh=mesh_spec)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, loaded.config.vocab_size, size=(8, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, 11:] = 0

    def rows(lo, hi):
        return {"input_ids": ids[lo:hi], "attention_mask": mask[lo:hi]}

    batch = parallel.make_global_batch(loaded.mesh, 8, rows)
    fn = jax.jit(jax.value_and_grad(lambda p, b: loaded.loss(p, b, jax.random.key(0))))
    loss, grads = fn(loaded.params, batch)
    ht = np.zeros(0)
    if os.environ.get("WA_TEST_TAIL") == "1":
        from wa.esa import select
        # Heavy-tail figures of the sharded gradients where they live: every process counts its own shards and the
        # histograms are summed across processes (on every process: a collective). Opt-in: each device compiles
        # the two passes (seconds on forced CPU devices).
        h = select.heavy_tail(rules_lib.flatten(grads), "kernel$", signed=True, on_device=True)
        ht = np.asarray([h["n"], h["median"], h["max"], h["top01pct_share"], h["gini"], h["gini_error"]])
    grads = multihost_utils.process_allgather(grads, tiled=True)
    specs = {k: str(v.spec) for k, v in rules_lib.flatten(loaded.shardings).items()}
    if jax.process_index() == 0:
        flat = {k: np.asarray(v) for k, v in rules_lib.flatten(grads).items()}
        np.savez(out, loss=np.asarray(float(loss)), n_devices=jax.device_count(), ht=ht,
                 n_processes=jax.process_count(), specs=str(specs), **{"g:" + k: v for k, v in flat.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
