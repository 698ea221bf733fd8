"""Device meshes from config axes such as ``"data:1,fsdp:-1"`` or ``{"data": 2, "model": 4}``."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from wa import errors


class MeshError(errors.ConfigError):
    pass


AXES = ("data", "fsdp", "model")   # the axes wa's partition rules and batch shardings name


def parse_axes(spec) -> dict[str, int]:
    """Turns ``"data:1,fsdp:-1"``, a mapping or a ConfigDict into an ordered {axis: size}."""
    if isinstance(spec, str):
        axes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, size = part.partition(":")
            if not sep or not name:
                raise MeshError(f"mesh {spec!r}: expected 'axis:size' pairs like 'data:1,fsdp:-1', got {part!r}")
            try:
                axes[name.strip()] = int(size)
            except ValueError:
                raise MeshError(f"mesh {spec!r}: size of axis {name!r} must be an integer, got {size!r}") from None
    elif isinstance(spec, Mapping) or hasattr(spec, "items"):
        axes = {str(k): int(v) for k, v in spec.items()}
    else:
        raise MeshError(f"mesh must be a string like 'data:1,fsdp:-1' or a mapping, got {spec!r}")
    if not axes:
        raise MeshError(f"mesh {spec!r} names no axes")
    unknown = [k for k in axes if k not in AXES]
    if unknown:
        # An axis no partition rule names would silently replicate everything over its devices.
        raise MeshError(f"mesh {spec!r}: unknown axis {unknown[0]!r}; wa's partition rules use {', '.join(AXES)}")
    return axes


def resolve_axes(spec, n_devices: int) -> dict[str, int]:
    """Fills the one ``-1`` axis with the devices left and checks the product."""
    axes = parse_axes(spec)
    free = [k for k, v in axes.items() if v == -1]
    bad = [k for k, v in axes.items() if v == 0 or v < -1]
    if bad:
        raise MeshError(f"mesh {spec!r}: axis {bad[0]!r} has size {axes[bad[0]]}; sizes are positive or -1")
    if len(free) > 1:
        raise MeshError(f"mesh {spec!r}: only one axis may be -1 ('the rest'), got {free}")
    fixed = int(np.prod([v for v in axes.values() if v != -1]))
    if free:
        if n_devices % fixed:
            raise MeshError(
                f"mesh {spec!r}: the fixed axes use {fixed} devices, which does not divide the "
                f"{n_devices} devices available")
        axes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise MeshError(f"mesh {spec!r} has {fixed} devices but {n_devices} are available")
    return axes


def make_mesh(spec="data:1,fsdp:-1", devices=None) -> Mesh:
    """A Mesh over all (global) devices; processes stay contiguous along the mesh."""
    devices = jax.devices() if devices is None else list(devices)
    axes = resolve_axes(spec, len(devices))
    # Auto axis types keep the usual GSPMD propagation: shardings come from in/out specs.
    return jax.make_mesh(tuple(axes.values()), tuple(axes), devices=devices,
                         axis_types=(AxisType.Auto,) * len(axes))


def describe(mesh: Mesh) -> str:
    return ",".join(f"{k}:{v}" for k, v in mesh.shape.items())
