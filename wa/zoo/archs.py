"""Zoo architectures (Flax linen): MLPs, the Small CNN Zoo CNN and variants, a tiny patch transformer.

An architecture is a frozen ``Arch``: family plus the shape knobs (depth, width, activation, and the family's
own knobs such as the transformer's patch). Models that share an ``Arch`` share one compiled, vmapped training
step. Parameter names are stable and readable (``hidden_0/kernel``, ``conv_2/kernel``, ``block_0/query/kernel``,
``head/kernel``) because the weight-space learners read the structure back from them.

Dropout takes its rate as a call argument rather than a module attribute: the rate is a per-model
hyperparameter that varies across a vmapped population, so it must be a traced value.

A family is one ``register(ZooFamily(...))`` in this file: its ``Module`` and everything the rest of wa asks of
it — its knobs and their checks, its layers in forward order, its permutable hidden layers, and its graph view
(``wa.weights.graph``, ``wa.weights.stats`` and ``wa.weights.canonical`` read these and know no family).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

# Kernel initialisers by scheme name; multiplying a sample by ``init_scale`` multiplies the standard deviation of
# the law by exactly ``init_scale``. The variance-scaling laws set their own standard deviation (``init_scale`` is
# a multiplier of it); ``random_normal`` and ``truncated_normal`` have standard deviation 1 before the scale (the
# truncated one: a unit normal cut at ±2, as Keras' TruncatedNormal), so their ``init_scale`` is the std itself
# (the Small CNN Zoo's ``init_std``); ``orthogonal`` (gain 1) is Keras' Orthogonal: the kernel reshaped to
# [fan_in·taps, fan_out] has orthonormal columns (or rows).
INIT_SCHEMES = {
    "he_normal": nn.initializers.he_normal(),
    "he_uniform": nn.initializers.he_uniform(),
    "glorot_normal": nn.initializers.glorot_normal(),
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "lecun_normal": nn.initializers.lecun_normal(),
    "lecun_uniform": nn.initializers.lecun_uniform(),
    "random_normal": nn.initializers.normal(1.0),
    "truncated_normal": nn.initializers.truncated_normal(1.0),
    "orthogonal": nn.initializers.orthogonal(),
}
NORMAL_SCHEMES = ("random_normal", "truncated_normal")   # their scale is their standard deviation


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
    padding: str = "SAME"     # or "VALID" (no zero padding: Keras' Conv2D default)

    @nn.compact
    def __call__(self, x):
        k, s = self.kernel_size, self.stride
        b, h, w, c = x.shape
        kernel = self.param("kernel", self.kernel_init, (k, k, c, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if self.padding == "VALID":
            ho, wo = (h - k) // s + 1, (w - k) // s + 1
            ph = pw = 0
        else:
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
    average pooling, one dense layer to the classes. ``valid=1``: convolutions without zero padding, as their
    Keras ``Conv2D`` layers (28x28 -> 13 -> 6 -> 2); 0 (default): "SAME" padding (28 -> 14 -> 7 -> 4)."""
    valid: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False, rate=0.0):
        act = ACTIVATIONS[self.activation]
        for i in range(self.depth):
            x = act(Conv(self.width, kernel_init=self.kernel_init, padding="VALID" if self.valid else "SAME",
                         name=f"conv_{i}")(x))
            x = dropout(x, rate, train, self)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.n_classes, kernel_init=self.kernel_init, name="head")(x)


class PoolCNN(Net):
    """The small CNN of Schürholt et al. 2022's Model Zoos (their ``CNN``): 5x5 convolution to 8 channels, 2x2
    max-pool, activation; 5x5 to 6, max-pool, activation; 2x2 to 4, activation; flatten (channel-major, as
    PyTorch flattens NCHW); dense to 20, activation; dense to the classes; all convolutions unpadded, stride 1
    (28x28 -> 24 -> 12 -> 8 -> 4 -> 3: 36 features). Dropout after every activation but the last. ``depth`` and
    ``width`` are fixed (3 and 8) and only name it."""

    @nn.compact
    def __call__(self, x, train: bool = False, rate=0.0):
        act = ACTIVATIONS[self.activation]
        for i, (ch, k, pool) in enumerate(((8, 5, True), (6, 5, True), (4, 2, False))):
            x = Conv(ch, kernel_size=k, stride=1, kernel_init=self.kernel_init, padding="VALID", name=f"conv_{i}")(x)
            if pool:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = dropout(act(x), rate, train, self)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        x = dropout(act(nn.Dense(20, kernel_init=self.kernel_init, name="hidden_0")(x)), rate, train, self)
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


def numbered(params: dict, prefix: str) -> list[str]:
    """``prefix_0``, ``prefix_1``, ... in numeric order (``hidden_10`` after ``hidden_9``)."""
    return sorted((k for k in params if k.startswith(prefix + "_")), key=lambda k: int(k.rsplit("_", 1)[1]))


@dataclasses.dataclass(frozen=True)
class Knob:
    """A shape knob of one family beyond depth, width and activation. ``shown``: always written in layout ids
    (``transformer-d1-w16-p4``); otherwise only where it differs from its default (``cnn-d3-w16-v1``), so a
    knob added later leaves the ids of existing layouts alone."""
    name: str
    default: int
    tag: str    # its letter in layout ids
    shown: bool = True


@dataclasses.dataclass(frozen=True)
class ZooFamily:
    """Everything wa asks of a zoo architecture family.

    A chain of dense / convolutional layers gives ``layers`` (params -> [(name, "dense" | "conv", kernel
    [fan_in, fan_out] or [k, k, fan_in, fan_out], bias)] in forward order, the head last); its statistics view,
    permutable pairs (each hidden layer with the next) and graph (one node group per layer) follow from it, and
    NFN can read it. Any other family gives those three itself:

    - ``tensors``: params -> [(name, kernel, bias)] of its weight tensors in forward order, the head last (a
      LayerNorm's scale plays the kernel's part);
    - ``pairs``: params -> [(producer path, consumer path)] of its permutable hidden layers, in forward order;
    - ``graph``: (builder, params, activation id) -> None, adding its nodes and edges to a
      ``wa.weights.graph`` builder; ``node_kinds`` names the node kinds it uses beyond input/dense/conv/output.

    ``permutable``: the node kinds whose units a hidden-neuron permutation relabels (augmentation reads it).
    ``check``: (arch, image shape or None) -> what is wrong with this architecture, or None.
    """
    name: str
    module: type
    layers: Callable | None = None
    tensors: Callable | None = None
    pairs: Callable | None = None
    graph: Callable | None = None
    node_kinds: tuple[str, ...] = ()
    permutable: tuple[str, ...] = ()
    knobs: tuple[Knob, ...] = ()
    min_depth: int = 1
    check: Callable | None = None

    def __post_init__(self):
        if self.layers is None and None in (self.tensors, self.pairs, self.graph):
            raise ValueError(f"zoo family {self.name!r}: give layers (a chain) or tensors, pairs and graph")

    @property
    def chain(self) -> bool:
        return self.layers is not None

    def weight_tensors(self, params: dict) -> list[tuple[str, object, object]]:
        if self.tensors is not None:
            return self.tensors(params)
        return [(n, k, b) for n, _, k, b in self.layers(params)]

    def permutable_pairs(self, params: dict) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        if self.pairs is not None:
            return self.pairs(params)
        names = [(n,) for n, *_ in self.layers(params)]
        return list(zip(names[:-1], names[1:], strict=True))


FAMILIES: dict[str, ZooFamily] = {}


def register(family: ZooFamily) -> ZooFamily:
    FAMILIES[family.name] = family
    return family


def chain_families() -> tuple[str, ...]:
    """The families whose networks are chains of dense / convolutional layers (``ZooFamily.layers``)."""
    return tuple(n for n, f in FAMILIES.items() if f.chain)


def family(name: str) -> ZooFamily:
    if name not in FAMILIES:
        raise ArchError(f"unknown architecture family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def chain_layers(prefix: str, kind: str) -> Callable:
    """``ZooFamily.layers`` of a chain whose layers are ``prefix_0``, ``prefix_1``, ... then ``head``."""
    def layers(params):
        return [(n, kind, params[n]["kernel"], params[n]["bias"]) for n in numbered(params, prefix)] + [
            ("head", "dense", params["head"]["kernel"], params["head"]["bias"])]
    return layers


def _transformer_tensors(params: dict) -> list:
    out = [("embed", params["embed"]["kernel"], params["embed"]["bias"]), ("pos", params["pos"], np.zeros(0))]
    for blk in numbered(params, "block"):
        b = params[blk]
        for name in ("ln_1", "query", "key", "value", "out", "ln_2", "mlp_in", "mlp_out"):
            kernel = b[name]["scale"] if name.startswith("ln") else b[name]["kernel"]
            out.append((f"{blk}/{name}", kernel, b[name]["bias"]))
    out.append(("ln_f", params["ln_f"]["scale"], params["ln_f"]["bias"]))
    return out + [("head", params["head"]["kernel"], params["head"]["bias"])]


def _transformer_graph(g, params: dict, act: int) -> None:
    """Patch inputs and token positions feed the embedding; per block the residual stream passes through
    LayerNorm (scale as a diagonal edge, shift as bias), query/key/value, the attention output projection and
    the MLP, with identity residual edges around both; then the final LayerNorm and the head. Query and key
    units have no outgoing weights (their product only weighs the values)."""
    blocks = numbered(params, "block")
    depth = 3 + 4 * len(blocks)
    emb = params["embed"]
    d = emb["kernel"].shape[1]
    inp = g.nodes(emb["kernel"].shape[0], "input", 0.0, inp=True)
    pos = np.asarray(params["pos"])[0]
    tokens = g.nodes(pos.shape[0], "position", 0.0, inp=True)
    stream = g.nodes(d, "embed", 1 / depth, emb["bias"])
    g.dense(inp, stream, emb["kernel"])
    g.dense(tokens, stream, pos, "position")
    level = 1

    def norm(src, ln, lvl):
        n = g.nodes(d, "norm", lvl / depth, ln["bias"])
        g.diagonal(src, n, ln["scale"], "norm")
        return n

    for name in blocks:
        b = params[name]
        h = norm(stream, b["ln_1"], level + 1)
        q, k, v = (g.nodes(d, t, (level + 2) / depth, b[t]["bias"]) for t in ("query", "key", "value"))
        for t, nodes in (("query", q), ("key", k), ("value", v)):
            g.dense(h, nodes, b[t]["kernel"])
        att = g.nodes(d, "attn_out", (level + 3) / depth, b["out"]["bias"])
        g.dense(v, att, b["out"]["kernel"])
        g.diagonal(stream, att, np.ones(d), "residual")
        h = norm(att, b["ln_2"], level + 3.5)
        hid = g.nodes(b["mlp_in"]["kernel"].shape[1], "mlp_in", (level + 3.75) / depth, b["mlp_in"]["bias"], act)
        g.dense(h, hid, b["mlp_in"]["kernel"])
        stream_new = g.nodes(d, "mlp_out", (level + 4) / depth, b["mlp_out"]["bias"])
        g.dense(hid, stream_new, b["mlp_out"]["kernel"])
        g.diagonal(att, stream_new, np.ones(d), "residual")
        stream, level = stream_new, level + 4
    ln = g.nodes(d, "norm", (depth - 1) / depth, params["ln_f"]["bias"])
    g.diagonal(stream, ln, params["ln_f"]["scale"], "norm")
    head = g.nodes(params["head"]["kernel"].shape[1], "output", 1.0, params["head"]["bias"], out=True)
    g.dense(ln, head, params["head"]["kernel"])


def _cnn_check(arch: Arch, shape) -> str | None:
    if arch.knob("valid") not in (0, 1):
        return f"{arch.layout_id}: valid must be 0 (SAME padding) or 1 (no padding)"
    if shape is not None and arch.knob("valid"):
        side = min(shape[0], shape[1])
        for _ in range(arch.depth):
            side = (side - 3) // 2 + 1
        if side < 1:
            return f"{arch.layout_id}: {arch.depth} unpadded 3x3 stride-2 convolutions leave nothing of a " \
                   f"{shape[0]}x{shape[1]} image"
    return None


def _transformer_check(arch: Arch, shape) -> str | None:
    patch = arch.knob("patch")
    if arch.width % 2:
        return f"{arch.layout_id}: width must be even (2 attention heads)"
    if shape is not None and (shape[0] % patch or shape[1] % patch):
        return f"{arch.layout_id}: patch {patch} does not tile {shape[0]}x{shape[1]} images"
    return None


def _pool_cnn_layers(params: dict) -> list:
    """The chain of ``PoolCNN``: its dense layer over the flattened 3x3x4 map reads, per input channel, a 3x3
    patch, i.e. it is a 3x3 convolution covering the whole map; given as such ([3, 3, 4, 20]), so the statistics,
    graph and NFN views see its input channels (a permutation of conv_2's channels moves them)."""
    k = params["hidden_0"]["kernel"]
    c = params["conv_2"]["kernel"].shape[-1]
    side = int(round((k.shape[0] // c) ** 0.5))
    as_conv = np.asarray(k).reshape(c, side, side, k.shape[1]).transpose(1, 2, 0, 3)
    return [(f"conv_{i}", "conv", params[f"conv_{i}"]["kernel"], params[f"conv_{i}"]["bias"]) for i in range(3)] + [
        ("hidden_0", "conv", as_conv, params["hidden_0"]["bias"]),
        ("head", "dense", params["head"]["kernel"], params["head"]["bias"])]


def _pool_cnn_check(arch, shape) -> str | None:
    if (arch.depth, arch.width) != (3, 8):
        return f"{arch.layout_id}: the Model Zoos CNN has fixed shapes (depth 3, width 8)"
    if shape is not None and shape[:2] != (28, 28):
        return f"{arch.layout_id}: reads 28x28 images, not {shape[0]}x{shape[1]}"
    return None


register(ZooFamily("mlp", MLP, layers=chain_layers("hidden", "dense"), permutable=("dense",), min_depth=0))
register(ZooFamily("cnn_pool", PoolCNN, layers=_pool_cnn_layers, permutable=("conv",), check=_pool_cnn_check))
register(ZooFamily("cnn", CNN, layers=chain_layers("conv", "conv"), permutable=("conv",),
                   knobs=(Knob("valid", 0, "v", shown=False),), check=_cnn_check))
# The transformer's permutable units are its MLP hidden units; it has more symmetries (residual-stream
# dimensions, dimensions inside an attention head) that wa leaves alone.
register(ZooFamily(
    "transformer", PatchTransformer, tensors=_transformer_tensors,
    pairs=lambda params: [((b, "mlp_in"), (b, "mlp_out")) for b in numbered(params, "block")],
    graph=_transformer_graph,
    node_kinds=("position", "embed", "norm", "query", "key", "value", "attn_out", "mlp_in", "mlp_out"),
    permutable=("mlp_in",), knobs=(Knob("patch", 4, "p"),), check=_transformer_check))


@dataclasses.dataclass(frozen=True)
class Arch:
    """``knobs``: the family's own knobs as (name, value) pairs; missing ones take the family's defaults."""
    family: str
    depth: int
    width: int
    activation: str
    knobs: tuple = ()

    def __post_init__(self):
        fam = FAMILIES.get(self.family)
        if fam is None:
            return   # ``check`` names the unknown family
        given = dict(self.knobs)
        unknown = sorted(set(given) - {k.name for k in fam.knobs})
        if unknown:
            raise ArchError(f"family {self.family!r} has no knob {unknown[0]!r}; its knobs: "
                            f"{[k.name for k in fam.knobs]}")
        object.__setattr__(self, "knobs", tuple((k.name, int(given.get(k.name, k.default))) for k in fam.knobs))

    def knob(self, name: str) -> int:
        return dict(self.knobs)[name]

    @property
    def layout_id(self) -> str:
        """Names the parameter layout: models with equal ids store into one weight array."""
        fam = FAMILIES.get(self.family)
        knobs = {k.name: k for k in fam.knobs} if fam else {}
        return f"{self.family}-d{self.depth}-w{self.width}" + "".join(
            f"-{knobs[n].tag}{v}" for n, v in self.knobs if knobs[n].shown or v != knobs[n].default)

    @property
    def id(self) -> str:
        return f"{self.layout_id}-{self.activation}"

    def check(self, shape: tuple[int, int, int] | None = None) -> None:
        """Raises ArchError naming the bad field before anything is compiled."""
        fam = family(self.family)
        if self.activation not in ACTIVATIONS:
            raise ArchError(f"unknown activation {self.activation!r} for {self.layout_id}; "
                            f"choose one of {sorted(ACTIVATIONS)}")
        if self.depth < fam.min_depth or self.width < 1:
            raise ArchError(f"{self.layout_id}: depth must be >= {fam.min_depth} and width positive")
        problem = fam.check(self, shape) if fam.check else None
        if problem:
            raise ArchError(problem)

    def module(self, n_classes: int, init_scheme: str = "he_normal", **flax_kw) -> nn.Module:
        """``flax_kw``: Flax's own module arguments (``parent=None``: a top-level module even when built inside
        another module's method, as a learner that runs the networks does)."""
        if init_scheme not in INIT_SCHEMES:
            raise ArchError(f"unknown init scheme {init_scheme!r}; choose one of {sorted(INIT_SCHEMES)}")
        return family(self.family).module(depth=self.depth, width=self.width, activation=self.activation,
                                          n_classes=n_classes, kernel_init=INIT_SCHEMES[init_scheme],
                                          **dict(self.knobs), **flax_kw)

    def describe(self) -> dict:
        return {"family": self.family, "depth": self.depth, "width": self.width, "activation": self.activation,
                **dict(self.knobs)}
