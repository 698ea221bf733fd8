r"""ESA across model sizes: train a ladder of character-level GPT-2s, analyse each, fit power laws.

  python experiments/esa_scaling.py [--workdir runs/esa_scaling] [--steps 300]

For each size: ``wa.train.lm`` (Tiny Shakespeare, bytes, last 10% of paragraphs held out), then the
ESA pipeline (magnitude and grad_x_weight, sign flip of the top 0.2% per matrix vs random-k).
Fits log-log lines (``numpy.polyfit``) of validation loss and of the sign-flip top-k / random-k
ratio against the parameter count, with R². Prints one JSON line; writes results.json and
scaling.png. Re-running reuses finished models (orbax resume).
"""

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZES = [(32, 2), (48, 3), (64, 4), (96, 4)]  # (hidden, layers)


def fit(x, y):
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = intercept + slope * lx
    r2 = 1 - np.sum((ly - pred) ** 2) / np.sum((ly - ly.mean()) ** 2)
    return {"exponent": float(slope), "log_prefactor": float(intercept), "r2": float(r2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/esa_scaling")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()

    from launch.common import load_config as config
    from wa.esa import pipeline
    from wa.report import plots
    from wa.train import lm

    rows = []
    for hidden, layers in SIZES:
        wd = os.path.join(a.workdir, f"h{hidden}_l{layers}")
        os.makedirs(wd, exist_ok=True)
        t = config("train_lm", "shakespeare_char")
        t.hidden, t.layers, t.heads, t.steps, t.seq_len, t.eval_every, t.checkpoint_every = (
            hidden, layers, 4, a.steps, 128, a.steps, a.steps)
        t.warmup = a.steps // 10
        tr = lm.train(t, wd, progress=False)
        e = config("esa", "shakespeare_char")
        e.model = tr["hf_dir"]
        e.metric = "magnitude,grad_x_weight"
        e.seq_len, e.max_samples, e.eval_windows, e.seeds, e.random_draws = 128, 16, 16, "1,2", 4
        e.perturb_scale, e.prune_sparsity, e.super_weights, e.save_plots = "1.0", "", False, False
        s = pipeline.summarize(pipeline.run(e, progress=False))
        row = {"hidden": hidden, "layers": layers, "n_params": tr["n_params"], "val_nll": tr["val_nll"]}
        for m in ("magnitude", "grad_x_weight"):
            pm = s["per_metric"][m]
            row[f"{m}_ratio"] = pm["ratio_topk_vs_random"]
            row[f"{m}_p"] = pm["p_value_topk_vs_random"]
            row[f"{m}_heavy_tail"] = pm["heavy_tail_ratio"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    n = [r["n_params"] for r in rows]
    out = {"sizes": rows, "fit_val_nll_vs_params": fit(n, [r["val_nll"] for r in rows])}
    for m in ("magnitude", "grad_x_weight"):
        out[f"fit_{m}_ratio_vs_params"] = fit(n, [r[f"{m}_ratio"] for r in rows])
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    plots.scaling(n, {"validation nats/token": [r["val_nll"] for r in rows],
                      "sign-flip ratio (grad×weight)": [r["grad_x_weight_ratio"] for r in rows],
                      "sign-flip ratio (magnitude)": [r["magnitude_ratio"] for r in rows]},
                  os.path.join(a.workdir, "scaling.png"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
