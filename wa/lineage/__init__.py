"""Rebuild a family tree of models from their weights alone (after MoTHer, Horwitz et al. 2024, "On the Origin of
Llamas: Model Tree Heritage Recovery"; reference code eliahuhorwitz/MoTHer).

Every method is a distance between models, a direction cue and a minimum spanning arborescence (Edmonds):
1. Distance: Euclidean between flattened weights (``l2``), or MoTHer's: per weight matrix the largest entry of the
   signed difference W_i − W_j, min-max scaled over the pairs of the group, the largest over matrices (``linf``;
   not symmetric); or Euclidean between learned embeddings (``features``).
2. Direction: an edge i → j (i parent of j) whose kurtosis moves against the expected direction is charged
   ``penalty`` × a scale extra (MoTHer: 0.3 × the mean distance). Kurtosis of the whole weight vector (``whole``),
   or MoTHer's statistic: excess kurtosis of every weight matrix (kernels), summed (``layers``). MoTHer expects it
   to *fall* from a pretrained parent to a fine-tuned child (its ViT and Llama trees); training from an early
   parent can raise it, so the sign is a setting, or fitted on training trees.
3. Groups: with known trees (``clusters="known"``, MoTHer's reported setting) one arborescence per tree, no
   virtual root; otherwise (``"found"``) one over all models of an architecture with a virtual root joined to
   every model at ``root_cost`` (default: Otsu's threshold on the log pairwise distances, between relatives'
   short distances and strangers' long ones): a model whose parent is the virtual root is a root.

A method is one ``register(Method(...))`` below. ``score``: the share of true directed (parent → child) edges
recovered, undirected edges, root precision and recall.
"""

from __future__ import annotations

import dataclasses

import jax
import networkx as nx
import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial.distance import cdist

from wa import errors


def otsu_threshold(values: np.ndarray) -> float:
    """The split of ``values`` maximising between-class variance (two non-empty classes)."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    k = np.arange(1, len(v))
    c = np.cumsum(v)
    mean_a = c[:-1] / k
    mean_b = (c[-1] - c[:-1]) / (len(v) - k)
    i = int(np.argmax(k * (len(v) - k) * (mean_a - mean_b) ** 2))
    return float((v[i] + v[i + 1]) / 2)


def kernels(params) -> list[np.ndarray]:
    """The model's weight matrices (every ``kernel`` of two or more axes), flattened, in parameter order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [np.ravel(np.asarray(x, np.float64)) for path, x in leaves
            if np.ndim(x) >= 2 and getattr(path[-1], "key", None) == "kernel"]


def layer_kurtosis(params) -> float:
    """MoTHer's direction statistic: the excess kurtosis of every weight matrix, summed."""
    return float(sum(stats.kurtosis(k) for k in kernels(params)))


def linf_distance(mats: list[np.ndarray]) -> np.ndarray:
    """MoTHer's distance. ``mats``: per weight matrix [n, entries]. Per matrix, S_ij = max(W_i − W_j), min-max
    scaled over the off-diagonal pairs; D_ij = the largest over matrices (D_ii = 0; not symmetric)."""
    n = len(mats[0])
    off = ~np.eye(n, dtype=bool)
    d = np.zeros((n, n))
    for w in mats:
        s = np.stack([(w[i][None] - w).max(axis=1) for i in range(n)])
        if n > 1:
            lo, hi = s[off].min(), s[off].max()
            s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
        d = np.maximum(d, s)
    d[~off] = 0.0
    return d


def costs(d: np.ndarray, kurt: np.ndarray, penalty: float, sign: str = "rise", scale: str = "nn_median"
          ) -> np.ndarray:
    """Edge costs C[i, j] of i → j: the distance, plus ``penalty`` × scale where the kurtosis moves against
    ``sign`` ("rise": it should rise from parent to child; "fall": fall). Scale "nn_median": the median
    nearest-neighbour distance (the typical gap between relatives); "mean": the mean of D, diagonal included
    (MoTHer's)."""
    n = len(d)
    eye = np.eye(n, dtype=bool)
    if scale == "mean":
        unit = float(d.mean())
    else:
        unit = float(np.median(np.where(eye, np.inf, d).min(axis=1))) if n > 1 else 0.0
    against = kurt[None, :] < kurt[:, None] if sign == "rise" else kurt[None, :] > kurt[:, None]
    return np.where(eye, np.inf, d + penalty * unit * against)


def otsu_root_cost(d: np.ndarray) -> float:
    """Between relatives' short and strangers' long distances: Otsu's split of all log pairwise distances."""
    n = len(d)
    off = d[~np.eye(n, dtype=bool)]
    if n <= 2:
        return float(np.median(off)) if off.size else float("nan")
    # Identical models (distance 0) would give log 0; the smallest positive distance stands in.
    pos = off[off > 0]
    return float(np.exp(otsu_threshold(np.log(np.maximum(off, pos.min() if pos.size else 1.0)))))


def arborescence(c: np.ndarray, root_cost: float | None = None) -> np.ndarray:
    """Parents [n] (-1: a root) of the minimum spanning arborescence of costs ``c``; with ``root_cost`` a virtual
    root joined to every model at that cost (a forest), without it one tree."""
    n = len(c)
    if n < 2:
        return np.full(n, -1)
    g = nx.DiGraph()
    root = n
    if root_cost is not None:
        for j in range(n):
            g.add_edge(root, j, weight=root_cost)
    for i in range(n):
        for j in range(n):
            if i != j:
                g.add_edge(i, j, weight=float(c[i, j]))
    tree = nx.minimum_spanning_arborescence(g, attr="weight")
    parent = np.full(n, -1)
    for u, v in tree.edges():
        if u != root:
            parent[v] = u
    return parent


def recover(weights: np.ndarray, direction_penalty: float = 0.5, root_cost: float | None = None,
            features: np.ndarray | None = None) -> dict:
    """``weights`` [n, P] -> {'parent': [n] (index or -1), 'distance', 'kurtosis', 'root_cost'}: Euclidean
    distance, whole-vector kurtosis expected to rise, a virtual root at ``root_cost`` (default Otsu's). With
    ``features`` [n, F] (e.g. a learner's embeddings) distances are measured there; the kurtosis direction cue
    still comes from the weights."""
    w = np.asarray(weights, np.float64)
    f = w if features is None else np.asarray(features, np.float64)
    d = cdist(f, f)
    kurt = stats.kurtosis(w, axis=1)
    if len(w) < 2:
        return {"parent": np.full(len(w), -1), "distance": d, "kurtosis": kurt, "root_cost": float("nan")}
    root_cost = otsu_root_cost(d) if root_cost is None else root_cost
    parent = arborescence(costs(d, kurt, direction_penalty, "rise", "nn_median"), root_cost)
    return {"parent": parent, "distance": d, "kurtosis": kurt, "root_cost": root_cost}


def score(true_parent: np.ndarray, parent: np.ndarray) -> dict:
    """Directed and undirected edge recovery over models that have a parent, and root precision/recall."""
    true_parent, parent = np.asarray(true_parent), np.asarray(parent)
    has = true_parent >= 0
    directed = float((parent[has] == true_parent[has]).mean()) if has.any() else float("nan")
    true_edges = {frozenset((int(p), i)) for i, p in enumerate(true_parent) if p >= 0}
    found = {frozenset((int(p), i)) for i, p in enumerate(parent) if p >= 0}
    undirected = len(true_edges & found) / len(true_edges) if true_edges else float("nan")
    roots_true, roots = set(np.flatnonzero(~has)), set(np.flatnonzero(parent < 0))
    return {"directed_edges": directed, "undirected_edges": undirected, "edges": int(has.sum()),
            "root_precision": len(roots & roots_true) / max(len(roots), 1),
            "root_recall": len(roots & roots_true) / max(len(roots_true), 1)}


class LineageError(errors.ConfigError):
    pass


SIGNS = ("rise", "fall")
PENALTIES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)   # the grid a fitted method chooses from


@dataclasses.dataclass(frozen=True)
class Method:
    """``distance``: "l2" | "linf"; ``kurtosis``: "whole" | "layers"; ``sign``: "rise" | "fall" | "fit";
    ``penalty``: the direction charge, or None to choose it (with the sign) on the training trees; ``scale``:
    "nn_median" | "mean" (see ``costs``)."""
    name: str
    about: str
    distance: str = "l2"
    kurtosis: str = "layers"
    sign: str = "rise"
    penalty: float | None = 0.3
    scale: str = "mean"
    pairwise: bool = False   # True: edge costs −log P(i is j's parent) from a classifier fitted on training trees

    @property
    def fitted(self) -> bool:
        return self.sign == "fit" or self.penalty is None or self.pairwise


METHODS: dict[str, Method] = {}


def register(m: Method) -> Method:
    METHODS[m.name] = m
    return m


register(Method("mother", "MoTHer as released: L∞ distance, per-matrix kurtosis summed, expected to fall (its "
                "fine-tuning setting), 0.3 × mean distance", distance="linf", sign="fall"))
register(Method("mother_rise", "MoTHer with the kurtosis expected to rise (its setting for continued "
                "pre-training)", distance="linf", sign="rise"))
register(Method("wa_v1", "wa's first method: Euclidean distance, whole-vector kurtosis expected to rise, 0.5 × "
                "the median nearest-neighbour distance", kurtosis="whole", penalty=0.5, scale="nn_median"))
register(Method("fitted", "Euclidean distance, per-matrix kurtosis; sign and charge chosen on the training trees",
                sign="fit", penalty=None))
register(Method("pairwise", "a classifier of ordered pairs (is i the parent of j?) on scale-free distance and "
                "per-layer kurtosis, norm and spread changes, fitted on the training trees; costs −log P",
                pairwise=True))


@dataclasses.dataclass
class _Models:
    """One architecture's models: flat weights, weight matrices, both kurtosis statistics, optional features."""
    flat: np.ndarray
    mats: list
    kurt: dict
    features: np.ndarray | None = None

    @classmethod
    def of(cls, params: list, features=None) -> _Models:
        ks = [kernels(p) for p in params]
        flat = np.stack([np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(p)])
                         for p in params])
        mats = [np.stack([k[m] for k in ks]) for m in range(len(ks[0]))]
        per_layer = np.array([[stats.kurtosis(k) for k in km] for km in ks])
        kurt = {"whole": stats.kurtosis(flat, axis=1), "layers": per_layer.sum(1), "per_layer": per_layer}
        return cls(flat, mats, kurt, None if features is None else np.asarray(features, np.float64))

    def pair_features(self, idx) -> np.ndarray:
        """[n, n, F] features of the ordered pairs (i, j) among ``idx`` for "is i the parent of j": log distance
        over j's nearest-neighbour distance among ``idx`` and over the median one; per-layer changes i → j of
        kurtosis, log norm and log spread (mean over layers and share of layers that rise), whole-vector ones."""
        idx = np.asarray(idx)
        d = self.distance(idx, "l2")
        n = len(idx)
        eye = np.eye(n, dtype=bool)
        nn = np.maximum(np.where(eye, np.inf, d).min(axis=1), 1e-12) if n > 1 else np.ones(n)
        logd = np.log(np.maximum(d, 1e-12))
        # Rank of i among j's neighbours (0: the nearest), of j among i's.
        order = np.where(eye, np.inf, d)
        rank_in_j = np.argsort(np.argsort(order, axis=0), axis=0).astype(np.float64)
        feats = [logd - np.log(nn)[None, :], logd - np.log(np.median(nn)), np.log1p(rank_in_j),
                 np.log1p(rank_in_j.T)]
        norms = np.stack([np.log(np.linalg.norm(m[idx], axis=1) + 1e-12) for m in self.mats], 1)
        spread = np.stack([np.log(np.std(m[idx], axis=1) + 1e-12) for m in self.mats], 1)
        for per in (self.kurt["per_layer"][idx], norms, spread):
            delta = per[None, :, :] - per[:, None, :]          # [i, j, layers]: child j minus parent i
            feats += [delta.mean(-1), (delta > 0).mean(-1)]
        whole = self.kurt["whole"][idx]
        feats.append(whole[None, :] - whole[:, None])
        return np.stack(feats, -1)

    def distance(self, idx, kind: str) -> np.ndarray:
        if self.features is not None:
            f = self.features[idx]
            return cdist(f, f)
        if kind == "linf":
            return linf_distance([m[idx] for m in self.mats])
        return cdist(self.flat[idx], self.flat[idx])


def _pair_costs(x_pool: np.ndarray, pool: np.ndarray, idx, clf) -> np.ndarray:
    """−log P(i is j's parent) among ``idx``, from the pair features ``x_pool`` of every model the method sees
    (``pool``, sorted)."""
    pos = np.searchsorted(pool, idx)
    x = x_pool[np.ix_(pos, pos)]
    p = clf.predict_proba(x.reshape(-1, x.shape[-1]))[:, 1].reshape(len(idx), len(idx))
    return np.where(np.eye(len(idx), dtype=bool), np.inf, -np.log(np.clip(p, 1e-9, 1.0)))


def _solve(models: _Models, groups: list[np.ndarray], m: Method, sign: str, penalty: float, clusters: str,
           clf=None) -> dict:
    """Parents (indices into the architecture's models, -1 for roots) for every model of ``groups``."""
    pool = np.sort(np.concatenate(groups))
    # The pair features are measured against the whole pool once; each group reads its block.
    x_pool = models.pair_features(pool) if clf is not None else None

    def edge_costs(g, d=None):
        if clf is not None:
            return _pair_costs(x_pool, pool, g, clf)
        d = models.distance(g, m.distance) if d is None else d
        return costs(d, models.kurt[m.kurtosis][g], penalty, sign, m.scale)

    parent = {}
    if clusters == "known":
        for g in groups:
            found = arborescence(edge_costs(g))
            parent.update({int(g[j]): (int(g[p]) if p >= 0 else -1) for j, p in enumerate(found)})
        return parent
    # A model is a root where no parent is likelier than not (pairwise), or past Otsu's distance threshold.
    if clf is not None:
        found = arborescence(edge_costs(pool), -np.log(0.5))
    else:
        d = models.distance(pool, m.distance)
        found = arborescence(edge_costs(pool, d), otsu_root_cost(d))
    return {int(pool[j]): (int(pool[p]) if p >= 0 else -1) for j, p in enumerate(found)}


def _fit_pairs(per: list):
    """The pair classifier, on every ordered pair of models of each architecture's training trees (a true edge
    or not), with features measured against the architecture's training pool."""
    from sklearn import ensemble
    xs, ys = [], []
    for _, _, true, models, train, _ in per:
        if not train:
            continue
        pool = np.sort(np.concatenate(train))
        x = models.pair_features(pool)
        y = (true[pool][None, :] == pool[:, None])          # [i, j]: i is j's parent
        off = ~np.eye(len(pool), dtype=bool)
        xs.append(x[off])
        ys.append(y[off])
    x, y = np.concatenate(xs), np.concatenate(ys)
    # Most ordered pairs are not edges; balanced weights keep P(edge) from collapsing towards 0.
    return ensemble.HistGradientBoostingClassifier(max_iter=100, learning_rate=0.05, max_depth=3,
                                                   min_samples_leaf=50, class_weight="balanced",
                                                   random_state=0).fit(x, y)


def _directed(parent: dict, true: np.ndarray) -> tuple[int, int]:
    hits = sum(int(true[j] >= 0 and parent[j] == true[j]) for j in parent)
    return hits, sum(int(true[j] >= 0) for j in parent)


def rebuild(rows, params: list, method: str = "fitted", clusters: str = "known", train_roots=(),
            features=None) -> dict:
    """Trees among ``rows`` (one per model: ``model_id``, ``parent_id``, ``root_id``, ``arch_id``; ``params[i]`` the
    parameters of row i) by ``method``, per architecture, on the trees whose root is not in ``train_roots``; a
    fitted method chooses its sign and charge on the trees whose root is (pooled over architectures, so an
    architecture without training trees is still served). Returns {"fit": {...}, "archs": arch → score}."""
    if method not in METHODS:
        raise LineageError(f"unknown lineage method {method!r}; known: {sorted(METHODS)}")
    if clusters not in ("known", "found"):
        raise LineageError(f"clusters={clusters!r}: expected 'known' (one tree per true family) or 'found'")
    m = METHODS[method]
    rows = pd.DataFrame(rows).reset_index(drop=True)
    train_roots = set(int(r) for r in train_roots)
    per = []
    for arch, sub in rows.groupby("arch_id"):
        ids = sub["model_id"].to_numpy()
        pos = {int(x): i for i, x in enumerate(ids)}
        true = np.array([pos.get(int(p), -1) for p in sub["parent_id"].fillna(-1)])
        models = _Models.of([params[i] for i in sub.index],
                            None if features is None else [features[i] for i in sub.index])
        roots = sub["root_id"].to_numpy()
        groups = {r: np.flatnonzero(roots == r) for r in np.unique(roots)}
        per.append((arch, ids, true, models, [g for r, g in groups.items() if r in train_roots],
                    [g for r, g in groups.items() if r not in train_roots]))
    sign, penalty, fit, clf = m.sign, m.penalty, {}, None
    if m.fitted and not any(len(tr) for *_, tr, _ in per):
        raise LineageError(f"method {method!r} is fitted on training trees; none were given")
    if m.pairwise:
        clf = _fit_pairs(per)
        hit = tot = 0
        for _, _, true, models, train, _ in per:
            if train:
                h, t = _directed(_solve(models, train, m, sign, 0.0, "known", clf), true)
                hit, tot = hit + h, tot + t
        fit = {"train_directed_edges": hit / max(tot, 1)}
    elif m.fitted:
        grid = [(s, p) for s in (SIGNS if m.sign == "fit" else (m.sign,))
                for p in (PENALTIES if m.penalty is None else (m.penalty,))]
        found = {}
        for s, p in grid:
            hit = tot = 0
            for _, _, true, models, train, _ in per:
                if train:
                    h, t = _directed(_solve(models, train, m, s, p, "known"), true)
                    hit, tot = hit + h, tot + t
            found[(s, p)] = hit / max(tot, 1)
        # Ties go to the smaller charge (the grid is in increasing order) and to "rise" (listed first).
        sign, penalty = max(grid, key=lambda sp: (found[sp], -grid.index(sp)))
        fit = {"sign": sign, "penalty": penalty, "train_directed_edges": found[(sign, penalty)],
               "grid": {f"{s}:{p}": round(v, 4) for (s, p), v in found.items()}}
    out = {}
    for arch, ids, true, models, _, test in per:
        if not test:
            continue
        parent = _solve(models, test, m, sign, penalty, clusters, clf)
        idx = np.array(sorted(parent))
        # Scored on the test models only: whole trees are on one side, so a true parent is among them.
        at = {int(i): n for n, i in enumerate(idx)}
        t = np.array([at[int(true[i])] if true[i] >= 0 else -1 for i in idx])
        f = np.array([at[parent[int(i)]] if parent[int(i)] >= 0 else -1 for i in idx])
        # Kurtosis moves the chosen way along how many of the true edges.
        k = models.kurt[m.kurtosis]
        agree = [(k[j] > k[true[j]]) == (sign == "rise") for j in idx if true[j] >= 0]
        out[arch] = {**score(t, f), "model_id": ids[idx].tolist(),
                     "parent": [int(ids[parent[i]]) if parent[i] >= 0 else -1 for i in idx],
                     "kurtosis_agrees": float(np.mean(agree)) if agree else float("nan")}
    cue = {} if m.pairwise else {"sign": sign, "penalty": penalty}
    return {"method": method, "clusters": clusters, **cue, "fit": fit, "archs": out}


def pooled(archs: dict) -> float:
    """Share of all true edges recovered, over architectures (an architecture without edges adds nothing)."""
    n = sum(s["edges"] for s in archs.values())
    return sum(s["directed_edges"] * s["edges"] for s in archs.values() if s["edges"]) / n if n else float("nan")
