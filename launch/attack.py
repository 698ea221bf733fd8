r"""Bit-flip attack search (progressive bit search) on a model's stored weights, against flips without search.

  python -m launch.attack --config configs/attack.py:stories260k --workdir runs/attack-stories260k
  python -m launch.attack --config configs/attack.py:smoke --workdir /tmp/attack

The workdir receives config.json, attack.json (every flip and control), attack.md (the table, what the search
picks, the plot), attack.png and DONE.json (last). A workdir holding another run is refused before any compute;
--overwrite empties it first.
"""

import time

import jax
from absl import flags

from launch import common
from wa import runs
from wa.esa import attack, attack_report, job, pipeline

_CONFIG = common.config_flag("configs/attack.py:stories260k", "Attack config (configs/attack.py).")
flags.DEFINE_string("workdir", None, "Run folder; default runs/attack-<UTC time>.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = _CONFIG.value
    pipeline.check(cfg)              # config errors before devices, files or compute
    attack.check(pipeline.as_list(cfg.attack_encodings, str, "attack_encodings"), cfg.attack_threshold,
                 cfg.attack_max_flips, cfg.attack_candidates, cfg.attack_exact)
    workdir = runs.writable(FLAGS.workdir, "attack")
    common.start()
    chief = jax.process_index() == 0
    folder = job.open_folder(cfg, workdir, "attack", FLAGS.overwrite)
    t0 = time.time()
    s = pipeline.setup(cfg)
    sc, sel = pipeline.score(s)
    res = attack_report.study(s, sc, sel)
    if chief:
        files = ["config.json"] + attack_report.write(workdir, cfg, res, s.base, time.time() - t0)
        folder.finish(files)
        for row in attack_report.summary_rows(res, cfg.attack_control_max, cfg.attack_max_flips):
            print(" | ".join(f"{k} {v}" for k, v in row.items()))
        print(f"report in {workdir}/attack.md")


if __name__ == "__main__":
    common.run(main)
