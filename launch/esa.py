r"""Critical weight analysis: scores, top-k, stability, perturbation validation, statistics, report.

  python -m launch.esa --config configs/esa.py:stories260k --workdir runs/esa
  python -m launch.esa --config configs/esa.py:smoke --workdir /tmp/esa

The workdir receives config.json, summary.json, topk.csv, PNG plots, report.md and DONE.json (last). A workdir
holding another analysis is refused before any compute; --overwrite empties it first.
"""


from absl import flags

from launch import common
from wa import runs
from wa.esa import job, pipeline

_CONFIG = common.config_flag("configs/esa.py:stories260k", "ESA config.")
flags.DEFINE_string("workdir", None, "Run folder; default runs/esa-<UTC time>.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = _CONFIG.value
    pipeline.check(cfg)  # config errors before devices, files or compute
    workdir = runs.writable(FLAGS.workdir, "esa")
    common.start()
    _, summary = job.run(cfg, workdir, FLAGS.overwrite)
    if common.is_chief():
        for m, e in summary["per_metric"].items():
            main = e["perturb_main"]
            print(f"{m:16s} jaccard {e['jaccard_mean']:.3f}  top1%/median {e['heavy_tail_ratio']:8.1f}  "
                  f"{main['kind']} ΔPPL top-k {main['topk']['dppl_mean']:.4f}"
                  + (f" random-k {main['random_k']['dppl_mean']:.4f} p {e['p_value_topk_vs_random']:.2g}"
                     if "random_k" in main else ""))
        print(f"base perplexity {summary['ppl_base']:.4f}; report in {workdir}/report.md")


if __name__ == "__main__":
    common.run(main)
