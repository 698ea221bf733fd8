"""Multi-host start-up from flags or the environment (SLURM)."""

from __future__ import annotations

import os

import jax
from absl import logging

from wa import errors


class DistributedError(errors.ConfigError):
    pass


def _from_slurm():
    env = os.environ
    if "SLURM_JOB_ID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return None
    # jax.distributed auto-detects SLURM when called without arguments.
    return {}


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               cpu_collectives="gloo") -> bool:
    """Starts jax.distributed when asked to by arguments or SLURM; returns whether it did.

    Must run before the first JAX computation. Single-process runs do nothing.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise DistributedError(
            "multi-host needs all of --coordinator_address, --num_processes and --process_id; got "
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(
                f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
        if num_processes == 1:
            return False
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    else:
        kwargs = _from_slurm()
        if kwargs is None:
            return False
    # Only consulted by the CPU backend; GPU hosts use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
