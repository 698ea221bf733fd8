r"""Neural Cleanse (Wang et al. 2019) on every final model of a zoo with BadNets backdoors: the published,
untrained reference detector beside the learners that predict "backdoored" from weights.

  python experiments/neural_cleanse.py --zoo=runs/zoo_digits_backdoor/zoo --workdir=runs/cleanse_digits_backdoor
  python experiments/neural_cleanse.py --zoo=/tmp/zoo/zoo --workdir=/tmp/cleanse --steps=20     # seconds, for tests

Per model: the L1 norm of the smallest reversed trigger of each class on clean test images, the anomaly index of the
smallest (``wa.zoo.cleanse``), and whether that class is the model's backdoor target. AUROC of the anomaly index
(backdoored positive) over every model, per family, and on the learners' test split (by family tree, 70/15/15,
seed 0: ``experiments/nwa_benchmark.py``'s). Writes cleanse.parquet, results.json, report.md and anomaly.png;
prints one JSON line.
"""

import json
import os
import sys
import time

import jax
import numpy as np
import pandas as pd
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402

from wa import report  # noqa: E402
from wa.data import images  # noqa: E402
from wa.esa import backdoor  # noqa: E402
from wa.learners import data as data_lib  # noqa: E402
from wa.learners import probe  # noqa: E402
from wa.zoo import cleanse  # noqa: E402

flags.DEFINE_string("zoo", "runs/zoo_digits_backdoor/zoo", "Zoo store with backdoors (configs/zoo.py:digits_backdoor).")
flags.DEFINE_string("workdir", "runs/cleanse_digits_backdoor", "Output folder.")
flags.DEFINE_integer("images", 256, "Clean test images the triggers are reversed on.")
flags.DEFINE_integer("steps", cleanse.Spec.steps, "Adam steps per (model, class).")
flags.DEFINE_float("lam", cleanse.Spec.lam, "Weight of the mask's L1 norm.")
flags.DEFINE_integer("chunk", 64, "Models reversed at once.")
FLAGS = flags.FLAGS


def run(zoo: str, workdir: str, spec: cleanse.Spec, n_images: int, chunk: int) -> dict:
    t0 = time.time()
    ws = data_lib.load(zoo, final_only=True)
    rows = ws.rows
    if "backdoored" not in rows:
        raise cleanse.CleanseError(f"--zoo={zoo}: the zoo has no backdoors (build it with data_characteristics."
                                   "backdoor, e.g. configs/zoo.py:digits_backdoor)")
    data = images.load(ws.rows["dataset"].iloc[0])
    x = data.x_test[:n_images]
    lo, hi = ws.forward.input_range
    norm = np.zeros((len(ws), data.n_classes))
    success = np.zeros((len(ws), data.n_classes))
    arch_ids = np.array([a.id for a in ws.forward.archs])
    for arch in sorted(set(arch_ids)):
        idx = np.flatnonzero(arch_ids == arch)
        module = ws.forward.archs[idx[0]].module(data.n_classes)

        def apply(p, im, module=module):
            return module.apply({"params": p}, lo + (hi - lo) * im)

        for s in range(0, len(idx), chunk):
            part = idx[s:s + chunk]
            params = jax.tree.map(lambda *v: np.stack(v), *[ws.params[i] for i in part])
            r = cleanse.reverse(apply, params, x, data.n_classes, spec, seed=int(s))
            norm[part], success[part] = r["norm"], r["success"]
        print(f"{arch}: {len(idx)} models, {time.time() - t0:.0f} s", flush=True)
    index, label = cleanse.anomaly(norm)
    df = pd.DataFrame({"model_id": rows["model_id"], "family": rows["family"], "arch_id": arch_ids,
                       "backdoored": rows["backdoored"].to_numpy(bool), "target": rows["backdoor_target"],
                       "backdoor_success": rows["backdoor_success"], "anomaly_index": index, "smallest_class": label,
                       "smallest_norm": norm.min(1), "median_norm": np.median(norm, 1),
                       "min_success": success.min(1)})
    parts = probe.split(rows, ml_collections.ConfigDict(dict(kind="tree", fractions=(0.7, 0.15, 0.15), seed=0)))
    df["split"] = "train"
    for k in ("val", "test"):
        df.loc[parts[k], "split"] = k
    os.makedirs(workdir, exist_ok=True)
    df.to_parquet(os.path.join(workdir, "cleanse.parquet"), index=False)

    def figures(d: pd.DataFrame) -> dict:
        bd = d["backdoored"].to_numpy(bool)
        return {"models": int(len(d)), "backdoored": int(bd.sum()),
                "auroc": backdoor.auroc(d["anomaly_index"].tolist(), bd.tolist()),
                "flagged_backdoored": float((d["anomaly_index"][bd] > spec.threshold).mean()),
                "flagged_clean": float((d["anomaly_index"][~bd] > spec.threshold).mean()),
                "target_found": float((d["smallest_class"][bd] == d["target"][bd]).mean())}

    res = {"spec": spec.__dict__, "images": int(len(x)), "seconds": round(time.time() - t0, 1),
           "all": figures(df), "test_split": figures(df[df["split"] == "test"]),
           "by_family": {f: figures(g) for f, g in df.groupby("family")},
           "reversal_success_median": float(np.median(success)), "zoo": os.path.abspath(zoo)}
    report.write_json(os.path.join(workdir, "results.json"), res)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(0, max(6.0, float(np.nanpercentile(df["anomaly_index"], 99))), 40)
    for bd, color, name in ((False, "tab:gray", "clean"), (True, "tab:red", "backdoored")):
        ax.hist(df["anomaly_index"][df["backdoored"] == bd], bins, alpha=0.6, color=color, label=name)
    ax.axvline(spec.threshold, color="k", ls="--", lw=1)
    ax.set_xlabel("anomaly index of the smallest reversed trigger")
    ax.set_ylabel("models")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "anomaly.png"), dpi=110)
    plt.close(fig)
    table = [{"set": name, **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in f.items()}}
             for name, f in (("all", res["all"]), ("test split", res["test_split"]),
                             *((f"family {k}", v) for k, v in res["by_family"].items()))]
    report.write_text(os.path.join(workdir, "report.md"), "\n".join([
        "# Neural Cleanse on the zoo's final models", "",
        f"Reversed triggers on {len(x)} clean test images, {spec.steps} Adam steps (lr {spec.lr}), λ {spec.lam} per "
        f"mask pixel; anomaly index of the smallest mask over the classes' L1 norms, flagged above "
        f"{spec.threshold} (Wang et al. 2019). {res['seconds'] / 60:.1f} min. Median success of the reversed "
        f"triggers: {res['reversal_success_median']:.3f}.", "",
        report.markdown_table(table), "", "![anomaly index](anomaly.png)", ""]))
    return res


def main(argv):
    del argv
    spec = cleanse.Spec(steps=FLAGS.steps, lam=FLAGS.lam)
    res = run(FLAGS.zoo, FLAGS.workdir, spec, FLAGS.images, FLAGS.chunk)
    print(json.dumps({"auroc": res["all"]["auroc"], "auroc_test_split": res["test_split"]["auroc"],
                      "flagged_backdoored": res["all"]["flagged_backdoored"],
                      "flagged_clean": res["all"]["flagged_clean"], "target_found": res["all"]["target_found"],
                      "seconds": res["seconds"]}))


if __name__ == "__main__":
    app.run(main)
