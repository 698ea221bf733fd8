"""NWPA: a graph network over a network's neurons (nodes) and weights (edges), after Kofinas et al. 2024.

Per layer, every neuron attends over its incoming edges GAT-style, multi-head and edge-conditioned: the key of
edge j→i is the sender's state plus an embedding of the weight vector, its value the sender's state gated by
(1 + another embedding of the weight) plus the first; a second channel adds the
mean of the incoming edge messages so that the scale of a neuron's weights, which softmax attention normalizes
away, reaches it too. Residual + LayerNorm + MLP per node. Pooling is hierarchical: neurons → layers (mean and
max over each layer's nodes) → network (attention over the layers). Dropout drops whole nodes and whole edges.
Every operation is a segment reduction over edges or nodes, so the output is invariant to any relabelling of
the hidden neurons.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from wa.learners import base, heads
from wa.weights import graph as graph_lib


class Layer(nn.Module):
    dim: int
    n_heads: int

    @nn.compact
    def __call__(self, h, e_add, e_mul, senders, receivers, edge_keep):
        n, dh = h.shape[0], self.dim // self.n_heads
        q = nn.Dense(self.dim, name="query")(h)[receivers].reshape(-1, self.n_heads, dh)
        k = (nn.Dense(self.dim, name="key")(h)[senders] + e_add).reshape(-1, self.n_heads, dh)
        # A weight multiplies what its sender carries: the value is gated by the edge, plus the edge itself.
        v = nn.Dense(self.dim, name="value")(h)[senders] * e_mul + e_add
        logits = (q * k).sum(-1) / jnp.sqrt(dh)
        logits = jnp.where(edge_keep[:, None], logits, -1e9)
        alpha = jraph.segment_softmax(logits, receivers, num_segments=n) * edge_keep[:, None]
        att = jax.ops.segment_sum(alpha[..., None] * v.reshape(-1, self.n_heads, dh), receivers, n).reshape(n, -1)
        msg = jax.ops.segment_sum(v * edge_keep[:, None], receivers, n)
        cnt = jax.ops.segment_sum(edge_keep.astype(h.dtype), receivers, n)
        mean = msg / jnp.maximum(cnt, 1.0)[:, None]
        return heads.residual_update(h, jnp.concatenate([att, mean], -1), self.dim)


class NWPA(nn.Module):
    out_dims: tuple
    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    max_layers: int = 32
    node_dropout: float = 0.0
    edge_dropout: float = 0.0

    @nn.compact
    def __call__(self, g: jraph.GraphsTuple, train: bool = False):
        n, n_graph = g.nodes["x"].shape[0], g.n_node.shape[0]
        h = heads.NodeEmbed(self.dim, name="node_embed")(g.nodes)
        # Edges are embedded once (additive and multiplicative parts), not per layer: a digits-zoo batch holds
        # ~80k edges and ~5k nodes, so per-edge matrix products would dominate the step.
        e = nn.Dense(2 * self.dim, name="edge_embed")(g.edges["w"]) + nn.Embed(
            len(graph_lib.EDGE_TYPES), 2 * self.dim, name="edge_type")(g.edges["edge_type"])
        e_add, e_mul = e[:, :self.dim], 1.0 + e[:, self.dim:]
        edge_keep = jnp.ones(g.senders.shape, bool)
        if train and self.edge_dropout > 0:
            edge_keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.edge_dropout, g.senders.shape)
        for i in range(self.n_layers):
            if train and self.node_dropout > 0:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.node_dropout, (n, 1))
                h = h * keep
            h = Layer(self.dim, self.n_heads, name=f"layer_{i}")(h, e_add, e_mul, g.senders, g.receivers, edge_keep)
        gid = jnp.repeat(jnp.arange(n_graph), g.n_node, total_repeat_length=n)
        seg = gid * self.max_layers + jnp.minimum(g.nodes["layer"], self.max_layers - 1)
        m = n_graph * self.max_layers
        cnt = jax.ops.segment_sum(jnp.ones(n), seg, m)
        present = cnt > 0
        mean = jax.ops.segment_sum(h, seg, m) / jnp.maximum(cnt, 1.0)[:, None]
        mx = jnp.where(present[:, None], jax.ops.segment_max(h, seg, m), 0.0)
        lay = nn.gelu(nn.Dense(self.dim, name="layer_pool")(jnp.concatenate([mean, mx], -1)))
        lay = lay.reshape(n_graph, self.max_layers, self.dim)
        score = jnp.where(present.reshape(n_graph, -1), nn.Dense(1, name="layer_score")(lay)[..., 0], -1e9)
        z = (jax.nn.softmax(score, -1)[..., None] * lay).sum(1)
        z = jnp.concatenate([z, (lay * present.reshape(n_graph, -1, 1)).sum(1)
                             / jnp.maximum(present.reshape(n_graph, -1).sum(1, keepdims=True), 1)], -1)
        z = nn.Dense(self.dim, name="embedding")(z)
        out = heads.Heads(self.out_dims, self.dim, name="heads")(nn.gelu(z))
        return {"embedding": z, **out}


class Learner(base.Graphs):
    name = "nwpa"

    def prepare(self, params, families, activations):
        return [graph_lib.to_graph(p, f, a) for p, f, a in zip(params, families, activations, strict=True)]

    def module(self):
        c = self.cfg
        return NWPA(tuple(self.targets.out_dims().items()), dim=c.dim, n_layers=c.layers, n_heads=c.heads,
                    node_dropout=c.node_dropout, edge_dropout=c.edge_dropout)
