"""A network as a graph (Kofinas et al. 2024): nodes are input units and neurons/channels, edges are weights.

Node features: ``x`` = [bias, depth position in [0, 1], is_input, is_output] with integer ``layer_type``
(input, dense, conv, output) and ``activation`` ids for learned embeddings, ``layer`` (the node group's number in
forward order, for pooling neurons into layers) and ``index`` (the node's place inside its group: meaningful for
input and output units, arbitrary for hidden ones, which a permutation-aware learner must not read). Edge
features: ``w`` = the weight, or for a convolution the flattened k×k kernel between two channels, zero-padded to
``EDGE_DIM``; integer ``edge_type`` (dense, conv, residual, norm, position). Senders are the layer's input
units, receivers its output units.

A chain family (MLP, CNN) gets one node group per layer; any other family adds its own nodes and edges through
this module's builder (its ``ZooFamily.graph`` in ``wa.zoo.archs``; the patch transformer's is described there).

The same graph comes in two forms. ``to_graph``: a ``jraph.GraphsTuple`` (edge lists, for irregular batches and
segment ops). ``to_blocks``: ``Blocked``, the graph as node groups (one per layer, contiguous) and edge blocks
(one per weight tensor: a dense [receivers, senders, taps] array or a diagonal), so that networks of one
architecture share a static ``Layout`` and stack into dense tensors: message passing over a block is then a
batched matrix product with the weight matrix as the adjacency.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jraph
import numpy as np

from wa import errors
from wa.zoo import archs as archs_lib

EDGE_DIM = 9
# Node kinds: those of a chain, then every registered family's own, in registration order (learned embeddings
# index this tuple, so a new family appends).
LAYER_TYPES = tuple(dict.fromkeys(("input", "dense", "conv", "output",
                                   *(k for f in archs_lib.FAMILIES.values() for k in f.node_kinds))))
EDGE_TYPES = ("dense", "conv", "residual", "norm", "position")
ACTIVATIONS = ("none", *sorted(archs_lib.ACTIVATIONS))


class GraphError(errors.ConfigError):
    pass


def layers(params: dict, family: str) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(name, kind, kernel, bias) in forward order for a chain family (MLP, CNN); kernels [fan_in, fan_out] or
    [k, k, fan_in, fan_out]."""
    fam = archs_lib.family(family)
    if not fam.chain:
        raise GraphError(f"family {family!r} is not a chain of layers; chains: "
                         f"{sorted(archs_lib.chain_families())}")
    return [(n, kind, np.asarray(k), np.asarray(b)) for n, kind, k, b in fam.layers(params)]


class Builder:
    """Accumulates nodes (with their features) and edges, in the order they are added."""

    def __init__(self):
        self.bias, self.pos, self.inp, self.out, self.ltype, self.act = [], [], [], [], [], []
        self.layer, self.index = [], []
        self.s, self.r, self.w, self.etype = [], [], [], []
        self.n = 0
        self.group_of = {}       # first node id -> group (layer) number
        self.blocks = []         # (sender group, receiver group, edge type, diagonal, [receivers, senders|1, taps])

    def nodes(self, n: int, kind: str, depth: float, bias=None, act: int = 0, inp=False, out=False) -> np.ndarray:
        idx = self.n + np.arange(n)
        self.group_of[self.n] = len(self.layer)
        self.n += n
        self.bias.append(np.zeros(n) if bias is None else np.asarray(bias, np.float64))
        self.pos.append(np.full(n, depth))
        self.inp.append(np.full(n, float(inp)))
        self.out.append(np.full(n, float(out)))
        self.ltype.append(np.full(n, LAYER_TYPES.index(kind), np.int32))
        self.act.append(np.full(n, act, np.int32))
        self.layer.append(np.full(n, len(self.layer), np.int32))
        self.index.append(np.arange(n, dtype=np.int32))
        return idx

    def dense(self, src, dst, kernel, kind="dense"):
        """All-to-all edges; ``kernel`` [fan_in, fan_out] or [k, k, fan_in, fan_out] (taps become the vector)."""
        kernel = np.asarray(kernel)
        fan_in, fan_out = kernel.shape[-2], kernel.shape[-1]
        s, r = np.meshgrid(src, dst, indexing="ij")
        vec = kernel.reshape(-1, fan_in, fan_out).transpose(1, 2, 0).reshape(fan_in * fan_out, -1)
        if vec.shape[1] > EDGE_DIM:
            raise GraphError(f"a {'x'.join(map(str, kernel.shape[:-2]))} kernel ({vec.shape[1]} taps): the graph and "
                             f"token views carry at most {EDGE_DIM} taps per edge (3x3 kernels); read such networks "
                             "with the statistics or spectral learners (stats_gbt, spectral_gbt, stats_mlp)")
        self._edges(s.reshape(-1), r.reshape(-1), vec, kind)
        self._block(src, dst, kind, False, vec.reshape(fan_in, fan_out, -1).transpose(1, 0, 2))

    def diagonal(self, src, dst, values, kind):
        values = np.asarray(values, np.float64).reshape(-1, 1)
        self._edges(np.asarray(src), np.asarray(dst), values, kind)
        self._block(src, dst, kind, True, values[:, None, :])

    def _block(self, src, dst, kind, diagonal, w):
        self.blocks.append((self.group_of[int(src[0])], self.group_of[int(dst[0])], EDGE_TYPES.index(kind), diagonal,
                            w.astype(np.float32)))

    def _edges(self, s, r, vec, kind):
        self.s.append(s)
        self.r.append(r)
        self.w.append(np.pad(vec, ((0, 0), (0, EDGE_DIM - vec.shape[1]))))
        self.etype.append(np.full(len(s), EDGE_TYPES.index(kind), np.int32))

    def tuple(self) -> jraph.GraphsTuple:
        x = np.stack([np.concatenate(a) for a in (self.bias, self.pos, self.inp, self.out)], axis=1)
        n_edge = sum(len(s) for s in self.s)
        return jraph.GraphsTuple(
            nodes={"x": x.astype(np.float32), "layer_type": np.concatenate(self.ltype),
                   "activation": np.concatenate(self.act), "layer": np.concatenate(self.layer),
                   "index": np.concatenate(self.index)},
            edges={"w": np.concatenate(self.w).astype(np.float32), "edge_type": np.concatenate(self.etype)},
            senders=np.concatenate(self.s).astype(np.int32), receivers=np.concatenate(self.r).astype(np.int32),
            n_node=np.array([self.n], np.int32), n_edge=np.array([n_edge], np.int32), globals=None)

    def blocked(self) -> Blocked:
        g = self.tuple()
        sizes = [len(b) for b in self.bias]
        groups = tuple((int(s), n) for s, n in zip(np.cumsum([0] + sizes[:-1]), sizes, strict=True))
        layout = Layout(groups, tuple((s, r, t, d, w.shape[-1]) for s, r, t, d, w in self.blocks))
        return Blocked(layout, g.nodes, tuple(b[-1] for b in self.blocks))


@dataclasses.dataclass(frozen=True)
class Layout:
    """What networks of one architecture share: node groups ``(first node, size)`` in forward order, and edge
    blocks ``(sender group, receiver group, edge type, diagonal, taps)``. A dense block's weights are
    [receivers, senders, taps]; a diagonal one's [n, 1, taps] (receiver i's only sender is the group's node i)."""
    groups: tuple
    blocks: tuple

    @property
    def n_nodes(self) -> int:
        return sum(n for _, n in self.groups)

    def incoming(self, group: int) -> list[int]:
        return [b for b, (_, r, *_) in enumerate(self.blocks) if r == group]


@dataclasses.dataclass
class Blocked:
    layout: Layout
    nodes: dict          # the graph's node features, [nodes, ...]
    weights: tuple       # per block, see ``Layout``
    stats: np.ndarray | None = None    # per-network features a learner may add (multi-resolution input)


def _sequential(params, family, act) -> Builder:
    ls = layers(params, family)
    g, depth = Builder(), len(ls)
    prev = g.nodes(ls[0][2].shape[-2], "input", 0.0, inp=True)
    for li, (_, kind, kernel, bias) in enumerate(ls):
        last = li == depth - 1
        cur = g.nodes(kernel.shape[-1], "output" if last else kind, (li + 1) / depth, bias, 0 if last else act,
                      out=last)
        g.dense(prev, cur, kernel, kind)
        prev = cur
    return g


def _build(params: dict, family: str, activation: str) -> Builder:
    if activation not in ACTIVATIONS:
        raise GraphError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")
    act = ACTIVATIONS.index(activation)
    try:
        fam = archs_lib.family(family)
    except archs_lib.ArchError as e:
        raise GraphError(f"no graph view for family {family!r}: {e}") from None
    if fam.chain:
        return _sequential(params, family, act)
    g = Builder()
    fam.graph(g, params, act)
    return g


def to_graph(params: dict, family: str, activation: str) -> jraph.GraphsTuple:
    """One network as a single-graph ``GraphsTuple`` (numpy leaves)."""
    return _build(params, family, activation).tuple()


def to_blocks(params: dict, family: str, activation: str) -> Blocked:
    """One network as node groups and dense edge blocks (see ``Layout``)."""
    return _build(params, family, activation).blocked()


@contextlib.contextmanager
def _tree_map_shim():
    """jraph 0.0.6's padding helpers call ``jax.tree_map``, which JAX removed in 0.6."""
    had = hasattr(jax, "tree_map")
    if not had:
        jax.tree_map = jax.tree.map
    try:
        yield
    finally:
        if not had:
            del jax.tree_map


def batch(graphs: list[jraph.GraphsTuple], n_node: int, n_edge: int, n_graph: int) -> jraph.GraphsTuple:
    """Batches graphs and pads to fixed budgets (``n_graph`` counts the padding graph), so that one compiled
    step serves every batch."""
    g = jraph.batch_np(graphs)
    need = (int(g.n_node.sum()) + 1, int(g.n_edge.sum()), len(graphs) + 1)
    if need[0] > n_node or need[1] > n_edge or need[2] > n_graph:
        raise GraphError(f"budget (nodes {n_node}, edges {n_edge}, graphs {n_graph}) is below what the batch needs "
                         f"(nodes {need[0]}, edges {need[1]}, graphs {need[2]}, one padding graph included)")
    with _tree_map_shim():
        return jraph.pad_with_graphs(g, n_node, n_edge, n_graph)
