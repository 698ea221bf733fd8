"""Zoo architectures (Flax linen): MLPs, the Small CNN Zoo CNN and variants, a tiny patch transformer.

An architecture is a frozen ``Arch``: family plus the shape knobs (depth, width, activation, patch). Models
that share an ``Arch`` share one compiled, vmapped training step. Parameter names are stable and readable
(``hidden_0/kernel``, ``conv_2/kernel``, ``block_0/attn/query/kernel``, ``head/kernel``) because the
weight-space learners read the structure back from them.

Dropout takes its rate as a call argument rather than a module attribute: the rate is a per-model
hyperparameter that varies across a vmapped population, so it must be a traced value.

Adding a family is one ``Module`` plus one entry in ``FAMILIES``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from wa import errors


class ArchError(errors.ConfigError):
    pass


ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "silu": nn.silu,
    "leaky_relu": nn.leaky_relu,
}

# Kernel initialisers by scheme name; every one is a variance-scaling law, so multiplying a sample by
# ``init_scale`` multiplies the standard deviation of that law by exactly ``init_scale``.
INIT_SCHEMES = {
    "he_normal": nn.initializers.he_normal(),
    "he_uniform": nn.initializers.he_uniform(),
    "glorot_normal": nn.initializers.glorot_normal(),
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "lecun_normal": nn.initializers.lecun_normal(),
    "lecun_uniform": nn.initializers.lecun_uniform(),
}


def dropout(x, rate, train: bool, module: nn.Module):
    """Inverted dropout with a (possibly traced) rate; identity when not training."""
    if not train:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
    return jnp.where(mask, x / keep, 0.0)


class Conv(nn.Module):
    """``nn.Conv(features, (k, k), strides=(s, s), padding="SAME")`` with the same parameters, computed as
    patches @ kernel. Under ``vmap`` over models this is one batched matrix product, which XLA:CPU runs many
    times faster than the grouped convolution that vmapping ``lax.conv`` produces."""
    features: int
    kernel_size: int = 3
    stride: int = 2
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        k, s = self.kernel_size, self.stride
        b, h, w, c = x.shape
        kernel = self.param("kernel", self.kernel_init, (k, k, c, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        ho, wo = -(-h // s), -(-w // s)
        ph, pw = max((ho - 1) * s + k - h, 0), max((wo - 1) * s + k - w, 0)
        xp = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        patches = jnp.stack([xp[:, i: i + (ho - 1) * s + 1: s, j: j + (wo - 1) * s + 1: s, :]
                             for i in range(k) for j in range(k)], axis=3).reshape(b, ho, wo, k * k * c)
        return patches @ kernel.reshape(k * k * c, self.features) + bias


class Net(nn.Module):
    """The fields every zoo family shares; ``__call__(x, train, rate)`` returns logits."""
    depth: int
    width: int
    activation: str
    n_classes: int
    kernel_init: nn.initializers.Initializer


class MLP(Net):
    @nn.compact
    def __call__(self, x, train: bool = False, rate=0.0):
        act = ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = act(nn.Dense(self.width, kernel_init=self.kernel_init, name=f"hidden_{i}")(x))
            x = dropout(x, rate, train, self)
        return nn.Dense(self.n_classes, kernel_init=self.kernel_init, name="head")(x)


class CNN(Net):
    """Unterthiner et al. 2020's Small CNN Zoo net: ``depth`` 3x3 stride-2 convs of ``width`` channels, global
    average pooling, one dense layer to the classes."""

    @nn.compact
    def __call__(self, x, train: bool = False, rate=0.0):
        act = ACTIVATIONS[self.activation]
        for i in range(self.depth):
            x = act(Conv(self.width, kernel_init=self.kernel_init, name=f"conv_{i}")(x))
            x = dropout(x, rate, train, self)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.n_classes, kernel_init=self.kernel_init, name="head")(x)


class Block(nn.Module):
    width: int
    heads: int
    activation: str
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, x, train: bool, rate):
        b, t, d = x.shape
        hd = d // self.heads
        h = nn.LayerNorm(name="ln_1")(x)
        q, k, v = (nn.Dense(d, kernel_init=self.kernel_init, name=n)(h).reshape(b, t, self.heads, hd)
                   for n in ("query", "key", "value"))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        x = x + dropout(nn.Dense(d, kernel_init=self.kernel_init, name="out")(o), rate, train, self)
        h = nn.LayerNorm(name="ln_2")(x)
        h = ACTIVATIONS[self.activation](nn.Dense(2 * d, kernel_init=self.kernel_init, name="mlp_in")(h))
        return x + dropout(nn.Dense(d, kernel_init=self.kernel_init, name="mlp_out")(h), rate, train, self)


class PatchTransformer(Net):
    """Non-overlapping ``patch``x``patch`` patches, linear embedding + learned positions, ``depth`` pre-LN
    blocks (2 heads, MLP ratio 2), mean pooling, a dense head."""
    patch: int = 4
    heads: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False, rate=0.0):
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
        x = nn.Dense(self.width, kernel_init=self.kernel_init, name="embed")(x)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        for i in range(self.depth):
            x = Block(self.width, self.heads, self.activation, self.kernel_init, name=f"block_{i}")(x, train, rate)
        x = nn.LayerNorm(name="ln_f")(x.mean(axis=1))
        return nn.Dense(self.n_classes, kernel_init=self.kernel_init, name="head")(x)


FAMILIES = {"mlp": MLP, "cnn": CNN, "transformer": PatchTransformer}


@dataclasses.dataclass(frozen=True)
class Arch:
    family: str
    depth: int
    width: int
    activation: str
    patch: int = 4

    @property
    def layout_id(self) -> str:
        """Names the parameter layout: models with equal ids store into one weight array."""
        s = f"{self.family}-d{self.depth}-w{self.width}"
        return s + f"-p{self.patch}" if self.family == "transformer" else s

    @property
    def id(self) -> str:
        return f"{self.layout_id}-{self.activation}"

    def check(self, shape: tuple[int, int, int] | None = None) -> None:
        """Raises ArchError naming the bad field before anything is compiled."""
        if self.family not in FAMILIES:
            raise ArchError(f"unknown architecture family {self.family!r}; choose one of {sorted(FAMILIES)}")
        if self.activation not in ACTIVATIONS:
            raise ArchError(f"unknown activation {self.activation!r} for {self.layout_id}; "
                            f"choose one of {sorted(ACTIVATIONS)}")
        if self.depth < (0 if self.family == "mlp" else 1) or self.width < 1:
            raise ArchError(f"{self.layout_id}: depth and width must be positive")
        if self.family == "transformer":
            if self.width % 2:
                raise ArchError(f"{self.layout_id}: width must be even (2 attention heads)")
            if shape is not None and (shape[0] % self.patch or shape[1] % self.patch):
                raise ArchError(f"{self.layout_id}: patch {self.patch} does not tile {shape[0]}x{shape[1]} images")

    def module(self, n_classes: int, init_scheme: str = "he_normal") -> nn.Module:
        if init_scheme not in INIT_SCHEMES:
            raise ArchError(f"unknown init scheme {init_scheme!r}; choose one of {sorted(INIT_SCHEMES)}")
        kw = dict(depth=self.depth, width=self.width, activation=self.activation, n_classes=n_classes,
                  kernel_init=INIT_SCHEMES[init_scheme])
        if self.family == "transformer":
            kw["patch"] = self.patch
        return FAMILIES[self.family](**kw)

    def describe(self) -> dict:
        return {"family": self.family, "depth": self.depth, "width": self.width, "activation": self.activation,
                **({"patch": self.patch} if self.family == "transformer" else {})}
