"""Rebuild a family tree of models from their weights alone (after MoTHer, Horwitz et al. 2024).

1. Distance: Euclidean distance between flattened weights (models of one architecture), or between learned
   embeddings of the models (``features``).
2. Direction: fine-tuning raises the kurtosis of a model's weights (MoTHer's observation), so an edge
   i → j (i parent of j) whose kurtosis falls is charged ``direction_penalty`` × the median nearest-neighbour
   distance extra.
3. Roots: a virtual root connects to every model at cost ``root_cost`` (default: the threshold between the
   short distances of relatives and the long ones of unrelated models, found by maximising the
   between-class variance of all log pairwise distances, as Otsu's method does for grey levels).
4. Tree: ``networkx.minimum_spanning_arborescence`` of that directed graph; a model whose parent is the
   virtual root is a root.

``score`` is the share of true directed (parent → child) edges recovered.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
from scipy import stats
from scipy.spatial.distance import cdist


def otsu_threshold(values: np.ndarray) -> float:
    """The split of ``values`` maximising between-class variance (two non-empty classes)."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    k = np.arange(1, len(v))
    c = np.cumsum(v)
    mean_a = c[:-1] / k
    mean_b = (c[-1] - c[:-1]) / (len(v) - k)
    i = int(np.argmax(k * (len(v) - k) * (mean_a - mean_b) ** 2))
    return float((v[i] + v[i + 1]) / 2)


def recover(weights: np.ndarray, direction_penalty: float = 0.5, root_cost: float | None = None,
            features: np.ndarray | None = None) -> dict:
    """``weights`` [n, P] -> {'parent': [n] (index or -1), 'distance', 'kurtosis', 'root_cost'}. With
    ``features`` [n, F] (e.g. a learner's embeddings) distances are measured there; the kurtosis direction cue
    still comes from the weights."""
    w = np.asarray(weights, np.float64)
    n = len(w)
    f = w if features is None else np.asarray(features, np.float64)
    d = cdist(f, f)
    kurt = stats.kurtosis(w, axis=1)
    if n < 2:
        return {"parent": np.full(n, -1), "distance": d, "kurtosis": kurt, "root_cost": float("nan")}
    off = d[~np.eye(n, dtype=bool)]
    nn = np.where(np.eye(n, dtype=bool), np.inf, d).min(axis=1)
    if root_cost is None:
        # Relatives are much closer than strangers: split all pairwise distances (log scale) into two classes.
        # Identical models (distance 0) would give log 0; the smallest positive distance stands in.
        pos = off[off > 0]
        logs = np.log(np.maximum(off, pos.min() if pos.size else 1.0))
        root_cost = float(np.exp(otsu_threshold(logs))) if n > 2 else float(np.median(off))
    g = nx.DiGraph()
    root = n
    for j in range(n):
        g.add_edge(root, j, weight=root_cost)
    # Scaled by the typical distance between relatives, not between strangers, which is far larger.
    penalty = direction_penalty * float(np.median(nn)) if n > 1 else 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                g.add_edge(i, j, weight=d[i, j] + (penalty if kurt[i] > kurt[j] else 0.0))
    tree = nx.minimum_spanning_arborescence(g, attr="weight")
    parent = np.full(n, -1)
    for u, v in tree.edges():
        if u != root:
            parent[v] = u
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


def per_architecture(rows, weights: list, features=None, direction_penalty: float = 0.5) -> dict:
    """Rebuild trees among ``rows`` (one per model: ``model_id``, ``parent_id``, ``arch_id``) separately for each
    architecture; ``weights[i]`` is row i's flat weight vector, ``features[i]`` an optional embedding to measure
    distances in. A parent outside ``rows`` counts as no parent. Returns arch → score (plus ``parent``, model ids)."""
    import pandas as pd
    rows = pd.DataFrame(rows).reset_index(drop=True)
    out = {}
    for arch, sub in rows.groupby("arch_id"):
        ids = sub["model_id"].to_numpy()
        pos = {int(m): i for i, m in enumerate(ids)}
        true = np.array([pos.get(int(p), -1) for p in sub["parent_id"].fillna(-1)])
        w = np.stack([weights[i] for i in sub.index])
        f = None if features is None else np.stack([features[i] for i in sub.index])
        found = recover(w, direction_penalty, features=f)["parent"]
        out[arch] = {**score(true, found), "model_id": ids.tolist(),
                     "parent": [int(ids[p]) if p >= 0 else -1 for p in found]}
    return out
