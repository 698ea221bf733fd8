r"""Dry-run memory plan for a loss-and-gradient step, ESA's Hutchinson step and its activation capture;
prints one JSON line.

  python -m launch.plan --config configs/plan.py:llama3_8b [--config.mesh=data:2,fsdp:4]
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import flags

from launch import common
from wa import errors, parallel, report, runs
from wa.esa import plan

_CONFIG = common.config_flag("configs/plan.py:llama3_8b", "Plan config.")
flags.DEFINE_string("workdir", None, "Also write plan.json here.")
FLAGS = flags.FLAGS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def main(argv):
    del argv
    cfg = _CONFIG.value
    for k in ("param_dtype", "compute_dtype"):
        if cfg[k] not in DTYPES:
            raise errors.ConfigError(f"--config.{k}={cfg[k]!r}: expected one of {sorted(DTYPES)}")
    errors.check_values(cfg, {"num_devices": errors.COUNT, "batch_size": errors.COUNT, "seq_len": errors.COUNT})
    parallel.mesh.parse_axes(cfg.mesh)
    workdir = runs.writable(FLAGS.workdir, "plan") if FLAGS.workdir else None
    # Without accelerators, stand in with as many CPU devices (must precede backend start-up).
    if not FLAGS.host_devices and jax.config.jax_platforms in (None, "", "cpu"):
        FLAGS.host_devices = cfg.num_devices
    common.start()
    devices = jax.devices()
    if len(devices) < cfg.num_devices:
        raise errors.ConfigError(f"--config.num_devices={cfg.num_devices} but only {len(devices)} "
                         f"{jax.default_backend()} devices exist")
    mesh = parallel.make_mesh(cfg.mesh, devices[:cfg.num_devices])
    if cfg.remat not in ("none", "full", "dots"):
        raise errors.ConfigError(f"--config.remat={cfg.remat!r}: expected none, full or dots")
    errors.check_values(cfg, {"loss_chunk": errors.COUNT, "hvp_probes": errors.NON_NEGATIVE})
    result = plan.plan(plan.hf_config(cfg.hf_config.to_dict()), mesh, cfg.batch_size, cfg.seq_len,
                       DTYPES[cfg.param_dtype], DTYPES[cfg.compute_dtype], cfg.remat, scan=cfg.scan,
                       loss_chunk=cfg.loss_chunk, hvp_probes=cfg.hvp_probes, capture=cfg.capture,
                       moe=cfg.get("moe", "dense"))
    if common.is_chief():
        line = json.dumps(result)
        print(line)
        if workdir:
            report.write_json(os.path.join(workdir, "plan.json"), result)


if __name__ == "__main__":
    common.run(main)
