"""WeightNet: a transformer over neuron tokens (one token per input unit, neuron or channel).

Equivariant by default: hidden tokens carry no position, only their bias, layer type and activation; inputs and
outputs keep their index (their identity survives a permutation of hidden units). Weights enter twice, both
through a dense [T, T] edge tensor built inside the step from the graph's edge list, so that permuting hidden
neurons permutes both of its axes together: (1) as per-head biases of the attention logits and as
attention-weighted edge values (edge-conditioned attention, mixing across all layers); (2) as a propagation
channel Σ_j W_ij · h_j, the network's own weights applied to the token states. Each token also starts with the
sum of its incoming edges (DeepSets). Pooling: masked mean + attention pooling over tokens.

``mode='axial'`` (``weightnet_axial``) keeps every weight entry as a token of its own (``AxialLayer``): entries
attend along the rows and the columns of their weight block, neurons read and feed them, so attention runs along
neuron axes inside each weight tensor as in the Neural Functional Transformer (Zhou et al. 2023), with one set of
parameters for every block of every architecture.

Ablations (config): ``mode='flat'`` (no permutation handling: each token reads its incoming weights as one
vector in stored sender order, every token gets its index as a position, no edge tensor), ``mode='canonical'``
(the flat model on weights first sorted into ``wa.weights.canonical`` order), ``layer_types=False``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wa.learners import base, heads
from wa.weights import canonical
from wa.weights import graph as graph_lib

MODES = ("equivariant", "flat", "canonical", "axial")


def _attend(x, axis: int, n_heads: int, dense: dict):
    """Multi-head self-attention of ``x`` [b, R, S, d] along ``axis`` (2: each receiver's entries attend to each
    other, over its senders; 1: each sender's, over its receivers) with the projections ``dense`` (q, k, v, o). No
    positions: equivariant along that axis."""
    if axis == 1:
        return _attend(x.transpose(0, 2, 1, 3), 2, n_heads, dense).transpose(0, 2, 1, 3)
    b, r, s_, d = x.shape
    dh = d // n_heads
    q, k, v = (dense[n](x).reshape(b, r, s_, n_heads, dh) for n in ("q", "k", "v"))
    a = jax.nn.softmax(jnp.einsum("brshd,brthd->brhst", q, k) / jnp.sqrt(dh), -1)
    return dense["o"](jnp.einsum("brhst,brthd->brshd", a, v).reshape(b, r, s_, d))


class AxialLayer(nn.Module):
    """One layer of the axial WeightNet (after the Neural Functional Transformer, Zhou et al. 2023, which attends
    along the neuron axes of each weight tensor): every weight entry reads its two end neurons, then attends along
    its block's rows and along its columns; every neuron reads the mean of its incoming and of its outgoing entries,
    then all neurons attend to each other. Parameters are shared by all blocks (edge type and layer type are
    features), so an unseen architecture is read with the same weights."""
    dim: int
    n_heads: int

    @nn.compact
    def __call__(self, h, es, lay):
        b, t, d = h.shape
        hn = nn.LayerNorm(name="ln_nodes")(h)
        recv, send = nn.Dense(d, name="recv")(hn), nn.Dense(d, name="send")(hn)
        mlp_in, mlp_out = nn.Dense(2 * d, name="entry_mlp_in"), nn.Dense(d, name="entry_mlp_out")
        ln_e, ln_row, ln_col = nn.LayerNorm(name="ln_entry"), nn.LayerNorm(name="ln_row"), nn.LayerNorm(name="ln_col")
        row, col = ({n: nn.Dense(d, name=f"{a}_{n}") for n in "qkvo"} for a in ("row", "col"))
        inc = [[] for _ in lay.groups]
        out = [[] for _ in lay.groups]
        new = []
        for k, (sg, rg, _, diag, _) in enumerate(lay.blocks):
            (rs, rn), (ss, sn) = lay.groups[rg], lay.groups[sg]
            e = es[k] + recv[:, rs:rs + rn, None] + (send[:, ss:ss + sn, None] if diag else send[:, None, ss:ss + sn])
            if not diag:
                e = e + _attend(ln_row(e), 2, self.n_heads, row)
                e = e + _attend(ln_col(e), 1, self.n_heads, col)
            e = e + mlp_out(nn.gelu(mlp_in(ln_e(e))))
            new.append(e)
            inc[rg].append(e.mean(2))
            out[sg].append(e[:, :, 0] if diag else e.mean(1))
        zeros = lambda g: jnp.zeros((b, lay.groups[g][1], d), h.dtype)  # noqa: E731
        pooled = [jnp.concatenate([sum(inc[g]) / max(len(inc[g]), 1) if inc[g] else zeros(g),
                                   sum(out[g]) / max(len(out[g]), 1) if out[g] else zeros(g)], -1)
                  for g in range(len(lay.groups))]
        h = h + nn.Dense(d, name="from_entries")(jnp.concatenate(pooled, 1))
        hn = nn.LayerNorm(name="ln_attn")(h)
        h = h + nn.MultiHeadDotProductAttention(self.n_heads, name="nodes")(hn, hn)
        h = h + nn.Dense(d, name="mlp_out")(nn.gelu(nn.Dense(2 * d, name="mlp_in")(nn.LayerNorm(name="ln_mlp")(h))))
        return h, new


class Block(nn.Module):
    dim: int
    n_heads: int
    edges: bool

    @nn.compact
    def __call__(self, h, mask, dense_e):
        b, t, _ = h.shape
        dh = self.dim // self.n_heads
        q, k, v = (nn.Dense(self.dim, name=n)(h).reshape(b, t, self.n_heads, dh) for n in ("query", "key", "value"))
        logits = jnp.einsum("bihd,bjhd->bhij", q, k) / jnp.sqrt(dh)
        if self.edges:
            logits = logits + nn.Dense(self.n_heads, name="edge_bias")(dense_e).transpose(0, 3, 1, 2)
        logits = jnp.where(mask[:, None, None, :], logits, -1e9)
        alpha = jax.nn.softmax(logits, -1)
        out = jnp.einsum("bhij,bjhd->bihd", alpha, v).reshape(b, t, self.dim)
        if self.edges:
            ev = jnp.einsum("bhij,bijc->bihc", alpha, dense_e).reshape(b, t, -1)
            prop = jnp.einsum("bijc,bjc->bic", dense_e, nn.Dense(dense_e.shape[-1], name="prop_in")(h))
            out = jnp.concatenate([out, ev, prop], -1)
        return heads.residual_update(h, out, self.dim)


class WeightNet(nn.Module):
    out_dims: tuple
    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    edge_dim: int = 16
    max_fan_in: int = 64
    max_input_tokens: int = 256
    mode: str = "equivariant"
    layer_types: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, batch, train: bool = False):
        eq = self.mode in ("equivariant", "axial")
        kernel = self.param("edge_embed", nn.initializers.lecun_normal(), (graph_lib.EDGE_DIM, self.edge_dim)) \
            if eq else None
        types = self.param("edge_type", nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
                           (len(graph_lib.EDGE_TYPES), self.edge_dim)) if eq else None
        rows = ()
        if isinstance(batch, base.Bucket):
            batch, rows = base.drop_wide_inputs(batch, self.max_input_tokens)
            nodes, stats = batch.nodes, batch.stats
            mask = jnp.ones(nodes["layer_type"].shape, bool)
            dense_e, inc, fan_in = (None, None, None) if self.mode == "axial" else \
                _dense_edges(batch, kernel, types, self.max_fan_in, eq)
        elif self.mode == "axial":
            raise base.LearnerError("weightnet mode 'axial' reads bucketed batches (dense=True)")
        else:
            nodes, mask, stats = batch["nodes"], batch["node_mask"], None
            dense_e, inc, fan_in = _padded_edges(batch, kernel, types, self.max_fan_in, eq)
        h = heads.NodeEmbed(self.dim, self.layer_types, "fixed" if eq else "all", name="node_embed")(nodes)
        h = heads.add_wide_rows(h, rows, self.dim)
        if self.mode == "axial":
            return self._axial(batch, h, mask, stats, kernel, types, train)
        if eq:
            h = h + nn.Dense(self.dim, name="incoming")(dense_e.sum(2) / jnp.sqrt(jnp.maximum(fan_in, 1.0))[..., None])
        else:
            h = h + nn.Dense(self.dim, name="incoming")(inc.reshape(*inc.shape[:2], -1))
        for i in range(self.n_layers):
            if train and self.dropout > 0:
                h = nn.Dropout(self.dropout, deterministic=False)(h)
            h = Block(self.dim, self.n_heads, eq, name=f"block_{i}")(h, mask, dense_e)
        return self._readout(h, mask, stats)

    def _axial(self, batch, h, mask, stats, kernel, types, train):
        lay = batch.layout
        # Each entry: its taps embedded and its edge type (a diagonal block's entry sits on its receiver).
        es = [jnp.pad(w, ((0, 0),) * 3 + ((0, graph_lib.EDGE_DIM - w.shape[-1]),)) @ kernel + types[blk[2]]
              for w, blk in zip(batch.weights, lay.blocks, strict=True)]
        embed = nn.Dense(self.dim, name="entry_embed")
        es = [embed(e) for e in es]
        for i in range(self.n_layers):
            if train and self.dropout > 0:
                h = nn.Dropout(self.dropout, deterministic=False)(h)
            h, es = AxialLayer(self.dim, self.n_heads, name=f"axial_{i}")(h, es, lay)
        return self._readout(nn.LayerNorm(name="ln_out")(h), mask, stats)

    def _readout(self, h, mask, stats):
        m = mask[..., None].astype(h.dtype)
        mean = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        score = jnp.where(mask, nn.Dense(1, name="pool_score")(h)[..., 0], -1e9)
        att = (jax.nn.softmax(score, -1)[..., None] * h).sum(1)
        z = heads.fuse_stats(jnp.concatenate([mean, att], -1), stats, self.dim)
        z = nn.Dense(self.dim, name="embedding")(z)
        return {"embedding": z, **heads.Heads(self.out_dims, self.dim, name="heads")(nn.gelu(z))}


def _padded_edges(batch, kernel, types, max_fan_in, eq):
    """From edge lists padded to a fixed budget (scatter): the path before bucketing, kept as the reference."""
    nodes, mask = batch["nodes"], batch["node_mask"]
    b, t = mask.shape
    bi = jnp.arange(b)[:, None]
    s, r, w, em = batch["senders"], batch["receivers"], batch["w"], batch["edge_mask"]
    if eq:
        ew = w @ kernel + types[batch["edge_type"]]
        dense_e = jnp.zeros((b, t, t, kernel.shape[1])).at[bi, r, s].add(ew * em[..., None])
        return dense_e, None, jnp.zeros((b, t)).at[bi, r].add(em)
    # Stored order: the sender's index inside its layer is the slot (transformer residual edges, constant 1,
    # share the slot of a dense edge and add to it).
    slot = jnp.minimum(jnp.take_along_axis(nodes["index"], s, 1), max_fan_in - 1)
    inc = jnp.zeros((b, t, max_fan_in, w.shape[-1])).at[bi, r, slot].add(w * em[..., None])
    return None, inc, None


def _dense_edges(batch: base.Bucket, kernel, types, max_fan_in, eq):
    """The same tensors from one architecture's weight blocks, assembled by concatenation (no scatter)."""
    lay, ws = batch.layout, batch.weights
    b = ws[0].shape[0]
    by_pair = {(lay.blocks[k][1], lay.blocks[k][0]): k for k in range(len(lay.blocks))}
    if not eq:
        rows = []
        for r, (_, nr) in enumerate(lay.groups):
            inc = jnp.zeros((b, nr, max_fan_in, graph_lib.EDGE_DIM))
            for k in lay.incoming(r):
                _, _, _, diag, taps = lay.blocks[k]
                w = jnp.pad(ws[k], ((0, 0), (0, 0), (0, 0), (0, graph_lib.EDGE_DIM - taps)))
                if diag:
                    inc = inc + jnp.einsum("bic,if->bifc", w[:, :, 0], jnp.asarray(_slots(nr, max_fan_in)))
                else:
                    inc = inc + jnp.einsum("bijc,jf->bifc", w, jnp.asarray(_slots(w.shape[2], max_fan_in)))
            rows.append(inc)
        return None, jnp.concatenate(rows, 1), None
    rows, fan_in = [], []
    for r, (_, nr) in enumerate(lay.groups):
        cols = []
        for s, (_, ns) in enumerate(lay.groups):
            k = by_pair.get((r, s))
            if k is None:
                cols.append(jnp.zeros((b, nr, ns, kernel.shape[1])))
                continue
            _, _, etype, diag, taps = lay.blocks[k]
            e = ws[k] @ kernel[:taps] + types[etype]
            cols.append(e * jnp.eye(nr)[None, :, :, None] if diag else e)
        rows.append(jnp.concatenate(cols, 2))
        fan_in.append(np.full(nr, sum(1 if lay.blocks[k][3] else lay.groups[lay.blocks[k][0]][1]
                                      for k in lay.incoming(r)), np.float32))
    return jnp.concatenate(rows, 1), None, jnp.asarray(np.concatenate(fan_in))[None]


def _slots(n: int, max_fan_in: int) -> np.ndarray:
    """One-hot [n, max_fan_in]: sender j goes to slot min(j, max_fan_in - 1)."""
    return np.eye(max_fan_in, dtype=np.float32)[np.minimum(np.arange(n), max_fan_in - 1)]


class Learner(base.Blocks, base.Dense):
    name = "weightnet"
    budget = None

    def prepare(self, params, families, activations, forward=None):
        if self.cfg.mode not in MODES:
            raise base.LearnerError(f"weightnet mode {self.cfg.mode!r}; expected one of {MODES}")
        if self.cfg.mode == "canonical":
            params = [canonical.canonicalize(p, f) for p, f in zip(params, families, strict=True)]
        if self.dense:
            return super().prepare(params, families, activations, forward)
        graphs = [graph_lib.to_graph(p, f, a) for p, f, a in zip(params, families, activations, strict=True)]
        if self.budget is None:
            self.budget = (max(int(g.n_node[0]) for g in graphs), max(int(g.n_edge[0]) for g in graphs))
        return graphs

    def gather(self, graphs, rows, rng=None):
        if self.dense:
            return super().gather(graphs, rows, rng)
        t, e = self.budget
        cols = {k: [] for k in ("x", "layer_type", "activation", "layer", "index", "node_mask", "senders", "receivers",
                                "w", "edge_type", "edge_mask")}
        for i in rows.reshape(-1):
            g = graphs[max(int(i), 0)]
            n, m = int(g.n_node[0]), int(g.n_edge[0])
            if n > t or m > e:
                raise base.LearnerError(f"a network with {n} tokens / {m} weights exceeds the budget {self.budget} set "
                                        "from the training networks")
            for k in ("x", "layer_type", "activation", "layer", "index"):
                a = g.nodes[k]
                cols[k].append(np.pad(a, [(0, t - n)] + [(0, 0)] * (a.ndim - 1)))
            cols["node_mask"].append(np.arange(t) < n)
            cols["senders"].append(np.pad(g.senders, (0, e - m)))
            cols["receivers"].append(np.pad(g.receivers, (0, e - m)))
            cols["w"].append(np.pad(g.edges["w"], ((0, e - m), (0, 0))))
            cols["edge_type"].append(np.pad(g.edges["edge_type"], (0, e - m)))
            cols["edge_mask"].append((np.arange(e) < m).astype(np.float32))
        arr = {k: np.stack(v).reshape(*rows.shape, *v[0].shape) for k, v in cols.items()}
        nodes = {k: arr.pop(k) for k in ("x", "layer_type", "activation", "layer", "index")}
        return {"nodes": nodes, **arr}

    def module(self):
        c = self.cfg
        return WeightNet(tuple(self.targets.out_dims().items()), dim=c.dim, n_layers=c.layers, n_heads=c.heads,
                         edge_dim=c.edge_dim, max_input_tokens=c.max_input_tokens,
                         mode=c.mode if c.mode in ("equivariant", "axial") else "flat",
                         layer_types=c.layer_types, dropout=c.dropout)


base.register(base.Entry(
    "weightnet", Learner, structure=True,
    config=dict(dim=32, layers=2, heads=2, edge_dim=8, dropout=0.0, mode="equivariant", layer_types=True, dense=True,
                normalize=True, norm_scope="position", clip=8.0, stats=False, permute_augment=False,
                max_input_tokens=256),
    smoke=dict(dim=16, layers=1, heads=2, edge_dim=4),
    # The axial redesign; without permutation handling (flat), canonicalized instead of equivariant, without
    # layer-type embeddings (node tokens only, and the axial model's).
    ablations={"weightnet_axial": dict(mode="axial"), "weightnet_flat": dict(mode="flat"),
               "weightnet_canonical": dict(mode="canonical"),
               "weightnet_no_layer_types": dict(layer_types=False),
               "weightnet_axial_no_layer_types": dict(mode="axial", layer_types=False)}))
