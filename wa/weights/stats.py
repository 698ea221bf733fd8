"""Weight statistics per layer (StatNN, Unterthiner et al. 2020): mean, variance and quantiles of every
layer's kernel and bias, in forward order. Invariant to hidden-neuron permutations by construction.

The patch transformer's "layers" are its weight matrices in forward order (embedding, position table, per
block query/key/value/out/mlp_in/mlp_out and the two LayerNorms, final LayerNorm, head); a LayerNorm's scale
plays the kernel's part and its shift the bias's.
"""

from __future__ import annotations

import numpy as np

from wa.zoo import archs

STATS = ("mean", "var", "q0", "q25", "q50", "q75", "q100")


def _stats(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).ravel()
    if a.size == 0:
        return np.zeros(len(STATS))
    return np.concatenate([[a.mean(), a.var()], np.quantile(a, [0.0, 0.25, 0.5, 0.75, 1.0])])


def tensors(params: dict, family: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, kernel, bias) per layer in forward order; the head last."""
    return archs.family(family).weight_tensors(params)


def n_layers(params: dict, family: str) -> int:
    return len(tensors(params, family))


def slots(params: dict, family: str, n_layers: int | None = None) -> list[tuple[str, tuple | None]]:
    """(tag, (name, kernel, bias) or None) per layer slot: the network's layers, padded with None to ``n_layers``
    (refusing to truncate) before the head, which is always last (tag "head"), so that networks of different depth
    share one feature space."""
    ls = tensors(params, family)
    n = n_layers or len(ls)
    if len(ls) > n:
        raise ValueError(f"{family} network has {len(ls)} layers, more than n_layers={n}")
    padded = ls[:-1] + [None] * (n - len(ls)) + ls[-1:]
    return [("head" if i == n - 1 else f"layer{i}", t) for i, t in enumerate(padded)]


def features(params: dict, family: str, n_layers: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(vector, names) over ``slots`` (padding: zeros)."""
    vec, names = [], []
    for tag, layer in slots(params, family, n_layers):
        for j, part in enumerate(("kernel", "bias")):
            v = np.zeros(len(STATS)) if layer is None else _stats(layer[1 + j])
            vec.append(v)
            names += [f"{tag}/{part}/{s}" for s in STATS]
    return np.concatenate(vec).astype(np.float32), names


def matrix(params: list, families, n_layers: int | None = None) -> tuple[np.ndarray, int]:
    """``features`` of many networks as one [networks, F] matrix, padded to ``n_layers`` (default: the deepest
    network's); returns the matrix and the depth used, so that later networks can share the feature space."""
    n = n_layers or max(len(tensors(p, f)) for p, f in zip(params, families, strict=True))
    return np.stack([features(p, f, n)[0] for p, f in zip(params, families, strict=True)]), n
