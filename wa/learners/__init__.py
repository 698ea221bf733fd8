"""Learners that read weights: NWPA (graph network), WeightNet (transformer over neuron tokens), NFN, baselines.

A config names its learner by string. Adding one is one module here holding its class and its
``base.register(base.Entry(...))`` (its default and smoke settings, whether it reads structure, its ablations):
every module of this package is imported below, so the record is all configs, the launcher and the benchmark need.
"""

import importlib
import pkgutil

from wa.learners.base import LEARNERS, Entry, LearnerError, register, variants

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LEARNERS", "Entry", "LearnerError", "get", "register", "variants"]


def get(name: str, cfg, targets, n_devices: int = 1):
    if name not in LEARNERS:
        raise LearnerError(f"unknown learner {name!r}; known: {sorted(LEARNERS)}")
    return LEARNERS[name].cls(cfg, targets, n_devices)
