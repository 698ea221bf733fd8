"""Learners that read weights: NWPA (graph network), WeightNet (transformer over neuron tokens), baselines.

A config names its learner by string; adding one is adding a class here.
"""

from wa.learners import baselines, nfn, nwpa, weightnet
from wa.learners.base import LearnerError

LEARNERS = {
    "nwpa": nwpa.Learner,
    "weightnet": weightnet.Learner,
    "nfn": nfn.Learner,
    "stats_gbt": baselines.StatsGBT,
    "stats_mlp": baselines.StatsMLP,
    "pca_linear": baselines.PCALinear,
    "flat_mlp": baselines.FlatMLP,
}


def get(name: str, cfg, targets, n_devices: int = 1):
    if name not in LEARNERS:
        raise LearnerError(f"unknown learner {name!r}; known: {sorted(LEARNERS)}")
    return LEARNERS[name](cfg, targets, n_devices)
