r"""Where lineage recovery loses its edges: the distance's own ceiling, and which wrong links it makes.

  python experiments/lineage_diagnosis.py --zoo runs/zoo_digits/zoo

For every family tree of the zoo (final checkpoints; trees given), the undirected minimum spanning tree of the
Euclidean distances between the tree's models: the share of true edges it holds, the share of directed edges
recovered when it is rooted at the true root (the ceiling of any direction cue on that distance), at the model of
least summed kurtosis, and at the spanning tree's centre; and the kinds of false links it makes (siblings, a
grandparent, others). Trees are split by root as ``launch.lineage`` splits them (seed 0, half for training), so
the test half is the one its table scores. Prints one JSON line.
"""

import collections
import json
import os
import sys

import networkx as nx
import numpy as np
from absl import app, flags
from scipy.spatial.distance import cdist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wa import lineage  # noqa: E402
from wa.eval import splits  # noqa: E402
from wa.learners import data as data_lib  # noqa: E402

flags.DEFINE_string("zoo", "runs/zoo_digits/zoo", "Zoo store with family trees.")
flags.DEFINE_float("train_fraction", 0.5, "Share of trees on the training side (as launch.lineage).")
flags.DEFINE_integer("split_seed", 0, "Tree split seed (as launch.lineage).")
FLAGS = flags.FLAGS


def _depths(parent: list[int]) -> list[int]:
    out = []
    for j in range(len(parent)):
        k, x = 0, j
        while parent[x] >= 0:
            x, k = parent[x], k + 1
        out.append(k)
    return out


def main(argv):
    del argv
    ws = data_lib.load(FLAGS.zoo, final_only=True)
    rows = ws.rows.reset_index(drop=True)
    f = FLAGS.train_fraction
    parts = splits.by_group(rows, (f, 0.0, 1.0 - f), FLAGS.split_seed, "root_id")
    train_roots = {int(r) for r in set(rows["root_id"].iloc[parts["train"]])}
    hits = collections.defaultdict(lambda: [0, 0])
    links = {"train": collections.Counter(), "test": collections.Counter()}
    for _, sub in rows.groupby("arch_id"):
        ids = sub["model_id"].to_numpy()
        pos = {int(x): i for i, x in enumerate(ids)}
        true = np.array([pos.get(int(p), -1) for p in sub["parent_id"].fillna(-1)])
        models = lineage._Models.of([ws.params[i] for i in sub.index])
        roots = sub["root_id"].to_numpy()
        for r in np.unique(roots):
            g = np.flatnonzero(roots == r)
            if len(g) < 2:
                continue
            side = "train" if int(r) in train_roots else "test"
            d = cdist(models.flat[g], models.flat[g])
            tp = [int(np.flatnonzero(g == true[x])[0]) if true[x] >= 0 else -1 for x in g]
            depth = _depths(tp)
            edges = sum(p >= 0 for p in tp)
            tree = nx.minimum_spanning_tree(nx.from_numpy_array(d))
            und = sum(1 for j, p in enumerate(tp) if p >= 0 and tree.has_edge(j, p))
            hits[f"{side}/undirected"][0] += und
            hits[f"{side}/undirected"][1] += edges
            centre = min(tree.nodes, key=lambda u: (max(nx.single_source_shortest_path_length(tree, u).values()),
                                                    d[u].sum()))
            for how, root in (("true_root", tp.index(-1)), ("least_kurtosis", int(np.argmin(models.kurt["layers"][g]))),
                              ("tree_centre", centre)):
                par = {root: -1}
                for a, b in nx.bfs_edges(tree, root):
                    par[b] = a
                hits[f"{side}/{how}"][0] += sum(1 for j, p in enumerate(tp) if p >= 0 and par[j] == p)
                hits[f"{side}/{how}"][1] += edges
            for a, b in tree.edges:
                if tp[a] == b or tp[b] == a:
                    continue
                if tp[a] == tp[b]:
                    kind = f"siblings at depth {depth[a]}"
                elif (tp[a] >= 0 and tp[tp[a]] == b) or (tp[b] >= 0 and tp[tp[b]] == a):
                    kind = "grandparent"
                else:
                    kind = "other"
                links[side][kind] += 1
    out = {"zoo": FLAGS.zoo, "share_of_true_edges": {k: round(h / t, 4) for k, (h, t) in sorted(hits.items())},
           "edges": {k: t for k, (_, t) in sorted(hits.items()) if k.endswith("undirected")},
           "false_links": {s: dict(c.most_common()) for s, c in links.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
