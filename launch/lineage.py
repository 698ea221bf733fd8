r"""Rebuild the family trees of a zoo from weights alone and score them against the true trees.

  python -m launch.lineage --zoo runs/zoo_digits/zoo --workdir runs/lineage_digits

Per architecture, every model's last checkpoint (or --epoch): Euclidean weight distance, kurtosis direction
cue, Otsu root threshold, minimum spanning arborescence (``wa.lineage``). Writes lineage.json (per architecture:
directed / undirected edge recovery, root precision / recall, the recovered parent of every model).
"""

import os

from absl import flags

from launch import common
from wa import errors, lineage, report, runs
from wa.learners import baselines
from wa.learners import data as data_lib

flags.DEFINE_string("zoo", "runs/zoo_digits/zoo", "Zoo store.")
flags.DEFINE_string("workdir", None, "Run folder; default runs/lineage-<time>.")
flags.DEFINE_float("direction_penalty", 0.5, "Extra cost (× median nearest-neighbour distance) of an edge whose "
                   "kurtosis falls from parent to child.")
flags.DEFINE_list("families", [], "Only these families.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.direction_penalty < 0:
        raise errors.ConfigError(f"--direction_penalty={FLAGS.direction_penalty}: expected >= 0")
    if not os.path.exists(os.path.join(FLAGS.zoo, "zoo.json")):
        raise errors.DataError(f"--zoo={FLAGS.zoo!r} is not a zoo (no zoo.json); build one with launch.make_zoo")
    wd = runs.writable(FLAGS.workdir, "lineage")
    common.start()
    ws = data_lib.load(FLAGS.zoo, final_only=True, families=tuple(FLAGS.families))
    res = lineage.per_architecture(ws.rows, [baselines.flat(p) for p in ws.params],
                                   direction_penalty=FLAGS.direction_penalty)
    report.write_json(os.path.join(wd, "lineage.json"), res)
    for arch, s in res.items():
        print(f"{arch:>28}: directed {s['directed_edges']:.3f}  undirected {s['undirected_edges']:.3f}  "
              f"({s['edges']} edges)")
    mean = sum(s["directed_edges"] for s in res.values()) / len(res)
    print(f"mean directed-edge recovery {mean:.3f}; {wd}/lineage.json")


if __name__ == "__main__":
    common.run(main)
