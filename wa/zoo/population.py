"""Train N models of one architecture at once: ``jax.vmap`` over parameters, optimizer states, data orders and
per-model hyperparameters, with the population axis sharded over the local devices.

What varies per model inside one compiled step (all traced, so one compile serves the population):
learning rate, weight decay, dropout rate, optimizer (SGD with momentum 0.9, Adam, RMSProp: each model's
update is optax's own transform, selected by an integer), augmentation (random shifts of up to ``augment``
pixels), its training pool (a boolean mask over the training set: train fraction, class imbalance, class
subsets), its training labels (label noise) and which of its images carry a backdoor trigger (BadNets: the
trigger is stamped on a model's poisoned images before augmentation, their labels already set to its target
class by the plan). Initialisation scheme and scale are applied once, at init.

An *epoch* is ``len(train set) // batch_size`` steps for every model, whatever the size of its pool: models
with a smaller pool revisit its examples more often. With ``epoch = "pool"`` (``wa.zoo.build``) it is one pass
over the model's own pool instead (``pool // batch_size`` steps, the last partial batch dropped, as Keras with
``drop_remainder``); such zoos train models of one train fraction per unit. Within an epoch a model walks a fresh
random order of its own pool (cycled to fill the epoch), drawn from its own key.

Weight decay is L2 added to the gradient (``optax.add_decayed_weights`` before the optimizer), the classic
form every optimizer here shares.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wa import errors
from wa.zoo import archs as archs_lib

OPTIMIZERS = {
    "sgd": lambda: optax.trace(decay=0.9),
    "sgd_plain": optax.identity,      # no momentum: Keras' "sgd", the Small CNN Zoo's
    "adam": lambda: optax.scale_by_adam(),
    "rmsprop": lambda: optax.scale_by_rms(decay=0.9),
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)

# Per-model hyperparameters that enter the traced step, and their dtypes.
HPARAMS = {"lr": np.float32, "weight_decay": np.float32, "dropout": np.float32, "optimizer": np.int32,
           "augment": np.int32}


class PopulationError(errors.ConfigError):
    pass


def select_transform(kind, transforms: list[optax.GradientTransformation]) -> optax.GradientTransformation:
    """Every transform updates its own state; the update of transform ``kind`` (a traced int) is returned."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        outs = [t.update(updates, s, params) for t, s in zip(transforms, state, strict=True)]
        pick = lambda *u: jnp.select([kind == i for i in range(len(u))], list(u))  # noqa: E731
        chosen = jax.tree.map(pick, *[o[0] for o in outs])
        return chosen, tuple(o[1] for o in outs)

    return optax.GradientTransformation(init, update)


DECAY = ("all", "kernels")


def _kernels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def optimizer(hp: dict, decay: str = "all") -> optax.GradientTransformation:
    """The update rule of one model; ``hp`` values may be traced. ``decay="kernels"``: weight decay on the kernels
    only, as a Keras ``kernel_regularizer`` adds it (an L2 penalty λ·Σw² is weight decay 2λ on the kernels)."""
    return optax.chain(optax.add_decayed_weights(hp["weight_decay"], mask=_kernels if decay == "kernels" else None),
                       select_transform(hp["optimizer"], [OPTIMIZERS[n]() for n in OPTIMIZER_NAMES]),
                       optax.scale(-hp["lr"]))


def shift(x, max_shift, key, pad: int):
    """Moves each image by an integer offset in [-max_shift, max_shift]^2, zero fill; static ``pad`` >= max_shift."""
    if pad == 0:
        return x
    b, h, w, c = x.shape
    u = jax.random.uniform(key, (b, 2))
    off = jnp.floor(u * (2 * max_shift + 1)).astype(jnp.int32) - max_shift + pad
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(xp, off)


@dataclasses.dataclass(frozen=True)
class Trigger:
    """The BadNets trigger (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
    Supply Chain"): a ``patch`` x ``patch`` checkerboard of white and black pixels (white at the corner) stamped
    ``margin`` pixels in from the bottom-right corner of an image in [0, 1], every channel alike."""
    patch: int = 3
    margin: int = 1

    def check(self, shape: tuple[int, int, int]) -> None:
        h, w, _ = shape
        if self.patch < 1 or self.margin < 0 or self.patch + self.margin > min(h, w):
            raise PopulationError(f"backdoor trigger patch {self.patch}, margin {self.margin}: expected patch >= 1, "
                                  f"margin >= 0 and patch + margin <= {min(h, w)} (the {h}x{w} images)")

    def arrays(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(where [H, W, 1] in {0, 1}, value [H, W, 1]) on images of ``shape``."""
        h, w, _ = shape
        where = np.zeros((h, w, 1), np.float32)
        value = np.zeros((h, w, 1), np.float32)
        r0, c0 = h - self.margin - self.patch, w - self.margin - self.patch
        i, j = np.meshgrid(np.arange(self.patch), np.arange(self.patch), indexing="ij")
        where[r0:r0 + self.patch, c0:c0 + self.patch, 0] = 1.0
        # White where the pixel's parity matches the bottom-right one's.
        value[r0:r0 + self.patch, c0:c0 + self.patch, 0] = ((i + j) % 2 == 0).astype(np.float32)
        return where, value

    def stamp(self, x):
        """``x`` [..., H, W, C] (numpy or jax) with the trigger on every image."""
        where, value = self.arrays(tuple(x.shape[-3:]))
        return x * (1.0 - where) + where * value


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@dataclasses.dataclass(eq=False)
class Population:
    """The compiled training and evaluation functions for one architecture on one data set."""
    arch: archs_lib.Arch
    n_classes: int
    image_shape: tuple[int, int, int]
    n_train: int
    batch_size: int = 32
    max_shift: int = 2
    mesh: Mesh | None = None
    input_range: tuple[float, float] = (0.0, 1.0)   # the networks see images mapped from [0, 1] to this range
    decay: str = "all"                              # weight decay on every parameter, or "kernels" only
    trigger: Trigger | None = None                  # stamped on each model's poisoned images (``epoch(poison=)``)

    def __post_init__(self):
        self.arch.check(self.image_shape)
        if self.batch_size > self.n_train:
            raise PopulationError(f"batch_size {self.batch_size} exceeds the {self.n_train} training images")
        if self.decay not in DECAY:
            raise PopulationError(f"decay {self.decay!r}: choose one of {DECAY}")
        lo, hi = self.input_range
        if not lo < hi:
            raise PopulationError(f"input_range {tuple(self.input_range)}: expected (low, high) with low < high")
        if self.trigger is not None:
            self.trigger.check(self.image_shape)
        self.steps_per_epoch = self.n_train // self.batch_size
        self.module = self.arch.module(self.n_classes)
        if self.mesh is None:
            self.mesh = Mesh(np.array(jax.local_devices()), ("pop",))
        self._pop = NamedSharding(self.mesh, P("pop"))
        self._rep = NamedSharding(self.mesh, P())
        self._init = {}
        self._opt_init = jax.jit(jax.vmap(optimizer({"weight_decay": 0.0, "optimizer": 0, "lr": 0.0}, self.decay).init))
        self._epoch = jax.jit(jax.vmap(self._epoch_one, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None)),
                              donate_argnums=(0, 1, 2), static_argnums=(8,))

    # ---- placement ---------------------------------------------------------------------------------
    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def check_size(self, n: int, what: str = "population") -> None:
        if n % self.n_devices:
            raise PopulationError(f"{what} of {n} models does not divide over the {self.n_devices} devices of the "
                                  f"'pop' mesh axis; use a population size that is a multiple of {self.n_devices}")

    def shard(self, tree):
        """Leading (model) axis over the devices."""
        self.check_size(len(jax.tree.leaves(tree)[0]))
        return jax.device_put(tree, self._pop)

    def replicate(self, x):
        return jax.device_put(x, self._rep)

    # ---- init --------------------------------------------------------------------------------------
    def _init_fn(self, scheme: str):
        if scheme not in self._init:
            module = self.arch.module(self.n_classes, scheme)
            dummy = jnp.zeros((1, *self.image_shape), jnp.float32)
            self._init[scheme] = jax.jit(jax.vmap(lambda k: module.init(k, dummy)["params"]))
        return self._init[scheme]

    def init(self, keys: np.ndarray, schemes: list[str], scales: np.ndarray):
        """Parameters of len(keys) models: kernels drawn from ``schemes[i]`` times ``scales[i]``, biases zero."""
        keys = np.asarray(keys)
        out = None
        for scheme in sorted(set(schemes)):
            idx = np.array([i for i, s in enumerate(schemes) if s == scheme])
            p = jax.tree.map(np.asarray, self._init_fn(scheme)(jnp.asarray(keys[idx])))
            if out is None:
                out = jax.tree.map(lambda a: np.zeros((len(keys), *a.shape[1:]), a.dtype), p)
            for o, a in zip(jax.tree.leaves(out), jax.tree.leaves(p), strict=True):
                o[idx] = a
        flat = traverse_util.flatten_dict(out)
        scales = np.asarray(scales, np.float32)
        for k, v in flat.items():
            if k[-1] == "kernel":
                flat[k] = v * scales.reshape(-1, *([1] * (v.ndim - 1)))
        return traverse_util.unflatten_dict(flat)

    def opt_init(self, params):
        """Optimizer states of a population; their structure does not depend on the hyperparameters."""
        return self._opt_init(params)

    # ---- one epoch of one model (vmapped by the caller) --------------------------------------------------
    def apply(self, params, x, train=False, rate=0.0, rngs=None):
        """Logits of one model on images in [0, 1] (mapped to ``input_range`` first)."""
        lo, hi = self.input_range
        if (lo, hi) != (0.0, 1.0):
            x = lo + (hi - lo) * x
        return self.module.apply({"params": params}, x, train=train, rate=rate, rngs=rngs)

    def loss(self, params, x, y, train=False, rate=0.0, key=None):
        rngs = {"dropout": key} if train else None
        return cross_entropy(self.apply(params, x, train, rate, rngs), y).mean()

    def _epoch_one(self, params, opt_state, key, hp, mask, labels, poison, images, steps):
        s, b = steps, self.batch_size
        key, k_order = jax.random.split(key)
        order = jnp.argsort(jnp.where(mask, jax.random.uniform(k_order, mask.shape), 2.0))
        pool = jnp.maximum(mask.sum(), 1)
        idx = order[jnp.arange(s * b) % pool].reshape(s, b)
        tx = optimizer(hp, self.decay)

        def step(carry, ib):
            params, opt_state, key = carry
            key, k_drop, k_aug = jax.random.split(key, 3)
            x = images[ib]
            if self.trigger is not None:
                x = jnp.where(poison[ib][:, None, None, None], self.trigger.stamp(x), x)
            x = shift(x, hp["augment"], k_aug, self.max_shift)
            loss, grads = jax.value_and_grad(self.loss)(params, x, labels[ib], True, hp["dropout"], k_drop)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), loss

        (params, opt_state, key), losses = jax.lax.scan(step, (params, opt_state, key), idx)
        return params, opt_state, key, losses.mean()

    def epoch(self, params, opt_state, keys, hp: dict, mask, labels, images, steps: int | None = None, poison=None):
        """One epoch for every model: ``steps`` batches (default ``steps_per_epoch``, a pass over the whole training
        set). All but ``images`` (replicated) carry the model axis first; ``poison`` [N, N_train] bool: the images
        that get the trigger (none by default)."""
        if poison is None:
            poison = jnp.zeros(mask.shape, bool)
        return self._epoch(params, opt_state, keys, hp, mask, labels, poison, images, steps or self.steps_per_epoch)


def hparams_arrays(rows: list[dict]) -> dict:
    """Per-model hyperparameter dicts -> the arrays the traced step reads."""
    out = {}
    for k, dt in HPARAMS.items():
        vals = [r[k] for r in rows]
        if k == "optimizer":
            bad = [v for v in vals if v not in OPTIMIZER_NAMES]
            if bad:
                raise PopulationError(f"unknown optimizer {bad[0]!r}; choose one of {list(OPTIMIZER_NAMES)}")
            vals = [OPTIMIZER_NAMES.index(v) for v in vals]
        out[k] = np.asarray(vals, dt)
    return out
