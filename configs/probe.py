r"""Learn from weights: train one learner on a zoo and evaluate it on held-out family trees.

  python -m launch.probe --config configs/probe.py:nwpa --workdir runs/probe_nwpa
  python -m launch.probe --config configs/probe.py:weightnet --workdir runs/probe_weightnet
  python -m launch.probe --config configs/probe.py:stats_gbt --workdir runs/probe_stats_gbt
  python -m launch.probe --config configs/probe.py:nwpa,smoke --config.zoo=/tmp/zoo --workdir /tmp/probe  # tests

Variants: nwpa, weightnet, nfn (each also ``<name>_stats``: with the per-layer statistics fused in), weightnet_axial
(attention along the neuron axes of each weight tensor), weightnet_flat, weightnet_canonical,
weightnet_no_layer_types, weightnet_axial_no_layer_types, stats_gbt, stats_mlp, pca_linear, flat_mlp, probegen
(runs each network on learned probes: not weights-only), probegen_nonlinear; add ``,smoke`` for a seconds-long run,
``,nfn_protocol`` for NFN's Small CNN Zoo protocol on an imported zoo, ``,per_task`` to predict each task from its
own best validation epoch, ``,curriculum`` for smaller networks first over the first 10 epochs, ``,self_norm`` to
scale each weight block by its own network's statistics (an unseen architecture is read like a seen one). The zoo
is the digits zoo (``python -m launch.make_zoo --config configs/zoo.py:digits --workdir runs/zoo_digits``).
Re-running with the same workdir resumes training from the last finished epoch. Model sizes are set for a
2-core CPU (an NWPA step on 32 digits-zoo networks takes ~40 ms there, bucketed); on a GPU raise
``--config.model.dim`` / ``layers``.
"""

import ml_collections

from wa import learners

# Each learner's settings, smoke settings and ablations are its record (``wa.learners``, beside its class).
VARIANTS = learners.variants()
LEARNERS = tuple(VARIANTS)
MULTI_RESOLUTION = tuple(v for v, (_, role, _) in VARIANTS.items() if role == "multi_resolution")


def model(variant: str) -> tuple[str, ml_collections.ConfigDict]:
    known = learners.variants()
    if variant not in known:
        raise ValueError(f"configs/probe.py: unknown variant {variant!r}; use one of {tuple(known)} (optionally "
                         "',smoke')")
    name, _, overrides = known[variant]
    return name, ml_collections.ConfigDict({**learners.LEARNERS[name].config, **overrides})


def get_config(arg: str = "nwpa") -> ml_collections.ConfigDict:
    variant, *flags = arg.split(",")
    c = ml_collections.ConfigDict()
    c.zoo = "runs/zoo_digits/zoo"
    c.variant = variant
    c.learner, c.model = model(variant)
    # epoch >= 1: untrained roots and each child's epoch-0 copy of its parent are left out.
    c.data = ml_collections.ConfigDict(dict(min_epoch=1, final_only=False, families=(), max_models=0, seed=0))
    # Whole family trees go to one side: a child starts from its parent's weights.
    # kind "column": a split recorded in the zoo (split.column's values train / val / test).
    c.split = ml_collections.ConfigDict(dict(kind="tree", fractions=(0.7, 0.15, 0.15), seed=0, held_out="",
                                             column="split"))
    c.tasks = ml_collections.ConfigDict(dict(architecture=1.0, test_acc=1.0, gen_gap=1.0, disparity=1.0,
                                             vulnerable=1.0, train_fraction=0.5, label_noise=0.5, imbalance=0.5,
                                             augment=0.5, backdoored=1.0))
    # balance: learned per-task uncertainty weights (or "none"); criterion: early stopping on the sum of each task's
    # validation loss relative to its value at initialization (or "weighted": the plain weighted sum); select
    # "per_task": every task predicted from its own best validation epoch, training on while any task improves;
    # curriculum: for that many epochs the smaller networks first (by parameter count), then all (0: off).
    c.train = ml_collections.ConfigDict(dict(epochs=40, batch_size=32, lr=1e-3, weight_decay=1e-4, warmup=0.05,
                                             clip=1.0, patience=8, seed=0, devices=1, halt_at=0,
                                             balance="uncertainty", criterion="relative", select="joint",
                                             curriculum=0))
    c.permutation = ml_collections.ConfigDict(dict(networks=64, seed=0))
    if "smoke" in flags:
        c.data.min_epoch = 0
        c.split.kind = "model"
        c.split.fractions = (0.5, 0.25, 0.25)
        c.train.update(epochs=2, batch_size=8)
        c.permutation.networks = 4
        c.model.update(learners.LEARNERS[c.learner].smoke)
    if "backdoor_only" in flags:
        # One task: is the network backdoored (a zoo built with data_characteristics.backdoor)?
        c.tasks = ml_collections.ConfigDict(dict(backdoored=1.0))
    if "per_task" in flags:
        c.train.select = "per_task"
    if "curriculum" in flags:
        c.train.curriculum = 10
    if "self_norm" in flags and "norm_scope" in c.model:   # the structure learners; the others scale features
        c.model.norm_scope = "self"
    if "nfn_protocol" in flags:
        # NFN's protocol on the Small CNN Zoo (Zhou et al. 2023; as imported by launch.import_zoo with its split
        # file): final checkpoints, NFN's fixed split, test accuracy alone, the epoch with the best validation τ.
        c.data.final_only = True
        c.split.update(kind="column", column="nfn_split")
        c.tasks = ml_collections.ConfigDict(dict(test_acc=1.0))
        c.train.criterion = "tau:test_acc"
        c.train.balance = "none"
    return c
