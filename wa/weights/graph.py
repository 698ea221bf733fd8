"""A network as a graph (Kofinas et al. 2024): nodes are input units and neurons/channels, edges are weights.

Node features: ``x`` = [bias, depth position in [0, 1], is_input, is_output] with integer ``layer_type``
(input, dense, conv, output) and ``activation`` ids for learned embeddings. Edge features: ``w`` = the weight,
or for a convolution the flattened k×k kernel between two channels, zero-padded to ``EDGE_DIM``; integer
``edge_type`` (dense, conv). Senders are the layer's input units, receivers its output units.

Implemented here for the MLP and CNN zoo families; the transformer (attention, residual edges) follows.
"""

from __future__ import annotations

import contextlib

import jax
import jraph
import numpy as np

from wa.zoo import archs as archs_lib

EDGE_DIM = 9
LAYER_TYPES = ("input", "dense", "conv", "output")
EDGE_TYPES = ("dense", "conv")
ACTIVATIONS = ("none", *sorted(archs_lib.ACTIVATIONS))


class GraphError(ValueError):
    pass


def layers(params: dict, family: str) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(name, kind, kernel, bias) in forward order; kernels [fan_in, fan_out] or [k, k, fan_in, fan_out]."""
    if family == "mlp":
        names = sorted((k for k in params if k.startswith("hidden_")), key=lambda k: int(k.split("_")[1]))
        kind = "dense"
    elif family == "cnn":
        names = sorted((k for k in params if k.startswith("conv_")), key=lambda k: int(k.split("_")[1]))
        kind = "conv"
    else:
        raise GraphError(f"no graph view for family {family!r} yet; implemented: mlp, cnn")
    out = [(n, kind, np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])) for n in names]
    return out + [("head", "dense", np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"]))]


def to_graph(params: dict, family: str, activation: str) -> jraph.GraphsTuple:
    """One network as a single-graph ``GraphsTuple`` (numpy leaves)."""
    if activation not in ACTIVATIONS:
        raise GraphError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")
    ls = layers(params, family)
    n_in = ls[0][2].shape[-2]
    depth = len(ls)
    xs = [np.stack([np.zeros(n_in), np.zeros(n_in), np.ones(n_in), np.zeros(n_in)], axis=1)]
    ltype = [np.zeros(n_in, np.int32)]
    act = [np.zeros(n_in, np.int32)]
    senders, receivers, w, etype = [], [], [], []
    offset, prev = n_in, np.arange(n_in)
    for li, (_, kind, kernel, bias) in enumerate(ls):
        fan_in, fan_out = kernel.shape[-2], kernel.shape[-1]
        last = li == depth - 1
        units = offset + np.arange(fan_out)
        xs.append(np.stack([bias, np.full(fan_out, (li + 1) / depth), np.zeros(fan_out),
                            np.full(fan_out, float(last))], axis=1))
        ltype.append(np.full(fan_out, LAYER_TYPES.index("output" if last else kind), np.int32))
        act.append(np.full(fan_out, 0 if last else ACTIVATIONS.index(activation), np.int32))
        s, r = np.meshgrid(prev, units, indexing="ij")  # [fan_in, fan_out]
        senders.append(s.reshape(-1))
        receivers.append(r.reshape(-1))
        vec = kernel.reshape(-1, fan_in, fan_out).transpose(1, 2, 0).reshape(fan_in * fan_out, -1)
        if vec.shape[1] > EDGE_DIM:
            raise GraphError(f"kernel of {vec.shape[1]} taps exceeds EDGE_DIM={EDGE_DIM}")
        w.append(np.pad(vec, ((0, 0), (0, EDGE_DIM - vec.shape[1]))))
        etype.append(np.full(fan_in * fan_out, EDGE_TYPES.index(kind), np.int32))
        offset += fan_out
        prev = units
    n_nodes, n_edges = offset, sum(len(s) for s in senders)
    return jraph.GraphsTuple(
        nodes={"x": np.concatenate(xs).astype(np.float32), "layer_type": np.concatenate(ltype),
               "activation": np.concatenate(act)},
        edges={"w": np.concatenate(w).astype(np.float32), "edge_type": np.concatenate(etype)},
        senders=np.concatenate(senders).astype(np.int32), receivers=np.concatenate(receivers).astype(np.int32),
        n_node=np.array([n_nodes], np.int32), n_edge=np.array([n_edges], np.int32), globals=None)


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
