"""WeightNet: a transformer over neuron tokens (one token per input unit, neuron or channel).

Equivariant by default: hidden tokens carry no position, only their bias, layer type and activation; inputs and
outputs keep their index (their identity survives a permutation of hidden units). Weights enter twice, both
through a dense [T, T] edge tensor built inside the step from the graph's edge list, so that permuting hidden
neurons permutes both of its axes together: (1) as per-head biases of the attention logits and as
attention-weighted edge values (edge-conditioned attention, mixing across all layers); (2) as a propagation
channel Σ_j W_ij · h_j, the network's own weights applied to the token states. Each token also starts with the
sum of its incoming edges (DeepSets). Pooling: masked mean + attention pooling over tokens.

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

MODES = ("equivariant", "flat", "canonical")


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
    mode: str = "equivariant"
    layer_types: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, batch, train: bool = False):
        nodes, mask = batch["nodes"], batch["node_mask"]
        b, t = mask.shape
        eq = self.mode == "equivariant"
        h = heads.NodeEmbed(self.dim, self.layer_types, "fixed" if eq else "all", name="node_embed")(nodes)
        bi = jnp.arange(b)[:, None]
        s, r, w, em = batch["senders"], batch["receivers"], batch["w"], batch["edge_mask"]
        dense_e = None
        if eq:
            ew = nn.Dense(self.edge_dim, name="edge_embed")(w) + nn.Embed(
                len(graph_lib.EDGE_TYPES), self.edge_dim, name="edge_type")(batch["edge_type"])
            dense_e = jnp.zeros((b, t, t, self.edge_dim)).at[bi, r, s].add(ew * em[..., None])
            fan_in = jnp.zeros((b, t)).at[bi, r].add(em)
            h = h + nn.Dense(self.dim, name="incoming")(dense_e.sum(2) / jnp.sqrt(jnp.maximum(fan_in, 1.0))[..., None])
        else:
            # Stored order: the sender's index inside its layer is the slot (transformer residual edges, constant 1,
            # share the slot of a dense edge and add to it).
            slot = jnp.minimum(jnp.take_along_axis(nodes["index"], s, 1), self.max_fan_in - 1)
            inc = jnp.zeros((b, t, self.max_fan_in, w.shape[-1])).at[bi, r, slot].add(w * em[..., None])
            h = h + nn.Dense(self.dim, name="incoming")(inc.reshape(b, t, -1))
        for i in range(self.n_layers):
            if train and self.dropout > 0:
                h = nn.Dropout(self.dropout, deterministic=False)(h)
            h = Block(self.dim, self.n_heads, eq, name=f"block_{i}")(h, mask, dense_e)
        m = mask[..., None].astype(h.dtype)
        mean = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        score = jnp.where(mask, nn.Dense(1, name="pool_score")(h)[..., 0], -1e9)
        att = (jax.nn.softmax(score, -1)[..., None] * h).sum(1)
        z = nn.Dense(self.dim, name="embedding")(jnp.concatenate([mean, att], -1))
        return {"embedding": z, **heads.Heads(self.out_dims, self.dim, name="heads")(nn.gelu(z))}


class Learner(base.Dense):
    name = "weightnet"
    budget = None

    def prepare(self, params, families, activations):
        if self.cfg.mode not in MODES:
            raise base.LearnerError(f"weightnet mode {self.cfg.mode!r}; expected one of {MODES}")
        if self.cfg.mode == "canonical":
            params = [canonical.canonicalize(p, f) for p, f in zip(params, families, strict=True)]
        graphs = [graph_lib.to_graph(p, f, a) for p, f, a in zip(params, families, activations, strict=True)]
        if self.budget is None:
            self.budget = (max(int(g.n_node[0]) for g in graphs), max(int(g.n_edge[0]) for g in graphs))
        return graphs

    def gather(self, graphs, rows):
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
                         edge_dim=c.edge_dim, mode="equivariant" if c.mode == "equivariant" else "flat",
                         layer_types=c.layer_types, dropout=c.dropout)
