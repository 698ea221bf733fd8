r"""The computational roles of critical weights (heads, neurons, vocabulary rows) and knowledge localisation.

  python -m launch.roles --config configs/roles.py:stories260k --workdir runs/roles-stories260k
  python -m launch.roles --config configs/roles.py:smoke --workdir /tmp/roles

The workdir receives config.json, roles.json (every figure), roles.md (the tables, what each top unit does),
localisation.png and DONE.json (last). A workdir holding another run is refused before any compute; --overwrite
empties it first.
"""

import time

import jax
from absl import flags

from launch import common
from wa import runs
from wa.esa import job, pipeline, roles_report

_CONFIG = common.config_flag("configs/roles.py:stories260k", "Roles config (configs/roles.py).")
flags.DEFINE_string("workdir", None, "Run folder; default runs/roles-<UTC time>.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = _CONFIG.value
    pipeline.check(cfg)              # config errors before devices, files or compute
    roles_report.check(cfg)
    workdir = runs.writable(FLAGS.workdir, "roles")
    common.start()
    folder = job.open_folder(cfg, workdir, "roles", FLAGS.overwrite)
    t0 = time.time()
    s = pipeline.setup(cfg)
    sc, sel = pipeline.score(s)
    res = roles_report.study(s, sc, sel)
    if jax.process_index() == 0:
        folder.finish(["config.json"] + roles_report.write(workdir, cfg, res, time.time() - t0))
        for m, t in res["top"].items():
            print(f"{m}: {t['share_named']:.0%} of the top {cfg.roles_top} weights have a named role "
                  f"({t['share_named_without_token_rows']:.0%} leaving out vocabulary rows)")
        print(f"report in {workdir}/roles.md")


if __name__ == "__main__":
    common.run(main)
