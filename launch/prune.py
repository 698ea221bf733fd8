r"""One-shot pruning on the LLM-pruning papers' protocol: a table of pruners × sparsities on WikiText-2 test.

  python -m launch.prune --config configs/prune.py:stories260k --workdir runs/prune-stories260k
  python -m launch.prune --config configs/prune.py:smoke --workdir /tmp/prune

The workdir receives config.json, prune.json (every perplexity, the protocol, the stages' seconds), prune.md (the
table, what it says, the plot), pruning.png, with ``--config.save_pruned`` a pruned HF checkpoint in pruned/, and
DONE.json (last). A workdir holding another run is refused before any compute; --overwrite empties it first.
"""

import os
import time

import jax
from absl import flags

from launch import common
from wa import runs
from wa.esa import job, pipeline, prune_report

_CONFIG = common.config_flag("configs/prune.py:stories260k", "Pruning config (configs/prune.py).")
flags.DEFINE_string("workdir", None, "Run folder; default runs/prune-<UTC time>.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = _CONFIG.value
    plan = pipeline.check(cfg)       # config errors before devices, files or compute
    save = prune_report.check_save(cfg, plan)
    workdir = runs.writable(FLAGS.workdir, "prune")
    common.start()
    chief = jax.process_index() == 0
    folder = job.open_folder(cfg, workdir, "prune", FLAGS.overwrite)
    t0 = time.time()
    s = pipeline.setup(cfg)
    sc, _ = pipeline.score(s)
    t_scores = time.time() - t0
    table = pipeline.prune_study(s.loaded, s.flat, sc.first, s.data, cfg, s.base["ppl"], s.plan, True, s.clock,
                                 sc.batches)
    seconds = {"load_and_dense_ppl_and_scores": round(t_scores, 1), "pruning": round(time.time() - t0 - t_scores, 1)}
    out = prune_report.result(cfg, s, table, seconds)
    files = ["config.json"]
    if save is not None and chief:
        path = os.path.join(workdir, "pruned")
        prune_report.save(s, sc, cfg, save, path)
        out["saved"] = {"pruner": "/".join(save), "path": "pruned"}
        files += ["pruned/config.json", "pruned/model.safetensors"]
    if chief:
        files += prune_report.write(workdir, out)
        folder.finish(files)
        dense = out["ppl_dense"]
        print(f"dense perplexity {dense:.4f} on {out['protocol']['eval_tokens']:,} WikiText-2 test tokens; "
              f"table in {workdir}/prune.md")


if __name__ == "__main__":
    common.run(main)
