"""The two kinds of learner and their batching.

A ``Neural`` learner is a Flax module plus the views it reads; ``wa.train.loop`` trains every one of them the
same way. Its batches carry a leading device axis [D, ...] (one sub-batch per data-parallel shard) and ``rows``
[D, G]: the metadata row of each prediction slot, -1 where a slot is padding. A ``Fitted`` learner (scikit-learn
baselines) fits in one call and needs no loop.
"""

from __future__ import annotations

import jax
import numpy as np

from wa.learners.data import Targets
from wa.weights import graph as graph_lib


class LearnerError(ValueError):
    pass


class Learner:
    name = ""
    neural = True

    def __init__(self, cfg, targets: Targets, n_devices: int = 1):
        self.cfg, self.targets, self.n_devices = cfg, targets, n_devices

    def prepare(self, params: list, families, activations):
        """Views of these networks, in row order."""
        raise NotImplementedError

    def setup(self, feats, train_idx: np.ndarray, batch_size: int) -> None:
        """Whatever the learner fixes from the prepared networks before training: feature scaling from the
        training rows (dense baselines), batch budgets (graph learners). A no-op by default."""


class Neural(Learner):
    def module(self):
        raise NotImplementedError

    def batches(self, feats, idx: np.ndarray, batch_size: int, rng: np.random.Generator | None):
        raise NotImplementedError

    def _order(self, idx, rng):
        idx = np.asarray(idx)
        return rng.permutation(idx) if rng is not None else idx

    def _check_batch(self, batch_size: int) -> int:
        if batch_size % self.n_devices:
            raise LearnerError(f"batch size {batch_size} is not divisible by the {self.n_devices} data-parallel "
                               "devices")
        return batch_size // self.n_devices


class Dense(Neural):
    """Learners that read one fixed-size array per network: batches are row slices, padded with row -1."""

    def gather(self, feats, rows: np.ndarray):
        raise NotImplementedError

    def batches(self, feats, idx, batch_size, rng):
        per = self._check_batch(batch_size)
        order = self._order(idx, rng)
        pad = (-len(order)) % batch_size
        rows = np.concatenate([order, np.full(pad, -1)]).reshape(-1, self.n_devices, per)
        for r in rows:
            yield self.gather(feats, r), r


class Graphs(Neural):
    """Learners that read ``jraph.GraphsTuple`` batches: graphs are packed greedily into sub-batches under fixed
    node / edge / graph budgets (set from the first set of networks prepared, with 25% slack over the mean) and
    padded by ``jraph.pad_with_graphs``, so one compiled step serves every batch."""

    budget = None

    def setup(self, graphs: list, train_idx, batch_size: int):
        per = self._check_batch(batch_size)
        nn_ = np.array([int(g.n_node[0]) for g in graphs])
        ne = np.array([int(g.n_edge[0]) for g in graphs])
        self.budget = (max(int(per * nn_.mean() * 1.25), int(nn_.max())) + 1,
                       max(int(per * ne.mean() * 1.25), int(ne.max())), per + 1)

    def _pack(self, graphs, order):
        n_node, n_edge, n_graph = self.budget
        cur, nodes, edges = [], 0, 0
        for i in order:
            g = graphs[i]
            a, b = int(g.n_node[0]), int(g.n_edge[0])
            if a + 1 > n_node or b > n_edge:
                raise LearnerError(f"a network with {a} nodes / {b} edges exceeds the batch budget {self.budget}, "
                                   "which was set from the training networks; prepare the largest ones first")
            if cur and (nodes + a + 1 > n_node or edges + b > n_edge or len(cur) + 1 >= n_graph):
                yield cur
                cur, nodes, edges = [], 0, 0
            cur.append(i)
            nodes, edges = nodes + a, edges + b
        if cur:
            yield cur

    def batches(self, graphs, idx, batch_size, rng):
        self._check_batch(batch_size)
        if self.budget is None:
            raise LearnerError("setup() must run before batches()")
        n_graph = self.budget[2]
        subs = list(self._pack(graphs, self._order(idx, rng)))
        subs += [[]] * ((-len(subs)) % self.n_devices)
        for k in range(0, len(subs), self.n_devices):
            parts, rows = [], []
            for sub in subs[k:k + self.n_devices]:
                # An empty shard still needs a batch of the right shape; its slots are all marked padding.
                parts.append(graph_lib.batch([graphs[i] for i in (sub or [0])], *self.budget))
                rows.append(np.array(sub + [-1] * (n_graph - len(sub))))
            yield stack(parts), np.stack(rows)


def stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)
