"""Permutation check: a learner's predictions for a network and for the same network with its hidden neurons
randomly permuted (``wa.weights.canonical``; the function is unchanged) must agree. The gap is the largest
absolute difference, in the task's own units for numbers and in probability for classes."""

from __future__ import annotations

import numpy as np

from wa.weights import canonical


def gaps(predict, params: list, families, activations, seed: int = 0) -> dict:
    """``predict(params, families, activations) -> {task: array}`` (regression in target units, classes as
    probabilities; other keys are ignored if not in both). Returns per-task and overall max / mean gaps."""
    rng = np.random.default_rng(seed)
    permuted = [canonical.permute(p, f, canonical.random_perms(p, f, rng))
                for p, f in zip(params, families, strict=True)]
    a, b = predict(params, families, activations), predict(permuted, families, activations)
    per = {}
    for task in a:
        if task == "embedding" or a[task] is None:
            continue
        d = np.abs(np.asarray(a[task], np.float64) - np.asarray(b[task], np.float64))
        d = d.reshape(len(params), -1).max(1)
        per[task] = {"max": float(d.max()), "mean": float(d.mean())}
    return {"max": max(v["max"] for v in per.values()), "tasks": per, "networks": len(params)}
