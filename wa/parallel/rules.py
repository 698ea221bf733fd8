"""Ordered ``(regex on parameter path, PartitionSpec)`` rules; first match wins.

Paths are the checkpoint's names joined by ``/`` (``model/layers/3/mlp/up_proj/kernel``);
a rule matches when ``re.search`` finds its regex in the path. Axis names that the mesh
lacks are dropped from a spec, so a family's default rules (written for ``fsdp`` and
``model``) serve any mesh. Unmatched parameters are replicated and logged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wa import errors

Rules = Sequence[tuple[str, P]]


class PartitionError(errors.ConfigError):
    pass


def path_str(keypath) -> str:
    """'a/b/kernel' for a jax key path."""
    return jax.tree_util.keystr(tuple(keypath), simple=True, separator="/")


def flatten(tree) -> dict[str, object]:
    """{'a/b/kernel': leaf} in tree order."""
    return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflattener(tree):
    """``flat -> tree``: a ``flatten``-style dict (every path of ``tree``) back in ``tree``'s structure, with the
    order and structure read once."""
    order = list(flatten(tree))
    treedef = jax.tree_util.tree_structure(tree)
    return lambda flat: jax.tree_util.tree_unflatten(treedef, [flat[p] for p in order])


def _axes_of(entry):
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def fit_spec(spec: P, mesh: Mesh, ndim: int) -> P:
    """Drops axes the mesh lacks and trailing entries past ``ndim``."""
    out = []
    for entry in tuple(spec)[:ndim]:
        kept = tuple(a for a in _axes_of(entry) if a in mesh.shape)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def match(rules: Rules, path: str) -> tuple[int, str, P] | None:
    for i, (regex, spec) in enumerate(rules):
        if re.search(regex, path):
            return i, regex, spec
    return None


def check_divisible(path: str, shape, spec: P, mesh: Mesh, regex: str | None = None):
    for dim, entry in enumerate(spec):
        axes = _axes_of(entry)
        if not axes:
            continue
        n = int(np.prod([mesh.shape[a] for a in axes]))
        if dim >= len(shape) or shape[dim] % n:
            size = shape[dim] if dim < len(shape) else "missing"
            raise PartitionError(
                f"rule {regex!r} -> {spec} puts dimension {dim} (size {size}) of parameter {path!r} "
                f"(shape {tuple(shape)}) on mesh axes {axes} of total size {n}; {size} is not divisible "
                f"by {n}. Change the mesh or add an earlier rule for this path.")


def specs_for(tree, rules: Rules, mesh: Mesh, log_unmatched: bool = True):
    """PartitionSpec per leaf (same structure as ``tree``), validated against the mesh."""
    unmatched = []

    def one(keypath, leaf):
        path = path_str(keypath)
        m = match(rules, path)
        if m is None:
            unmatched.append(path)
            return P()
        _, regex, spec = m
        spec = fit_spec(spec, mesh, len(leaf.shape))
        check_divisible(path, leaf.shape, spec, mesh, regex)
        return spec

    specs = jax.tree_util.tree_map_with_path(one, tree)
    if unmatched and log_unmatched:
        logging.info("partition rules matched no rule for %d parameters (replicated): %s",
                     len(unmatched), ", ".join(unmatched))
    return specs


def shardings_for(tree, rules: Rules, mesh: Mesh, log_unmatched: bool = True):
    specs = specs_for(tree, rules, mesh, log_unmatched)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def bytes_per_device(shape, dtype, spec: P, mesh: Mesh) -> int:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    for entry in spec:
        for a in _axes_of(entry):
            n //= mesh.shape[a]
    return n
