r"""Build a model zoo: vmapped population training, properties at every checkpoint, family trees, zarr store.

  python -m launch.make_zoo --config configs/zoo.py:digits --workdir runs/zoo_digits

Writes <workdir>/zoo (the store), zoo_summary.json, report.md and PNGs. Re-running resumes, only with the same
config (anything else is refused before training; --overwrite starts afresh). Multi-host: start
one process per host with --coordinator_address/--num_processes/--process_id; they split the units.
"""

import os

import jax
from absl import flags

from launch import common
from wa import report, runs
from wa.zoo import build
from wa.zoo import report as zoo_report

_CONFIG = common.config_flag("configs/zoo.py:digits", "Zoo config.")
flags.DEFINE_string("workdir", None, "Run folder (resumes a zoo there); default runs/zoo-<time>.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = _CONFIG.value
    common.start()
    workdir = runs.writable(FLAGS.workdir, "zoo")
    builder = build.Builder(cfg, workdir)  # every check happens here, before any training
    folder = runs.Run.open(workdir, "zoo", build.fingerprint(cfg), FLAGS.overwrite, jax.process_index())
    folder.started()
    run = builder.run()
    if common.is_chief():
        zoo = build.store_lib.Zoo.open(run["zoo"])
        summary = build.summary(zoo, run)
        report.write_json(os.path.join(workdir, "zoo_summary.json"), summary)
        zoo_report.write(zoo, summary, workdir)
        folder.finish(["zoo/zoo.json", "zoo/plan.parquet", "zoo_summary.json", "report.md"])
        print(f"{summary['n_models']} models, {summary['n_checkpoints']} checkpoints, "
              f"{summary['family_trees_3_generations']} trees of >= 3 generations; test acc median "
              f"{summary['test_acc']['q50']:.3f} (5%-95%: {summary['test_acc']['q05']:.3f}-"
              f"{summary['test_acc']['q95']:.3f}); {run['models_per_second']:.2f} models/s; {workdir}/report.md")


if __name__ == "__main__":
    common.run(main)
