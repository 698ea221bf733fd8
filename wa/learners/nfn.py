"""NFN: permutation-equivariant neural functionals (Zhou et al. 2023, "Permutation Equivariant Neural
Functionals"; reference code AllanYangZhou/nfn), ported to Flax for the chain families (MLP and CNN).

A network of L layers is its weight-space features: per layer a weight tensor [rows (outputs), cols (inputs),
channels] (a convolution's taps folded into the channels) and a bias [rows, channels]. An equivariant linear
layer maps them to new features of the same shape from pooled terms — the entry itself, means over rows,
columns, both, of the neighbouring layers and the biases — with weights that depend on the layer, never on a
neuron's index, so it commutes with any permutation of hidden neurons:
- ``np`` (NP): every neuron's index is treated as exchangeable, inputs and outputs included; learned input /
  output embeddings (``io_embed``) break the symmetry the data does not have;
- ``hnp`` (HNP): only hidden neurons are exchangeable; input and output units keep their identity, so their
  rows/columns enter as individual features; its first layer's size grows with the square of the input count;
- ``auto`` (default): HNP where the first layer has at most 256 input entries (inputs × taps), else NP.
Layers are separated by ReLU; an invariant pooling (NPPool / HNPPool) gives one vector per network, read by the
heads shared with the other learners (optionally with the per-layer statistics, multi-resolution).

Parameters of the equivariant layers depend on the architecture (depth, taps per layer; HNP also input and
output counts): in a mixed zoo each architecture of the MLP/CNN families gets its own equivariant stack under
its signature, and all share the pooling MLP and heads. The patch transformer is not a chain (residual stream,
attention, LayerNorm): NFN's layers are not defined for it, and the learner refuses it (``families``).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wa.learners import base, heads
from wa.zoo import archs

LAYERS = ("auto", "hnp", "np")


def chain(layout) -> list[int]:
    """The taps of each layer if ``layout`` is a chain of dense/conv layers (group k → k + 1); else an error."""
    blocks = layout.blocks
    if any(d or (s, r) != (k, k + 1) for k, (s, r, _, d, _) in enumerate(blocks)) or \
            len(blocks) != len(layout.groups) - 1:
        raise base.LearnerError("nfn reads chains of dense / convolutional layers (the MLP and CNN families); this "
                                "network's graph is not one")
    return [t for *_, t in blocks]


def signature(layout) -> str:
    taps = chain(layout)
    n_in, n_out = layout.groups[0][1], layout.groups[-1][1]
    return f"L{len(taps)}_f{'-'.join(map(str, taps))}_i{n_in}_o{n_out}"


class NPLinear(nn.Module):
    """NP layer. ws[i] [b, rows, cols, f_i·c], bs[i] [b, rows, c] → the same shapes with c_out channels."""
    c_out: int
    taps: tuple
    io_embed: bool = True

    @nn.compact
    def __call__(self, ws, bs):
        L, c = len(ws), bs[0].shape[-1]
        if self.io_embed:
            n_in, n_out = ws[0].shape[2], ws[-1].shape[1]
            init = nn.initializers.normal(1.0)
            ws = [ws[0] + self.param("in_embed", init, (n_in, ws[0].shape[-1])), *ws[1:]]
            ws[-1] = ws[-1] + self.param("out_embed", init, (n_out, 1, ws[-1].shape[-1]))
            bs = [*bs[:-1], bs[-1] + self.param("out_bias_embed", init, (n_out, c))]
        row = [w.mean(1) for w in ws]            # over rows → per column [b, cols, F]
        col = [w.mean(2) for w in ws]            # over columns → per row [b, rows, F]
        glob = jnp.concatenate([w.mean((1, 2)) for w in ws] + [b.mean(1) for b in bs], -1)
        out_w, out_b = [], []
        for i in range(L):
            f = self.taps[i] * self.c_out
            per_col = [row[i]] + ([col[i - 1], bs[i - 1]] if i > 0 else [])
            per_row = [col[i], bs[i]] + ([row[i + 1]] if i < L - 1 else [])
            per_col, per_row = jnp.concatenate(per_col, -1), jnp.concatenate(per_row, -1)
            z = (nn.Dense(f, name=f"w{i}")(ws[i]) + nn.Dense(f, name=f"w{i}_rc")(glob)[:, None, None]
                 + nn.Dense(f, name=f"w{i}_r")(per_col)[:, None] + nn.Dense(f, name=f"w{i}_c")(per_row)[:, :, None])
            u = nn.Dense(self.c_out, name=f"b{i}")(per_row) + nn.Dense(self.c_out, name=f"b{i}_rc")(glob)[:, None]
            out_w.append(z)
            out_b.append(u)
        return out_w, out_b


class HNPLinear(nn.Module):
    """HNP layer: hidden neurons exchangeable, input columns of the first layer and output rows of the last
    fixed (their entries become per-row / per-column features)."""
    c_out: int
    taps: tuple

    @nn.compact
    def __call__(self, ws, bs):
        L = len(ws)
        if L < 2:
            raise base.LearnerError("hnp needs at least two layers")
        b = ws[0].shape[0]
        n_in, n_out = ws[0].shape[2], ws[-1].shape[1]
        row = [w.mean(1) for w in ws]
        col = [w.mean(2) for w in ws]
        glob = jnp.concatenate([w.mean((1, 2)) for w in ws] + [x.mean(1) for x in bs]
                               + [row[0].reshape(b, -1), col[-1].reshape(b, -1), bs[-1].reshape(b, -1)], -1)
        # The first layer's rows (hidden units) read their whole row over the fixed inputs; the last layer's
        # columns (hidden units) their whole column over the fixed outputs.
        w0_rows = ws[0].reshape(b, ws[0].shape[1], -1)                              # [b, rows0, n_in·F0]
        wl_cols = ws[-1].transpose(0, 2, 1, 3).reshape(b, ws[-1].shape[2], -1)     # [b, colsL, n_out·FL]
        out_w, out_b = [], []
        for i in range(L):
            f = self.taps[i] * self.c_out
            if i == 0:
                per_row = [w0_rows, row[1], bs[0]] + ([wl_cols] if L == 2 else [])
                per_row = jnp.concatenate(per_row, -1)
                z = nn.Dense(n_in * f, name="w0_rpt")(per_row) + nn.Dense(n_in * f, name="w0_rc")(glob)[:, None]
                z = z.reshape(b, -1, n_in, f)
                u = nn.Dense(self.c_out, name="b0")(per_row) + nn.Dense(self.c_out, name="b0_rc")(glob)[:, None]
            elif i == L - 1:
                per_col = [wl_cols, col[-2]] + ([w0_rows] if L == 2 else [])
                per_col = jnp.concatenate(per_col, -1)
                z = nn.Dense(n_out * f, name="wl_cpt")(per_col) + nn.Dense(n_out * f, name="wl_rc")(glob)[:, None]
                z = z.reshape(b, -1, n_out, f).transpose(0, 2, 1, 3)
                u = nn.Dense(n_out * self.c_out, name="bl_rc")(glob).reshape(b, n_out, self.c_out)
            else:
                per_col = [row[i], col[i - 1], bs[i - 1]] + ([w0_rows] if i == 1 else [])
                per_row = [col[i], bs[i], row[i + 1]] + ([wl_cols] if i == L - 2 else [])
                per_col, per_row = jnp.concatenate(per_col, -1), jnp.concatenate(per_row, -1)
                z = (nn.Dense(f, name=f"w{i}")(ws[i]) + nn.Dense(f, name=f"w{i}_rc")(glob)[:, None, None]
                     + nn.Dense(f, name=f"w{i}_r")(per_col)[:, None]
                     + nn.Dense(f, name=f"w{i}_c")(per_row)[:, :, None])
                u = nn.Dense(self.c_out, name=f"b{i}")(per_row) + nn.Dense(self.c_out, name=f"b{i}_rc")(glob)[:, None]
            out_w.append(z)
            out_b.append(u)
        return out_w, out_b


def pool(ws, bs, kind: str):
    """NPPool: per layer the mean of the weights and of the biases. HNPPool: the first layer's weights averaged
    over its hidden rows (one entry per input), the last's over its hidden columns (one per output) and the last
    biases whole; the rest as NPPool."""
    b = ws[0].shape[0]
    out = []
    for i, (w, x) in enumerate(zip(ws, bs, strict=True)):
        if kind == "hnp" and i == 0:
            out.append(w.mean(1).reshape(b, -1))
        elif kind == "hnp" and i == len(ws) - 1:
            out.append(w.mean(2).reshape(b, -1))
        else:
            out.append(w.mean((1, 2)))
        out.append(x.reshape(b, -1) if kind == "hnp" and i == len(ws) - 1 else x.mean(1))
    return jnp.concatenate(out, -1)


class NFN(nn.Module):
    out_dims: tuple
    channels: int = 16
    n_layers: int = 3
    layer: str = "hnp"
    dim: int = 64

    @nn.compact
    def __call__(self, g: base.Bucket, train: bool = False):
        del train
        lay = g.layout
        taps = tuple(chain(lay))
        ws = list(g.weights)                                        # [b, rows, cols, taps]
        x = g.nodes["x"]
        # Each layer's bias with the node's raw-scale features where the learner added them.
        bs = [jnp.concatenate([x[:, s:s + n, :1], x[:, s:s + n, 4:]], -1) for s, n in lay.groups[1:]]
        layer = self.layer
        if layer == "auto":
            # HNP's first layer maps each hidden row's n_in·taps·c entries to as many: quadratic in the input
            # size (784 pixels: 1.6e8 parameters); NP's cost does not depend on it.
            layer = "hnp" if lay.groups[0][1] * taps[0] <= 256 else "np"
        z = _Stack(self.channels, self.n_layers, layer, taps, self.dim, name=signature(lay))(ws, bs)
        z = heads.fuse_stats(z, g.stats, self.dim)
        z = nn.Dense(self.dim, name="embedding")(z)
        return {"embedding": z, **heads.Heads(self.out_dims, self.dim, name="heads")(nn.gelu(z))}


class _Stack(nn.Module):
    """One architecture's equivariant layers, its invariant pooling and a dense map of the pooled vector (whose
    size depends on the architecture) to ``dim``."""
    channels: int
    n_layers: int
    layer: str
    taps: tuple
    dim: int

    @nn.compact
    def __call__(self, ws, bs):
        c = self.channels
        # Pointwise lift to c channels per tap (equivariant: acts on each entry alone).
        ws = [nn.Dense(c, name=f"lift_w{i}")(w[..., None]).reshape(*w.shape[:3], -1) for i, w in enumerate(ws)]
        bs = [nn.Dense(c, name=f"lift_b{i}")(x) for i, x in enumerate(bs)]
        for k in range(self.n_layers):
            if self.layer == "hnp":
                ws, bs = HNPLinear(c, self.taps, name=f"layer_{k}")(ws, bs)
            else:
                ws, bs = NPLinear(c, self.taps, name=f"layer_{k}")(ws, bs)
            ws, bs = [nn.relu(w) for w in ws], [nn.relu(x) for x in bs]
        return nn.gelu(nn.Dense(self.dim, name="pool_mlp")(pool(ws, bs, self.layer)))


class Learner(base.Blocks):
    name = "nfn"
    families = archs.chain_families()   # the zoo families NFN can read

    def prepare(self, params, families, activations, forward=None):
        chains = archs.chain_families()
        bad = sorted(set(families) - set(chains))
        if bad:
            raise base.LearnerError(f"nfn reads the {'/'.join(chains)} families (chains of layers); it was given "
                                    f"{bad}, whose graphs are not chains, so its layers are not defined for them.")
        if self.cfg.layer not in LAYERS:
            raise base.LearnerError(f"--config.model.layer={self.cfg.layer!r}; expected one of {LAYERS}")
        return super().prepare(params, families, activations, forward)

    def module(self):
        c = self.cfg
        return NFN(tuple(self.targets.out_dims().items()), channels=c.channels, n_layers=c.layers, layer=c.layer,
                   dim=c.dim)


base.register(base.Entry(
    "nfn", Learner, structure=True,
    config=dict(channels=16, layers=2, layer="auto", dim=64, normalize=True, norm_scope="position", clip=8.0,
                stats=False),
    smoke=dict(channels=4, layers=1, dim=16)))
