"""Meshes, partition rules, batch sharding and multi-host start-up."""

from wa.parallel.batch import (
    BatchError,
    batch_sharding,
    check_batch_size,
    data_parallel_size,
    iter_batches,
    local_rows,
    make_global_batch,
)
from wa.parallel.distributed import DistributedError, initialize
from wa.parallel.mesh import MeshError, describe, make_mesh, parse_axes, resolve_axes
from wa.parallel.rules import (
    PartitionError,
    bytes_per_device,
    flatten,
    match,
    path_str,
    shardings_for,
    specs_for,
)

__all__ = [
    "BatchError", "DistributedError", "MeshError", "PartitionError", "batch_sharding",
    "bytes_per_device", "check_batch_size", "data_parallel_size", "describe", "flatten",
    "initialize", "iter_batches", "local_rows", "make_global_batch", "make_mesh", "match", "parse_axes",
    "path_str", "resolve_axes", "shardings_for", "specs_for",
]
