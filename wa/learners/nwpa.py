"""NWPA: a graph network over a network's neurons (nodes) and weights (edges), after Kofinas et al. 2024.

Per layer, every neuron attends over its incoming edges GAT-style, multi-head and edge-conditioned: the key of
edge j→i is the sender's state plus an embedding of the weight vector, its value the sender's state gated by
(1 + another embedding of the weight) plus the first; a second channel adds the
mean of the incoming edge messages so that the scale of a neuron's weights, which softmax attention normalizes
away, reaches it too. Residual + LayerNorm + MLP per node. Pooling is hierarchical: neurons → layers (mean and
max over each layer's nodes) → network (attention over the layers). Dropout drops whole nodes and whole edges.

Two computations of the same function, sharing parameters:
- dense (``Bucket`` batches, the default): networks of one architecture stacked; the edge embedding is affine
  in the weight (e = w·A + c), so every term of a layer factorizes into batched matrix products with the
  weight block as the adjacency — no per-edge [edges, dim] tensor and no scatter;
- sparse (``jraph.GraphsTuple`` batches, ``cfg.dense=False``): per-edge messages and segment reductions, for
  any mixture of graphs; kept as the reference the dense path is tested against.
Both are invariant to any relabelling of hidden neurons.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from wa.learners import base, heads
from wa.weights import graph as graph_lib


class EdgeEmbed(nn.Module):
    """e(w, type) = w @ kernel + offset[type], [.., 2·dim]: returned as its two tables so that the dense path can
    factor it."""
    features: int

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (graph_lib.EDGE_DIM, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        types = self.param("types", nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
                           (len(graph_lib.EDGE_TYPES), self.features))
        return kernel, bias + types


class Layer(nn.Module):
    dim: int
    n_heads: int

    @nn.compact
    def __call__(self, h, edges):
        q, k, v = (nn.Dense(self.dim, name=n)(h) for n in ("query", "key", "value"))
        msg = self._dense(q, k, v, *edges) if isinstance(edges[0], graph_lib.Layout) else self._sparse(q, k, v,
                                                                                                      *edges)
        return heads.residual_update(h, msg, self.dim)

    def _sparse(self, q, k, v, e_add, e_mul, senders, receivers, edge_keep):
        n, dh = q.shape[0], self.dim // self.n_heads
        q = q[receivers].reshape(-1, self.n_heads, dh)
        k = (k[senders] + e_add).reshape(-1, self.n_heads, dh)
        # A weight multiplies what its sender carries: the value is gated by the edge, plus the edge itself.
        v = v[senders] * e_mul + e_add
        logits = (q * k).sum(-1) / jnp.sqrt(dh)
        logits = jnp.where(edge_keep[:, None], logits, -1e9)
        alpha = jraph.segment_softmax(logits, receivers, num_segments=n) * edge_keep[:, None]
        att = jax.ops.segment_sum(alpha[..., None] * v.reshape(-1, self.n_heads, dh), receivers, n).reshape(n, -1)
        msg = jax.ops.segment_sum(v * edge_keep[:, None], receivers, n)
        cnt = jax.ops.segment_sum(edge_keep.astype(q.dtype), receivers, n)
        return jnp.concatenate([att, msg / jnp.maximum(cnt, 1.0)[:, None]], -1)

    def _dense(self, q, k, v, layout, weights, keeps, kernel, offsets):
        """The same messages per receiver group, from its incoming blocks. With e = w·A + c split into an
        additive (A_a, c_a) and a multiplicative half (A_m, c_m): logit_ij = q_i·k_j + (q_i A_aᵀ)·w_ij + q_i·c_a,
        Σ_j α_ij v_ij = (1 + c_m) ⊙ Σ_j α_ij v_j + Σ_c A_m[c] ⊙ Σ_j α_ij w_ijc v_j + c_a Σ_j α_ij
        + Σ_c A_a[c] Σ_j α_ij w_ijc, and the mean channel likewise with α = keep / count."""
        b, H, dh, D = q.shape[0], self.n_heads, self.dim // self.n_heads, self.dim
        out = []
        for r, (r0, nr) in enumerate(layout.groups):
            ks = layout.incoming(r)
            if not ks:
                out.append(jnp.zeros((b, nr, 2 * D), q.dtype))
                continue
            qr = q[:, r0:r0 + nr].reshape(b, nr, H, dh) / jnp.sqrt(dh)
            logits, parts = [], []
            for kb in ks:
                s, _, etype, diag, taps = layout.blocks[kb]
                s0, ns = layout.groups[s]
                w, keep = weights[kb], keeps[kb]
                aa, am = kernel[:taps, :D].reshape(taps, H, dh), kernel[:taps, D:].reshape(taps, H, dh)
                ca, cm = offsets[etype, :D].reshape(H, dh), offsets[etype, D:].reshape(H, dh)
                ks_, vs = k[:, s0:s0 + ns].reshape(b, ns, H, dh), v[:, s0:s0 + ns].reshape(b, ns, H, dh)
                u = jnp.einsum("bihd,chd->bihc", qr, aa)
                if diag:
                    lg = ((qr * ks_).sum(-1) + jnp.einsum("bihc,bic->bih", u, w[:, :, 0]) + (qr * ca).sum(-1))
                    lg = lg.transpose(0, 2, 1)[..., None]                                     # [b, H, nr, 1]
                else:
                    lg = (jnp.einsum("bihd,bjhd->bhij", qr, ks_) + jnp.einsum("bihc,bijc->bhij", u, w)
                          + jnp.einsum("bihd,hd->bhi", qr, ca)[..., None])
                if keep is not None:
                    lg = jnp.where(keep[:, None], lg, -1e9)
                logits.append(lg)
                parts.append((diag, w, keep, aa, am, ca, cm, vs))
            alpha_all = jax.nn.softmax(jnp.concatenate(logits, -1), -1)
            acc = jnp.zeros((b, nr, 2 * H, dh), q.dtype)
            cnt = jnp.zeros((b, nr), q.dtype)
            at = 0
            two = lambda x: jnp.concatenate([x, x], -2)  # noqa: E731
            for diag, w, keep, aa, am, ca, cm, vs in parts:
                width = 1 if diag else vs.shape[1]
                alpha = alpha_all[..., at:at + width]
                at += width
                kf = jnp.ones((b, nr, width), q.dtype) if keep is None else keep.astype(q.dtype)
                if keep is not None:
                    alpha = alpha * kf[:, None]
                # Heads H..2H carry the mean channel: every edge kept weighs the same (summed here, divided by
                # the count below). One aggregation serves both.
                both = jnp.concatenate([alpha, jnp.broadcast_to(kf[:, None], alpha.shape)], 1)
                acc = acc + _aggregate(both, w, two(vs), two(aa), two(am), two(ca), two(cm), diag)
                cnt = cnt + kf.sum(-1)
            att, tot = acc[:, :, :H].reshape(b, nr, D), acc[:, :, H:].reshape(b, nr, D)
            out.append(jnp.concatenate([att, tot / jnp.maximum(cnt, 1.0)[..., None]], -1))
        return jnp.concatenate(out, 1)


def _aggregate(alpha, w, vs, aa, am, ca, cm, diag):
    """Σ_j α_ij [v_j ⊙ (1 + c_m + w_ij·A_m) + c_a + w_ij·A_a] per head: alpha [b, H, nr, ns | 1], w [b, nr, ns | 1,
    taps], vs [b, ns, H, dh] → [b, nr, H, dh]."""
    if diag:
        a = alpha[..., 0].transpose(0, 2, 1)[..., None]                                      # [b, nr, H, 1]
        wi = w[:, :, 0]
        return a * (vs * (1.0 + cm + jnp.einsum("bic,chd->bihd", wi, am)) + ca
                    + jnp.einsum("bic,chd->bihd", wi, aa))
    out = jnp.einsum("bhij,bjhd->bihd", alpha, vs) * (1.0 + cm)
    if w.shape[-1] == 1:
        out = out + jnp.einsum("bhij,bjhd->bihd", alpha * w[:, None, ..., 0], vs) * am[0]
    else:
        out = out + jnp.einsum("bhij,bijc,bjhd,chd->bihd", alpha, w, vs, am)
    out = out + alpha.sum(-1).transpose(0, 2, 1)[..., None] * ca
    return out + jnp.einsum("bhij,bijc,chd->bihd", alpha, w, aa)


class NWPA(nn.Module):
    out_dims: tuple
    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    max_layers: int = 32
    node_dropout: float = 0.0
    edge_dropout: float = 0.0
    max_input_tokens: int = 256

    @nn.compact
    def __call__(self, g, train: bool = False):
        kernel, offsets = EdgeEmbed(2 * self.dim, name="edge_embed")()
        if isinstance(g, base.Bucket):
            return self._dense(g, kernel, offsets, train)
        return self._sparse(g, kernel, offsets, train)

    def _node_dropout(self, h, train):
        if train and self.node_dropout > 0:
            h = h * jax.random.bernoulli(self.make_rng("dropout"), 1 - self.node_dropout, (*h.shape[:-1], 1))
        return h

    def _sparse(self, g: jraph.GraphsTuple, kernel, offsets, train):
        n, n_graph = g.nodes["x"].shape[0], g.n_node.shape[0]
        h = heads.NodeEmbed(self.dim, name="node_embed")(g.nodes)
        # Edges are embedded once (additive and multiplicative parts), not per layer.
        e = g.edges["w"] @ kernel + offsets[g.edges["edge_type"]]
        e_add, e_mul = e[:, :self.dim], 1.0 + e[:, self.dim:]
        edge_keep = jnp.ones(g.senders.shape, bool)
        if train and self.edge_dropout > 0:
            edge_keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.edge_dropout, g.senders.shape)
        for i in range(self.n_layers):
            h = self._node_dropout(h, train)
            h = Layer(self.dim, self.n_heads, name=f"layer_{i}")(h, (e_add, e_mul, g.senders, g.receivers, edge_keep))
        gid = jnp.repeat(jnp.arange(n_graph), g.n_node, total_repeat_length=n)
        seg = gid * self.max_layers + jnp.minimum(g.nodes["layer"], self.max_layers - 1)
        m = n_graph * self.max_layers
        cnt = jax.ops.segment_sum(jnp.ones(n), seg, m)
        present = cnt > 0
        mean = jax.ops.segment_sum(h, seg, m) / jnp.maximum(cnt, 1.0)[:, None]
        mx = jnp.where(present[:, None], jax.ops.segment_max(h, seg, m), 0.0)
        pooled = jnp.concatenate([mean, mx], -1).reshape(n_graph, self.max_layers, -1)
        return self._readout(pooled, present.reshape(n_graph, -1), None)

    def _dense(self, g: base.Bucket, kernel, offsets, train):
        g, rows = base.drop_wide_inputs(g, self.max_input_tokens)
        lay = g.layout
        if len(lay.groups) > self.max_layers:
            raise base.LearnerError(f"a network with {len(lay.groups)} layers exceeds max_layers={self.max_layers}")
        h = heads.add_wide_rows(heads.NodeEmbed(self.dim, name="node_embed")(g.nodes), rows, self.dim)
        keeps = [None] * len(lay.blocks)
        if train and self.edge_dropout > 0:
            keeps = [jax.random.bernoulli(self.make_rng("dropout"), 1 - self.edge_dropout, w.shape[:3])
                     for w in g.weights]
        for i in range(self.n_layers):
            h = self._node_dropout(h, train)
            h = Layer(self.dim, self.n_heads, name=f"layer_{i}")(h, (lay, g.weights, keeps, kernel, offsets))
        pooled = jnp.stack([jnp.concatenate([h[:, s:s + n].mean(1), h[:, s:s + n].max(1)], -1)
                            for s, n in lay.groups], 1)
        return self._readout(pooled, jnp.ones(pooled.shape[:2], bool), g.stats)

    def _readout(self, pooled, present, stats):
        """Layers (mean and max of their nodes) → network: attention over layers plus their mean; then the
        per-layer statistics when the learner reads them (multi-resolution), the embedding and the heads."""
        lay = nn.gelu(nn.Dense(self.dim, name="layer_pool")(pooled))
        score = jnp.where(present, nn.Dense(1, name="layer_score")(lay)[..., 0], -1e9)
        z = (jax.nn.softmax(score, -1)[..., None] * lay).sum(1)
        z = jnp.concatenate([z, (lay * present[..., None]).sum(1) / jnp.maximum(present.sum(1, keepdims=True), 1)],
                            -1)
        z = heads.fuse_stats(z, stats, self.dim)
        z = nn.Dense(self.dim, name="embedding")(z)
        out = heads.Heads(self.out_dims, self.dim, name="heads")(nn.gelu(z))
        return {"embedding": z, **out}


class Learner(base.Blocks, base.Graphs):
    name = "nwpa"

    def prepare(self, params, families, activations, forward=None):
        if self.dense:
            return super().prepare(params, families, activations, forward)
        return [graph_lib.to_graph(p, f, a) for p, f, a in zip(params, families, activations, strict=True)]

    def module(self):
        c = self.cfg
        return NWPA(tuple(self.targets.out_dims().items()), dim=c.dim, n_layers=c.layers, n_heads=c.heads,
                    node_dropout=c.node_dropout, edge_dropout=c.edge_dropout, max_input_tokens=c.max_input_tokens)


# max_input_tokens: a larger input layer (28x28 pixels) is read as per-neuron rows, not as nodes.
base.register(base.Entry(
    "nwpa", Learner, structure=True,
    config=dict(dim=32, layers=2, heads=2, node_dropout=0.05, edge_dropout=0.1, dense=True, normalize=True,
                norm_scope="position", clip=8.0, stats=False, max_input_tokens=256),
    smoke=dict(dim=16, layers=1, heads=2)))
