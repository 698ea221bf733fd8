"""The two kinds of learner and their batching.

A ``Neural`` learner is a Flax module plus the views it reads; ``wa.train.loop`` trains every one of them the
same way. Its batches carry a leading device axis [D, ...] (one sub-batch per data-parallel shard) and ``rows``
[D, G]: the metadata row of each prediction slot, -1 where a slot is padding. A ``Fitted`` learner (scikit-learn
baselines) fits in one call and needs no loop.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from sklearn import base as base_estimator

from wa import errors
from wa.learners.data import Targets
from wa.weights import graph as graph_lib
from wa.weights import stats as weight_stats
from wa.zoo import archs


class LearnerError(errors.ConfigError):
    pass


ROLES = ("structure", "multi_resolution", "ablation", "baseline")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A learner as configs, the launcher and the benchmark see it; ``register`` it beside its class.

    ``config``: its model settings (``--config.model.*``); ``smoke``: overrides for a seconds-long run;
    ``structure``: it reads the weights' structure (graph, tokens or layers) rather than summary features;
    ``ablations``: variant name -> overrides of ``config`` (e.g. ``weightnet_flat``); ``weights_only``: False for
    a learner that runs each network (its inputs then include the zoo's ``data.Forward``); a structure learner with
    a ``stats`` setting is also offered as ``<name>_stats``, the per-layer statistics fused into its embedding.
    """
    name: str
    cls: type
    config: dict
    smoke: dict
    structure: bool = False
    ablations: dict = dataclasses.field(default_factory=dict)
    weights_only: bool = True    # False: it runs the networks (a probing learner), and reports say so

    def variants(self) -> dict[str, tuple[str, dict]]:
        """Variant name -> (role, overrides of ``config``)."""
        out = {self.name: ("structure" if self.structure else "baseline", {})}
        if self.structure and "stats" in self.config:
            out[f"{self.name}_stats"] = ("multi_resolution", {"stats": True})
        out.update({n: ("ablation", o) for n, o in self.ablations.items()})
        return out


LEARNERS: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    LEARNERS[entry.name] = entry
    return entry


def variants() -> dict[str, tuple[str, str, dict]]:
    """Every variant configs can name -> (learner, role, overrides), structure learners first, then their
    multi-resolution forms, the ablations and the baselines."""
    rows = [(v, e.name, role, o) for e in LEARNERS.values() for v, (role, o) in e.variants().items()]
    rows.sort(key=lambda r: ROLES.index(r[2]))
    return {v: (name, role, o) for v, name, role, o in rows}


class Learner:
    name = ""
    neural = True
    families = None     # the zoo families it can read (None: every one)

    def __init__(self, cfg, targets: Targets, n_devices: int = 1):
        self.cfg, self.targets, self.n_devices = cfg, targets, n_devices

    def prepare(self, params: list, families, activations, forward=None):
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

    def init_batches(self, feats, train_idx, batch_size):
        """Batches whose shapes the parameters must cover (the loop initializes on each and merges)."""
        return [next(self.batches(feats, train_idx[:1], batch_size, None))[0]]

    def _order(self, idx, rng):
        idx = np.asarray(idx)
        return rng.permutation(idx) if rng is not None else idx

    def _bucketed(self, idx, key, batch_size: int, rng) -> list[np.ndarray]:
        """Row blocks [devices, per-device] of ``idx`` in which every row has one ``key(row)`` (an architecture):
        shuffled within each bucket, padded with -1, then the blocks of all buckets shuffled (``rng`` given)."""
        per = self._check_batch(batch_size)
        by = {}
        for i in np.asarray(idx):
            by.setdefault(key(i), []).append(i)
        rows = []
        for members in by.values():
            order = self._order(members, rng)
            pad = (-len(order)) % batch_size
            rows += list(np.concatenate([order, np.full(pad, -1)]).reshape(-1, self.n_devices, per))
        if rng is not None:
            rows = [rows[k] for k in rng.permutation(len(rows))]
        return rows

    def _check_batch(self, batch_size: int) -> int:
        if batch_size % self.n_devices:
            raise LearnerError(f"batch size {batch_size} is not divisible by the {self.n_devices} data-parallel "
                               "devices")
        return batch_size // self.n_devices


class Dense(Neural):
    """Learners that read one fixed-size array per network: batches are row slices, padded with row -1."""

    def gather(self, feats, rows: np.ndarray, rng=None):
        """The batch of these rows; ``rng`` is given while training (for augmentation)."""
        raise NotImplementedError

    def batches(self, feats, idx, batch_size, rng):
        per = self._check_batch(batch_size)
        order = self._order(idx, rng)
        pad = (-len(order)) % batch_size
        rows = np.concatenate([order, np.full(pad, -1)]).reshape(-1, self.n_devices, per)
        for r in rows:
            yield self.gather(feats, r, rng), r


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


@jax.tree_util.register_pytree_node_class
class Bucket:
    """A batch of networks of one architecture: node features [.., T, ...] and per-block weights
    [.., receivers, senders, taps]; the ``Layout`` is static (jit compiles once per layout)."""

    def __init__(self, layout: graph_lib.Layout, nodes: dict, weights: tuple, stats=None):
        self.layout, self.nodes, self.weights, self.stats = layout, nodes, tuple(weights), stats

    def tree_flatten(self):
        return (self.nodes, self.weights, self.stats), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(layout, *children)


class Blocks(Neural):
    """Learners that read ``wa.weights.graph.Blocked`` networks. Batches are bucketed by layout (networks of one
    architecture): each batch holds one bucket's networks as dense tensors, so a step compiles once per layout
    and message passing is dense. Within a bucket the order is shuffled, then the batches of all buckets are.

    Input scale (``setup``): every weight block and every node group's biases are standardized per layer
    position (layout, block / group) with robust statistics of the training networks (median and 1.4826 × the
    median absolute deviation), then clipped to ±``cfg.clip``; a layer position that no training network has
    (a held-out architecture) uses the statistics pooled over the training blocks of the same edge type (biases:
    the same layer type). The raw scale survives as two node features: log(1 + RMS of the node's incoming
    weights) and asinh(bias), both as stored. ``cfg.normalize=False`` feeds the weights as stored;
    ``cfg.norm_scope="self"`` standardizes every block and bias group by its own network's statistics instead, a
    scale that exists for any architecture, seen in training or not (cross-architecture transfer)."""

    norm = stats_depth = stats_scaler = None
    _views = (None, {})      # (the network list last read, {row: its scaled view})

    @property
    def dense(self) -> bool:
        """False: the learner's packed path (the next class in its MRO: padded edge lists), kept as the
        reference the bucketed path is tested and timed against."""
        return self.cfg.get("dense", True)

    def prepare(self, params, families, activations, forward=None):
        nets = [graph_lib.to_blocks(p, f, a) for p, f, a in zip(params, families, activations, strict=True)]
        if self.cfg.get("stats"):
            # Multi-resolution: the per-layer statistics ride along with each network (depth fixed by the first
            # set prepared, as for the statistics baselines).
            x, self.stats_depth = weight_stats.matrix(params, families, self.stats_depth)
            nets = [dataclasses.replace(n, stats=v) for n, v in zip(nets, x, strict=True)]
        return nets

    def setup(self, nets, train_idx, batch_size):
        if not self.dense:
            return super().setup(nets, train_idx, batch_size)
        self._check_batch(batch_size)
        self._views = (None, {})
        scope = self.cfg.get("norm_scope", "position")
        if scope not in NORM_SCOPES:
            raise LearnerError(f"--config.model.norm_scope={scope!r}: expected one of {NORM_SCOPES}")
        self.norm = Normalizer.fit([nets[i] for i in train_idx], self.cfg.clip, scope) \
            if self.cfg.normalize else None
        if self.cfg.get("stats"):
            self.stats_scaler = RobustClip(self.cfg.clip).fit(np.stack([nets[i].stats for i in train_idx]))

    def init_batches(self, nets, train_idx, batch_size):
        """One batch per architecture of every prepared network (a learner may hold per-architecture
        parameters, and prediction may meet an architecture that training did not)."""
        if not self.dense:
            return super().init_batches(nets, train_idx, batch_size)
        first = {}
        for i, n in enumerate(nets):
            first.setdefault(n.layout, i)
        return [next(self.batches(nets, [i], batch_size, None))[0] for i in first.values()]

    def batches(self, nets, idx, batch_size, rng):
        if not self.dense:
            yield from super().batches(nets, idx, batch_size, rng)
            return
        for r in self._bucketed(idx, lambda i: nets[i].layout, batch_size, rng):
            yield self.gather(nets, r, rng), r

    def gather(self, nets, rows, rng=None):
        if not self.dense:
            return super().gather(nets, rows)
        first = int(rows[rows >= 0][0])
        views = [self.viewed(nets, int(i) if i >= 0 else first) for i in rows.reshape(-1)]
        if rng is not None and self.cfg.get("permute_augment"):
            views = [permuted(v, rng) for v in views]
        nodes = {k: np.stack([v.nodes[k] for v in views]).reshape(*rows.shape, *views[0].nodes[k].shape)
                 for k in views[0].nodes}
        weights = tuple(np.stack([v.weights[b] for v in views]).reshape(*rows.shape, *w.shape)
                        for b, w in enumerate(views[0].weights))
        stats = None if views[0].stats is None else np.stack([v.stats for v in views]).reshape(*rows.shape, -1)
        return Bucket(views[0].layout, nodes, weights, stats)

    def viewed(self, nets, i: int):
        """``view(nets[i])``, computed once per network of the list it was last asked about (every epoch reads
        the same training networks)."""
        if self._views[0] is not nets:
            self._views = (nets, {})
        cache = self._views[1]
        if i not in cache:
            cache[i] = self.view(nets[i])
        return cache[i]

    def view(self, net):
        out = self.norm(net) if self.norm is not None else net
        if self.stats_scaler is not None:
            out = dataclasses.replace(out, stats=self.stats_scaler.transform(net.stats[None])[0].astype(np.float32))
        return out


def drop_wide_inputs(batch: Bucket, max_input_tokens: int) -> tuple[Bucket, tuple]:
    """Leaves out input groups (no incoming weights) of more than ``max_input_tokens`` units (784 pixels of an
    MNIST MLP would be 90% of its nodes): returns the bucket without them (groups renumbered, their outgoing
    blocks removed) and, per removed block, (first node of its receiving group in the new numbering, weights
    [b, receivers, senders, taps]) for the receivers to read as features."""
    lay = batch.layout
    wide = {g for g, (_, n) in enumerate(lay.groups) if not lay.incoming(g) and n > max_input_tokens}
    if not wide:
        return batch, ()
    new, groups, keep, at = {}, [], [], 0
    for g, (s, n) in enumerate(lay.groups):
        if g not in wide:
            new[g] = len(groups)
            groups.append((at, n))
            keep.append(np.arange(s, s + n))
            at += n
    blocks, weights, rows = [], [], []
    for k, (s, r, t, d, taps) in enumerate(lay.blocks):
        if s in wide:
            rows.append((groups[new[r]][0], batch.weights[k]))
        else:
            blocks.append((new[s], new[r], t, d, taps))
            weights.append(batch.weights[k])
    keep = np.concatenate(keep)
    nodes = {k: v[..., keep] if v.ndim == batch.nodes["layer_type"].ndim else v[..., keep, :]
             for k, v in batch.nodes.items()}
    return Bucket(graph_lib.Layout(tuple(groups), tuple(blocks)), nodes, tuple(weights), batch.stats), tuple(rows)


# Node kinds whose units a hidden-neuron permutation relabels, as each zoo family declares them.
PERMUTABLE = tuple(sorted({graph_lib.LAYER_TYPES.index(t) for f in archs.FAMILIES.values() for t in f.permutable}))


def permuted(net: graph_lib.Blocked, rng: np.random.Generator) -> graph_lib.Blocked:
    """The network with the units of every hidden layer (dense / conv / transformer MLP hidden units) randomly
    relabelled, as ``wa.weights.canonical.permute`` would give it: node features move with their node, each
    node keeps its place's ``index``, the layer's incoming rows and outgoing columns move along. Augmentation for
    learners that are not permutation-invariant by construction."""
    lay = net.layout
    nodes = {k: v.copy() for k, v in net.nodes.items()}
    weights = list(net.weights)
    for g, (start, n) in enumerate(lay.groups):
        if int(net.nodes["layer_type"][start]) not in PERMUTABLE:
            continue
        p = rng.permutation(n)
        for k in nodes:
            if k not in ("index", "layer"):
                nodes[k][start:start + n] = net.nodes[k][start:start + n][p]
        for b, (s, r, _, diag, _) in enumerate(lay.blocks):
            if diag and g in (s, r):
                raise LearnerError("a diagonal block touches a permutable layer")
            if r == g:
                weights[b] = weights[b][p]
            if s == g:
                weights[b] = weights[b][:, p]
    return dataclasses.replace(net, nodes=nodes, weights=tuple(weights))


def robust(values: np.ndarray, axis=None):
    """Median and 1.4826 × median absolute deviation (the standard deviation for Gaussian data, untouched by a
    few diverged networks); where the MAD is 0 (mostly constant values) the standard deviation, floored at 1e-8."""
    med = np.median(values, axis=axis)
    mad = 1.4826 * np.median(np.abs(values - (med if axis is None else np.expand_dims(med, axis))), axis=axis)
    scale = np.where(mad > 1e-8, mad, np.maximum(np.std(values, axis=axis), 1e-8))
    return (float(med), float(scale)) if axis is None else (med, scale)


class RobustClip(base_estimator.BaseEstimator, base_estimator.TransformerMixin):
    """Per feature: (x − median) / (1.4826 × MAD) of the training rows, clipped to ±clip, so that a diverged
    network (weights ~1e4 in a zoo of ~1e-1) cannot dominate a scale or a loss."""

    def __init__(self, clip: float = 8.0):
        self.clip = clip

    def fit(self, x, y=None):
        self.center_, self.scale_ = robust(np.asarray(x, np.float64), axis=0)
        return self

    def transform(self, x):
        return np.clip((np.asarray(x, np.float64) - self.center_) / self.scale_, -self.clip, self.clip)


NORM_SCOPES = ("position", "self")


class Normalizer:
    """Per layer position statistics of the training networks, or (``scope="self"``) each network's own per
    block / group (see ``Blocks``)."""

    def __init__(self, blocks: dict, groups: dict, by_type: dict, clip: float, scope: str = "position"):
        self.blocks, self.groups, self.by_type, self.clip, self.scope = blocks, groups, by_type, clip, scope

    @classmethod
    def fit(cls, nets: list, clip: float, scope: str = "position") -> Normalizer:
        if clip <= 0:
            raise LearnerError(f"--config.model.clip={clip}: expected > 0 (standardized weights are clipped to ±clip)")
        if scope == "self":
            return cls({}, {}, {}, clip, scope)
        w, b, wt, bt = {}, {}, {}, {}
        for n in nets:
            lay = n.layout
            for k, (_, _, etype, _, _) in enumerate(lay.blocks):
                w.setdefault((lay, k), []).append(n.weights[k].ravel())
                wt.setdefault(("edge", etype), []).append(n.weights[k].ravel())
            for g, (start, size) in enumerate(lay.groups):
                bias = n.nodes["x"][start:start + size, 0]
                b.setdefault((lay, g), []).append(bias)
                bt.setdefault(("node", int(n.nodes["layer_type"][start])), []).append(bias)
        stat = lambda d: {k: robust(np.concatenate(v)) for k, v in d.items()}  # noqa: E731
        return cls(stat(w), stat(b), {**stat(wt), **stat(bt)}, clip)

    def _stat(self, table, key, fallback, values):
        if self.scope == "self":
            return robust(np.asarray(values, np.float64))
        return table.get(key) or self.by_type.get(fallback) or (0.0, 1.0)

    def __call__(self, net) -> graph_lib.Blocked:
        lay, c = net.layout, self.clip
        weights = []
        rms_sum = np.zeros(lay.n_nodes)
        count = np.zeros(lay.n_nodes)
        for k, (_, r, etype, _, _) in enumerate(lay.blocks):
            w = net.weights[k]
            m, s = self._stat(self.blocks, (lay, k), ("edge", etype), w)
            weights.append(np.clip((w - m) / s, -c, c).astype(np.float32))
            start, size = lay.groups[r]
            rms_sum[start:start + size] += (w.astype(np.float64) ** 2).reshape(size, -1).sum(1)
            count[start:start + size] += w[0].size
        x = net.nodes["x"].astype(np.float64)
        bias = x[:, 0].copy()
        for g, (start, size) in enumerate(lay.groups):
            m, s = self._stat(self.groups, (lay, g), ("node", int(net.nodes["layer_type"][start])),
                              bias[start:start + size])
            x[start:start + size, 0] = np.clip((bias[start:start + size] - m) / s, -c, c)
        raw = np.stack([np.log1p(np.sqrt(rms_sum / np.maximum(count, 1))), np.arcsinh(bias)], 1)
        nodes = dict(net.nodes, x=np.concatenate([x, raw], 1).astype(np.float32))
        return graph_lib.Blocked(lay, nodes, tuple(weights), net.stats)


def stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)
