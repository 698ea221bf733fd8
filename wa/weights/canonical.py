"""Hidden-neuron permutations: apply one, sort neurons into a canonical order, or align to a reference.

Permuting the units of a hidden layer (its kernel's output axis and bias) together with the next layer's
input axis leaves the network's function unchanged; these are the symmetries a weight-space learner must
respect. MLP and CNN zoo families; the permutation of layer ``i`` acts on ``hidden_i`` / ``conv_i``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from wa.weights.graph import layers


def _names(params: dict, family: str) -> list[str]:
    return [n for n, *_ in layers(params, family)]


def permute(params: dict, family: str, perms: list[np.ndarray]) -> dict:
    """A copy of ``params`` with hidden layer i's units reordered by ``perms[i]`` (new unit k = old perms[i][k])."""
    names = _names(params, family)
    if len(perms) != len(names) - 1:
        raise ValueError(f"{family} with {len(names) - 1} hidden layers needs {len(names) - 1} permutations, "
                         f"got {len(perms)}")
    out = {k: dict(v) for k, v in params.items()}
    for i, p in enumerate(perms):
        cur, nxt = names[i], names[i + 1]
        out[cur]["kernel"] = out[cur]["kernel"][..., p]
        out[cur]["bias"] = out[cur]["bias"][p]
        out[nxt]["kernel"] = out[nxt]["kernel"][..., p, :]
    return out


def random_perms(params: dict, family: str, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.permutation(k.shape[-1]) for _, _, k, _ in layers(params, family)[:-1]]


def _incoming(params: dict, name: str) -> np.ndarray:
    """[units, fan_in * taps + 1]: each unit of layer ``name``'s incoming weights and bias."""
    kernel, bias = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
    fan_out = kernel.shape[-1]
    return np.concatenate([np.moveaxis(kernel, -1, 0).reshape(fan_out, -1), bias[:, None]], axis=1)


def _permute_layer(params: dict, family: str, names: list[str], i: int, p: np.ndarray) -> dict:
    perms = [np.arange(np.asarray(params[n]["kernel"]).shape[-1]) for n in names[:-1]]
    perms[i] = p
    return permute(params, family, perms)


def canonicalize(params: dict, family: str) -> dict:
    """Weight-norm canonical order: equal for any two hidden-neuron permutations of one network (ties aside)."""
    out = params
    names = _names(params, family)
    for i in range(len(names) - 1):
        inc = _incoming(out, names[i])
        out = _permute_layer(out, family, names, i, np.argsort(-np.linalg.norm(inc, axis=1), kind="stable"))
    return out


def align(params: dict, reference: dict, family: str) -> dict:
    """Reorders ``params``' hidden units to best match ``reference`` (same architecture): layer by layer,
    Hungarian matching (``scipy.optimize.linear_sum_assignment``) on the inner product of incoming weights
    and biases, after the previous layer has been aligned."""
    out = params
    names = _names(params, family)
    for i in range(len(names) - 1):
        a, b = _incoming(out, names[i]), _incoming(reference, names[i])
        rows, cols = linear_sum_assignment(-(b @ a.T))
        out = _permute_layer(out, family, names, i, cols[np.argsort(rows)])
    return out
