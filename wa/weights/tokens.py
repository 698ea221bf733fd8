"""Neuron tokens: the graph view as dense arrays for transformer learners (WeightNet).

One token per node (inputs, neurons, channels). ``edges`` [T, T, EDGE_DIM] holds the weight (vector) from
token j to token i at [i, j], with ``adjacency`` marking real edges; a learner that reads a token's incoming
weights through this tensor, paired with the sender tokens, is equivariant to permutations of hidden units
(both axes permute together). ``incoming`` is the same information flattened in the stored order of the
senders ([T, max_fan_in * EDGE_DIM]): the ablation without permutation handling reads it.
"""

from __future__ import annotations

import numpy as np

from wa import errors
from wa.weights.graph import EDGE_DIM


class TokenError(errors.ConfigError):
    pass


def to_tokens(graph, max_tokens: int, max_fan_in: int = 0) -> dict[str, np.ndarray]:
    n = int(graph.n_node[0])
    if len(graph.n_node) != 1:
        raise TokenError("to_tokens takes one network's graph, not a batch")
    if n > max_tokens:
        raise TokenError(f"network has {n} nodes, more than max_tokens={max_tokens}")
    s, r, w = graph.senders, graph.receivers, graph.edges["w"]
    edges = np.zeros((max_tokens, max_tokens, EDGE_DIM), np.float32)
    edges[r, s] = w
    adjacency = np.zeros((max_tokens, max_tokens), bool)
    adjacency[r, s] = True
    edge_type = np.full((max_tokens, max_tokens), -1, np.int32)
    edge_type[r, s] = graph.edges["edge_type"]
    fan_in = np.bincount(r, minlength=n)
    f = max_fan_in or int(fan_in.max())
    if fan_in.max() > f:
        raise TokenError(f"a node has {fan_in.max()} incoming edges, more than max_fan_in={f}")
    order = np.lexsort((s, r))  # by receiver, then sender in stored order
    slot = np.arange(len(order)) - np.repeat(np.cumsum(fan_in) - fan_in, fan_in)
    incoming = np.zeros((max_tokens, f, EDGE_DIM), np.float32)
    incoming[r[order], slot] = w[order]
    pad = max_tokens - n
    nodes = graph.nodes
    return {
        "x": np.pad(nodes["x"], ((0, pad), (0, 0))),
        "layer_type": np.pad(nodes["layer_type"], (0, pad)),
        "activation": np.pad(nodes["activation"], (0, pad)),
        "mask": np.arange(max_tokens) < n,
        "edges": edges,
        "adjacency": adjacency,
        "edge_type": edge_type,
        "incoming": incoming.reshape(max_tokens, f * EDGE_DIM),
    }
