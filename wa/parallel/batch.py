"""Batches sharded along the data axes; each process supplies only its own rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wa import errors

DATA_AXES = ("data", "fsdp")


class BatchError(errors.ConfigError):
    pass


def batch_axes(mesh: Mesh, axes: Sequence[str] = DATA_AXES) -> tuple[str, ...]:
    return tuple(a for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, ndim: int = 2, axes: Sequence[str] = DATA_AXES) -> NamedSharding:
    ax = batch_axes(mesh, axes)
    return NamedSharding(mesh, P(ax if ax else None, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, axes: Sequence[str] = DATA_AXES) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh, axes)]))


def local_rows(sharding: NamedSharding, global_batch: int, ndim: int = 2) -> tuple[int, int]:
    """The contiguous range of global rows this process's devices hold."""
    shape = (global_batch,) + (1,) * (ndim - 1)
    idx = sharding.addressable_devices_indices_map(shape).values()
    starts = [s[0].start or 0 for s in idx]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in idx]
    lo, hi = min(starts), max(stops)
    held = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops, strict=True)})
    if held != hi - lo:
        raise BatchError("this process's batch rows are not contiguous; use a mesh whose data axes "
                         "keep each process's devices together")
    return lo, hi


def check_batch_size(mesh: Mesh, global_batch: int, axes: Sequence[str] = DATA_AXES):
    n = data_parallel_size(mesh, axes)
    if global_batch % n:
        raise BatchError(f"batch size {global_batch} is not divisible by the {n} data-parallel "
                         f"shards of mesh axes {batch_axes(mesh, axes)}")


def make_global_batch(mesh: Mesh, global_batch: int, rows: Callable[[int, int], dict],
                      axes: Sequence[str] = DATA_AXES) -> dict:
    """Builds a global batch from ``rows(lo, hi)``, called only for this process's rows.

    ``rows`` returns a dict of numpy arrays with leading dimension ``hi - lo``.
    """
    check_batch_size(mesh, global_batch, axes)
    lo, hi = local_rows(batch_sharding(mesh, 2, axes), global_batch)
    out = {}
    for k, v in rows(lo, hi).items():
        v = np.asarray(v)
        sharding = batch_sharding(mesh, v.ndim, axes)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
    return out


def iter_batches(mesh: Mesh, arrays: dict[str, np.ndarray], batch_size: int, axes: Sequence[str] = DATA_AXES):
    """Global batches over the rows of ``arrays``; the last is padded with zero rows.

    Padding rows are all zeros, so a mask among ``arrays`` (``attention_mask``) marks them as
    empty. Each process slices only its own rows of each batch.
    """
    check_batch_size(mesh, batch_size, axes)
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        def rows(lo, hi, start=start):
            sel = np.arange(start + lo, start + hi)
            ok = sel < n
            sel = np.where(ok, sel, 0)
            return {k: v[sel] * ok.reshape((-1,) + (1,) * (v.ndim - 1)).astype(v.dtype) for k, v in arrays.items()}
        yield make_global_batch(mesh, batch_size, rows, axes)
