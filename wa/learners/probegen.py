"""ProbeGen: learned input probes sent through each network, its outputs read by an MLP (Kahana, Horwitz, Shuval &
Hoshen 2024, "Deep Linear Probe Generators for Weight Space Learning"; reference code jonkahana/ProbeGen).

K probes are generated from K learned latent codes by one generator shared by all probes: a *deep linear*
generator — a dense map to a 4x4 grid, then transposed convolutions that double it, then a 3x3 convolution to the
image's channels, with no activation between them (the paper's regulariser: as expressive as one linear map, but
trained as a deep one it prefers structured, image-like probes) — and a final tanh, cropped to the zoo's image
size and mapped to the range its networks were trained on. Every network of a batch is run on the same K probes
(its own architecture, its own weights, evaluation mode); its K x classes logits, squashed by sign·log(1 + |x|)
so that a diverged network's 1e6 logits cannot dominate, form one vector read by an MLP with the shared heads.

It is not a weights-only learner: it runs each network forward, so it needs each network's architecture and the
zoo's input shape (``data.Forward``, recorded by ``launch.make_zoo`` and by the importer). Invariance to
hidden-neuron permutations is exact in principle (a permuted network computes the same function), up to float
summation order.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wa.learners import base, heads


@jax.tree_util.register_pytree_node_class
class Nets:
    """Networks of one architecture: their parameter pytrees stacked on leading axes; the ``Arch`` is static
    (one compiled step per architecture)."""

    def __init__(self, arch, params):
        self.arch, self.params = arch, params

    def tree_flatten(self):
        return (self.params,), self.arch

    @classmethod
    def tree_unflatten(cls, arch, children):
        return cls(arch, *children)


class Generator(nn.Module):
    """K probes [K, H, W, C] in (-1, 1) from K learned latent codes."""
    shape: tuple
    n_probes: int
    latent: int = 32
    width: int = 16
    linear: bool = True      # False: ReLU between the layers (the paper's non-linear ablation)

    @nn.compact
    def __call__(self):
        h, w, c = self.shape
        z = self.param("latent", nn.initializers.normal(1.0), (self.n_probes, self.latent))
        s0 = min(4, h, w)
        ups = max(0, math.ceil(math.log2(max(h, w) / s0)))
        ch = self.width * 2 ** min(ups, 3)
        x = nn.Dense(s0 * s0 * ch, name="project")(z).reshape(self.n_probes, s0, s0, ch)
        for i in range(ups):
            if not self.linear:
                x = nn.relu(x)
            ch = max(self.width, ch // 2)
            x = nn.ConvTranspose(ch, (4, 4), strides=(2, 2), padding="SAME", name=f"up_{i}")(x)
        if not self.linear:
            x = nn.relu(x)
        x = nn.Conv(c, (3, 3), padding="SAME", name="out")(x)
        top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
        return jnp.tanh(x[:, top:top + h, left:left + w])


def squash(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


class ProbeGen(nn.Module):
    out_dims: tuple
    shape: tuple
    n_classes: int
    input_range: tuple = (0.0, 1.0)
    n_probes: int = 64
    latent: int = 32
    width: int = 16
    linear: bool = True
    dim: int = 128
    n_layers: int = 4

    def setup(self):
        self.generator = Generator(self.shape, self.n_probes, self.latent, self.width, self.linear)
        self.mix = [nn.Dense(self.dim, name=f"mix_{i}") for i in range(self.n_layers)]
        self.embedding = nn.Dense(self.dim)
        self.heads = heads.Heads(self.out_dims, self.dim)

    def probes(self):
        """The K probes in the zoo's input range, [K, H, W, C]."""
        lo, hi = self.input_range
        return lo + (self.generator() + 1.0) * 0.5 * (hi - lo)

    def outputs(self, batch: Nets, probes):
        """Each network's logits on the probes, [networks, K, classes] (the batch's networks on one leading axis,
        as the training loop hands a device's share)."""
        net = batch.arch.module(self.n_classes, parent=None)   # the network, not a part of this learner
        return jax.vmap(lambda p: net.apply({"params": p}, probes))(batch.params)

    def __call__(self, batch: Nets, train: bool = False):
        del train
        logits = self.outputs(batch, self.probes())
        h = squash(jnp.nan_to_num(logits.reshape(*logits.shape[:-2], -1)))
        for layer in self.mix:
            h = nn.relu(layer(h))
        z = self.embedding(h)
        return {"embedding": z, **self.heads(nn.gelu(z))}


class Learner(base.Neural):
    name = "probegen"
    forward = None

    def prepare(self, params, families, activations, forward=None):
        if forward is None:
            raise base.LearnerError(
                "probegen runs every network on its probes, so it needs each network's architecture and the zoo's "
                "input shape; this zoo does not record them (zoos built by launch.make_zoo and imported by "
                "launch.import_zoo do)")
        if len(forward.archs) != len(params):
            raise base.LearnerError(f"probegen: {len(params)} networks but {len(forward.archs)} architectures")
        known = (forward.shape, forward.n_classes, forward.input_range)
        if self.forward is not None and self.forward != known:
            raise base.LearnerError(f"probegen was set up for inputs {self.forward} (shape, classes, range); "
                                    f"these networks read {known}")
        self.forward = known
        return list(zip(forward.archs, params, strict=True))

    def batches(self, nets, idx, batch_size, rng):
        for r in self._bucketed(idx, lambda i: nets[i][0], batch_size, rng):
            yield self.gather(nets, r), r

    def gather(self, nets, rows):
        first = int(rows[rows >= 0][0])
        picked = [nets[int(i) if i >= 0 else first][1] for i in rows.reshape(-1)]
        params = jax.tree.map(lambda *xs: np.stack(xs).reshape(*rows.shape, *np.shape(xs[0])), *picked)
        return Nets(nets[first][0], params)

    def module(self):
        if self.forward is None:
            raise base.LearnerError("probegen: prepare() must run before module()")
        c = self.cfg
        shape, n_classes, rng = self.forward
        return ProbeGen(tuple(self.targets.out_dims().items()), shape, n_classes, rng, n_probes=c.probes,
                        latent=c.latent, width=c.width, linear=c.linear, dim=c.dim, n_layers=c.layers)


base.register(base.Entry(
    "probegen", Learner, weights_only=False,
    # The reference's 64 probes, latent 32, generator width 16, 256-wide mixer of 6 layers; the mixer is narrower
    # here (2-core CPU), as the other learners' are.
    config=dict(probes=64, latent=32, width=16, linear=True, dim=128, layers=4),
    smoke=dict(probes=4, latent=4, width=2, dim=8, layers=1),
    ablations={"probegen_nonlinear": dict(linear=False)}))
