r"""Learn from weights: train one learner on a zoo and evaluate it on held-out family trees.

  python -m launch.probe --config configs/probe.py:nwpa --workdir runs/probe_nwpa
  python -m launch.probe --config configs/probe.py:weightnet --workdir runs/probe_weightnet
  python -m launch.probe --config configs/probe.py:stats_gbt --workdir runs/probe_stats_gbt
  python -m launch.probe --config configs/probe.py:nwpa,smoke --config.zoo=/tmp/zoo --workdir /tmp/probe  # tests

Variants: nwpa, weightnet, nfn (each also ``<name>_stats``: with the per-layer statistics fused in), weightnet_flat,
weightnet_canonical, weightnet_no_layer_types, stats_gbt, stats_mlp, pca_linear, flat_mlp; add ``,smoke`` for a
seconds-long run. The zoo is the digits zoo
(``python -m launch.make_zoo --config configs/zoo.py:digits --workdir runs/zoo_digits``).
Re-running with the same workdir resumes training from the last finished epoch. Model sizes are set for a
2-core CPU (an NWPA step on 32 digits-zoo networks takes ~40 ms there, bucketed); on a GPU raise
``--config.model.dim`` / ``layers``.
"""

import ml_collections

MULTI_RESOLUTION = ("nwpa_stats", "weightnet_stats", "nfn_stats")
LEARNERS = ("nwpa", "weightnet", "nfn", *MULTI_RESOLUTION, "weightnet_flat", "weightnet_canonical",
            "weightnet_no_layer_types", "stats_gbt", "stats_mlp", "pca_linear", "flat_mlp")


def model(variant: str) -> tuple[str, ml_collections.ConfigDict]:
    if variant in MULTI_RESOLUTION:
        # The structure learner with the per-layer statistics fused into its pooled embedding.
        name, m = model(variant.removesuffix("_stats"))
        m.stats = True
        return name, m
    m = ml_collections.ConfigDict()
    if variant == "nwpa":
        # max_input_tokens: a larger input layer (28x28 pixels) is read as per-neuron rows, not as nodes.
        m.update(dim=32, layers=2, heads=2, node_dropout=0.05, edge_dropout=0.1, dense=True, normalize=True, clip=8.0,
                 stats=False, max_input_tokens=256)
        return "nwpa", m
    if variant == "nfn":
        m.update(channels=16, layers=2, layer="auto", dim=64, normalize=True, clip=8.0, stats=False)
        return "nfn", m
    if variant.startswith("weightnet"):
        m.update(dim=32, layers=2, heads=2, edge_dim=8, dropout=0.0, mode="equivariant", layer_types=True, dense=True,
                 normalize=True, clip=8.0, stats=False, permute_augment=False, max_input_tokens=256)
        m.mode = {"weightnet_flat": "flat", "weightnet_canonical": "canonical"}.get(variant, "equivariant")
        m.layer_types = variant != "weightnet_no_layer_types"
        return "weightnet", m
    if variant == "stats_gbt":
        m.update(iters=300, lr=0.05, min_leaf=20)
    elif variant == "pca_linear":
        m.update(components=64, alpha=1.0, c=1.0, clip=8.0)
    elif variant in ("stats_mlp", "flat_mlp"):
        m.update(dim=256, layers=2, dropout=0.1, clip=8.0, permute_augment=False)
    else:
        raise ValueError(f"configs/probe.py: unknown variant {variant!r}; use one of {LEARNERS} (optionally ',smoke')")
    return variant, m


def get_config(arg: str = "nwpa") -> ml_collections.ConfigDict:
    variant, *flags = arg.split(",")
    c = ml_collections.ConfigDict()
    c.zoo = "runs/zoo_digits/zoo"
    c.variant = variant
    c.learner, c.model = model(variant)
    # epoch >= 1: untrained roots and each child's epoch-0 copy of its parent are left out.
    c.data = ml_collections.ConfigDict(dict(min_epoch=1, final_only=False, families=(), max_models=0, seed=0))
    # Whole family trees go to one side: a child starts from its parent's weights.
    c.split = ml_collections.ConfigDict(dict(kind="tree", fractions=(0.7, 0.15, 0.15), seed=0, held_out=""))
    c.tasks = ml_collections.ConfigDict(dict(architecture=1.0, test_acc=1.0, gen_gap=1.0, disparity=1.0,
                                             vulnerable=1.0, train_fraction=0.5, label_noise=0.5, imbalance=0.5,
                                             augment=0.5))
    # balance: learned per-task uncertainty weights (or "none"); criterion: early stopping on the sum of each task's
    # validation loss relative to its value at initialization (or "weighted": the plain weighted sum).
    c.train = ml_collections.ConfigDict(dict(epochs=40, batch_size=32, lr=1e-3, weight_decay=1e-4, warmup=0.05,
                                             clip=1.0, patience=8, seed=0, devices=1, halt_at=0,
                                             balance="uncertainty", criterion="relative"))
    c.permutation = ml_collections.ConfigDict(dict(networks=64, seed=0))
    if "smoke" in flags:
        c.data.min_epoch = 0
        c.split.kind = "model"
        c.split.fractions = (0.5, 0.25, 0.25)
        c.train.update(epochs=2, batch_size=8)
        c.permutation.networks = 4
        if c.learner in ("nwpa", "weightnet"):
            c.model.update(dim=16, layers=1, heads=2)
            if c.learner == "weightnet":
                c.model.edge_dim = 4
        elif c.learner == "nfn":
            c.model.update(channels=4, layers=1, dim=16)
        elif c.learner == "stats_gbt":
            c.model.update(iters=10, min_leaf=2)
        elif c.learner == "pca_linear":
            c.model.components = 4
        else:
            c.model.update(dim=16, layers=1)
    return c
