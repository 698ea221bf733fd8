"""Weight statistics per layer (StatNN, Unterthiner et al. 2020): mean, variance and quantiles of every
layer's kernel and bias, in forward order. Invariant to hidden-neuron permutations by construction."""

from __future__ import annotations

import numpy as np

from wa.weights.graph import layers

STATS = ("mean", "var", "q0", "q25", "q50", "q75", "q100")


def _stats(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).ravel()
    return np.concatenate([[a.mean(), a.var()], np.quantile(a, [0.0, 0.25, 0.5, 0.75, 1.0])])


def features(params: dict, family: str, n_layers: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(vector, names). ``n_layers`` pads (zeros) or refuses to truncate, so that networks of different depth
    share one feature space: the last layer (the head) always comes last."""
    ls = layers(params, family)
    n = n_layers or len(ls)
    if len(ls) > n:
        raise ValueError(f"{family} network has {len(ls)} layers, more than n_layers={n}")
    slots = ls[:-1] + [None] * (n - len(ls)) + ls[-1:]
    vec, names = [], []
    for i, layer in enumerate(slots):
        tag = "head" if i == n - 1 else f"layer{i}"
        for part in ("kernel", "bias"):
            v = np.zeros(len(STATS)) if layer is None else _stats(layer[2] if part == "kernel" else layer[3])
            vec.append(v)
            names += [f"{tag}/{part}/{s}" for s in STATS]
    return np.concatenate(vec).astype(np.float32), names
