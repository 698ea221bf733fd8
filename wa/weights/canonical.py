"""Hidden-neuron permutations: apply one, sort neurons into a canonical order, or align to a reference.

Permuting the units of a hidden layer (its kernel's output axis and bias) together with the next layer's
input axis leaves the network's function unchanged; these are the symmetries a weight-space learner must
respect. A family's permutable layers are (producer, consumer) pairs of parameter paths (``ZooFamily.pairs`` in
``wa.zoo.archs``): for the MLP and CNN each hidden layer and the layer after it; for the patch transformer the
hidden units of every block's MLP (``mlp_in`` → ``mlp_out``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from wa.zoo import archs


def pairs(params: dict, family: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(producer path, consumer path) for every permutable hidden layer, in forward order."""
    return archs.family(family).permutable_pairs(params)


def _get(params: dict, path: tuple[str, ...]) -> dict:
    for k in path:
        params = params[k]
    return params


def _copy(params: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in params.items()}


def permute(params: dict, family: str, perms: list[np.ndarray]) -> dict:
    """A copy of ``params`` with hidden layer i's units reordered by ``perms[i]`` (new unit k = old perms[i][k])."""
    ps = pairs(params, family)
    if len(perms) != len(ps):
        raise ValueError(f"{family} with {len(ps)} permutable hidden layers needs {len(ps)} permutations, "
                         f"got {len(perms)}")
    out = _copy(params)
    for (cur, nxt), p in zip(ps, perms, strict=True):
        c, n = _get(out, cur), _get(out, nxt)
        c["kernel"] = np.asarray(c["kernel"])[..., p]
        c["bias"] = np.asarray(c["bias"])[p]
        n["kernel"] = np.asarray(n["kernel"])[..., p, :]
    return out


def random_perms(params: dict, family: str, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.permutation(np.shape(_get(params, cur)["kernel"])[-1]) for cur, _ in pairs(params, family)]


def _incoming(params: dict, path: tuple[str, ...]) -> np.ndarray:
    """[units, fan_in * taps + 1]: each unit's incoming weights and bias."""
    layer = _get(params, path)
    kernel, bias = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
    fan_out = kernel.shape[-1]
    return np.concatenate([np.moveaxis(kernel, -1, 0).reshape(fan_out, -1), bias[:, None]], axis=1)


def _permute_layer(params: dict, family: str, i: int, p: np.ndarray) -> dict:
    perms = [np.arange(np.shape(_get(params, cur)["kernel"])[-1]) for cur, _ in pairs(params, family)]
    perms[i] = p
    return permute(params, family, perms)


def canonicalize(params: dict, family: str) -> dict:
    """Weight-norm canonical order: equal for any two hidden-neuron permutations of one network (ties aside)."""
    out = params
    for i, (cur, _) in enumerate(pairs(params, family)):
        inc = _incoming(out, cur)
        out = _permute_layer(out, family, i, np.argsort(-np.linalg.norm(inc, axis=1), kind="stable"))
    return out


def align(params: dict, reference: dict, family: str) -> dict:
    """Reorders ``params``' hidden units to best match ``reference`` (same architecture): layer by layer,
    Hungarian matching (``scipy.optimize.linear_sum_assignment``) on the inner product of incoming weights
    and biases, after the previous layer has been aligned."""
    out = params
    for i, (cur, _) in enumerate(pairs(params, family)):
        a, b = _incoming(out, cur), _incoming(reference, cur)
        rows, cols = linear_sum_assignment(-(b @ a.T))
        out = _permute_layer(out, family, i, cols[np.argsort(rows)])
    return out
