"""Flags and start-up shared by every entry point: multi-host, forced host devices, logging."""

from __future__ import annotations

import importlib.util
import os

import jax
from absl import flags, logging

from wa import parallel

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host job.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_string("cpu_collectives", "gloo", "Collectives for multi-process CPU runs.")
flags.DEFINE_integer("host_devices", None,
                     "Expose this many CPU devices (like --xla_force_host_platform_device_count); "
                     "for trying meshes on a machine without accelerators.")

flags.DEFINE_string("jax_cache", os.path.join("~", ".cache", "wa", "jax"),
                    "Persistent compilation cache folder ('' to disable): re-runs skip XLA compiles.")
FLAGS = flags.FLAGS


def start() -> None:
    """Call first in ``main``: before any JAX computation starts its backend."""
    if FLAGS.jax_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.jax_cache))
    if FLAGS.host_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.host_devices)
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                        FLAGS.cpu_collectives)
    logging.info("devices: %d global (%d local) on %s; process %d of %d", jax.device_count(),
                 jax.local_device_count(), jax.default_backend(), jax.process_index(),
                 jax.process_count())


def is_chief() -> bool:
    return jax.process_index() == 0


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str):
    """``configs/<name>.py:<variant>`` as a ConfigDict, for jobs that run another job's config."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)
