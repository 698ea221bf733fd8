r"""Backdoored language models against their clean twins: attack success, trigger-only critical weights, and
detectors' AUROC over the population.

  python -m launch.backdoor --config configs/backdoor.py:stories260k --workdir runs/backdoor-stories260k
  python -m launch.backdoor --config configs/backdoor.py:smoke --workdir /tmp/backdoor

The workdir receives config.json, backdoor.json (every model's figures), backdoor.md, detectors.png and DONE.json
(last). A workdir holding another run is refused before any compute; --overwrite empties it first.
"""

import jax
from absl import flags

from launch import common
from wa import runs
from wa.esa import backdoor_report, job

_CONFIG = common.config_flag("configs/backdoor.py:stories260k", "Backdoor config (configs/backdoor.py).")
flags.DEFINE_string("workdir", None, "Run folder; default runs/backdoor-<UTC time>.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = _CONFIG.value
    backdoor_report.check(cfg)       # config errors before devices, files or compute
    workdir = runs.writable(FLAGS.workdir, "backdoor")
    common.start()
    folder = job.open_folder(cfg, workdir, "backdoor", FLAGS.overwrite)
    chief = jax.process_index() == 0
    res = backdoor_report.run(cfg)
    if chief:
        folder.finish(["config.json"] + backdoor_report.write(workdir, cfg, res))
        for d, a in res["auroc"].items():
            print(f"{d}: AUROC {a:.3f}")
        print(f"report in {workdir}/backdoor.md")


if __name__ == "__main__":
    common.run(main)
