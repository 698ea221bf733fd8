r"""Rebuild the family trees of a zoo from weights alone and score them against the true trees.

  python -m launch.lineage --zoo runs/zoo_digits/zoo --workdir runs/lineage_digits

Every model's last checkpoint, per architecture. The trees are split by root (``--train_fraction`` of them for the
methods that fit something, every method scored on the rest); each method (``wa.lineage.METHODS``: MoTHer as
released and with the opposite kurtosis sign, wa's first method, a fitted sign and charge, a pair classifier) runs
with the true trees given (``known``: one arborescence per tree, MoTHer's reported setting) and found
(``found``: one forest per architecture, roots decided by the method). Writes lineage.json (per method and
setting: the fitted settings and, per architecture, directed / undirected edge recovery, root precision / recall,
the share of true edges whose kurtosis moves the expected way, the recovered parent of every model) and
lineage.md (the table).
"""

import os

import numpy as np
from absl import flags

from launch import common
from wa import errors, lineage, report, runs
from wa.eval import splits
from wa.learners import data as data_lib

flags.DEFINE_string("zoo", "runs/zoo_digits/zoo", "Zoo store.")
flags.DEFINE_string("workdir", None, "Run folder; default runs/lineage-<time>.")
flags.DEFINE_list("methods", list(lineage.METHODS), "Lineage methods (wa.lineage.METHODS).")
flags.DEFINE_list("clusters", ["known", "found"], "known: the true trees given; found: forests per architecture.")
flags.DEFINE_float("train_fraction", 0.5, "Share of the trees (by root) the fitted methods learn from; 0: none "
                   "(fitted methods are then left out), every method is scored on the other trees.")
flags.DEFINE_integer("split_seed", 0, "Seed of the tree split.")
flags.DEFINE_list("families", [], "Only these families.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.methods) - set(lineage.METHODS))
    if unknown:
        raise errors.ConfigError(f"--methods: unknown {unknown}; known: {sorted(lineage.METHODS)}")
    bad = sorted(set(FLAGS.clusters) - {"known", "found"})
    if bad or not FLAGS.clusters:
        raise errors.ConfigError(f"--clusters={','.join(FLAGS.clusters)}: expected known and/or found")
    if not 0 <= FLAGS.train_fraction < 1:
        raise errors.ConfigError(f"--train_fraction={FLAGS.train_fraction}: expected a fraction in [0, 1)")
    if not os.path.exists(os.path.join(FLAGS.zoo, "zoo.json")):
        raise errors.DataError(f"--zoo={FLAGS.zoo!r} is not a zoo (no zoo.json); build one with launch.make_zoo")
    wd = runs.writable(FLAGS.workdir, "lineage")
    common.start()
    ws = data_lib.load(FLAGS.zoo, final_only=True, families=tuple(FLAGS.families))
    if (ws.rows["parent_id"].fillna(-1) < 0).all():
        raise errors.DataError(f"--zoo={FLAGS.zoo!r}: every model is a root; there are no family trees to rebuild")
    f = FLAGS.train_fraction
    parts = splits.by_group(ws.rows, (f, 0.0, 1.0 - f), FLAGS.split_seed, "root_id")
    train_roots = sorted(int(r) for r in set(ws.rows["root_id"].iloc[parts["train"]]))
    out = {"zoo": FLAGS.zoo, "train_fraction": f, "split_seed": FLAGS.split_seed, "train_roots": train_roots,
           "train_trees": len(train_roots),
           "test_trees": int(ws.rows["root_id"].iloc[parts["test"]].nunique()), "methods": {}, "skipped": {}}
    lines = ["# Lineage recovery", "", f"Zoo `{FLAGS.zoo}`: {len(ws)} models (last checkpoints); trees split by root "
             f"(seed {FLAGS.split_seed}): {out['train_trees']} for the fitted methods, {out['test_trees']} scored. "
             "Directed edges: the share of true parent → child edges recovered, all architectures pooled.", "",
             "| method | trees | directed edges | undirected edges | root precision | root recall | kurtosis agrees | "
             "settings |", "|---|---|---|---|---|---|---|---|"]
    for name in FLAGS.methods:
        m = lineage.METHODS[name]
        if m.fitted and not train_roots:
            out["skipped"][name] = "it is fitted on training trees and --train_fraction is 0"
            continue
        out["methods"][name] = {}
        for cl in FLAGS.clusters:
            r = lineage.rebuild(ws.rows, ws.params, name, cl, train_roots)
            out["methods"][name][cl] = r
            a = r["archs"]
            mean = lambda k: float(np.nanmean([s[k] for s in a.values()]))  # noqa: E731
            undirected = sum(s["undirected_edges"] * s["edges"] for s in a.values()) / max(
                sum(s["edges"] for s in a.values()), 1)
            settings = f"{r['sign']}, {r['penalty']}" if "sign" in r else "pair classifier"
            lines.append(f"| {name} | {cl} | {lineage.pooled(a):.3f} | {undirected:.3f} | "
                         f"{mean('root_precision'):.3f} | {mean('root_recall'):.3f} | "
                         f"{mean('kurtosis_agrees'):.3f} | {settings} |")
            print(f"{name:>12} {cl:>5}: directed {lineage.pooled(a):.3f}  undirected {undirected:.3f}  roots P/R "
                  f"{mean('root_precision'):.3f}/{mean('root_recall'):.3f}  ({sum(s['edges'] for s in a.values())} "
                  "edges)")
    lines += ["", *(f"- **{n}**: {m.about}." for n, m in lineage.METHODS.items() if n in out["methods"])]
    if out["skipped"]:
        lines += ["", "Left out: " + "; ".join(f"{n} ({why})" for n, why in out["skipped"].items()) + "."]
    report.write_json(os.path.join(wd, "lineage.json"), out)
    with report.atomic(os.path.join(wd, "lineage.md")) as tmp, open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"{wd}/lineage.json, {wd}/lineage.md")


if __name__ == "__main__":
    common.run(main)
