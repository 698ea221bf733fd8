r"""Learn from weights: train and evaluate one learner on a zoo (configs/probe.py names the variants).

  python -m launch.probe --config configs/probe.py:nwpa --workdir runs/probe_nwpa

Writes <workdir>/metrics.json (task → metric → value on held-out family trees, per family, permutation gaps,
timings, each target's label ceiling: its split-half reliability on the zoo), history.json, predictions.parquet,
embeddings.npy and orbax checkpoints; re-running resumes the run the folder holds (a different config or zoo is
refused; --overwrite starts afresh).
"""

from absl import flags

from launch import common
from wa import runs
from wa.learners import probe

_CONFIG = common.config_flag("configs/probe.py:nwpa", "Probe config.")
flags.DEFINE_string("workdir", None, "Run folder; default runs/probe-<time>.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = _CONFIG.value
    probe.check(cfg)
    common.start()
    r = probe.run(cfg, runs.writable(FLAGS.workdir, "probe"), overwrite=FLAGS.overwrite)
    for task, m in r["tasks"].items():
        keys = ("accuracy", "f1", "auroc") if "accuracy" in m else ("r2", "kendall_tau", "mae")
        keys = tuple(k for k in keys if k in m)   # AUROC: two-class tasks whose test rows hold both
        c = r["ceilings"].get(task, {})
        cap = (f"   (label ceiling: R² {c['r2_ceiling']:.3f}, τ {c['tau_ceiling']:.3f})" if c.get("measured") else "")
        print(f"{task:>15}: " + "  ".join(f"{k} {m[k]:.4f}" for k in keys) + cap)
    print(f"permutation gap (max over {r['permutation']['networks']} networks): {r['permutation']['max']:.2e}")


if __name__ == "__main__":
    common.run(main)
