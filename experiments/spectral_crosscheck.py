r"""wa's spectral metrics (``wa.weights.spectral``) against the ``weightwatcher`` package itself, on the same matrices.

weightwatcher needs PyTorch, which wa does not install, so this runs in two steps:

  .venv/bin/python experiments/spectral_crosscheck.py --dump /tmp/ww.npz \
      [--zoo /work/zoos/small_cnn_fmnist/zoo]                        # matrices + wa's metrics, wa's environment
  python experiments/spectral_crosscheck.py --check /tmp/ww.npz \
      --out experiments/results/spectral_crosscheck               # an environment with torch and weightwatcher

The matrices: random Gaussian and heavy-tailed (Student t, 3 degrees of freedom) dense and 3x3 convolution kernels
of several shapes, every matrix of the vendored stories260K Llama, and the three convolutions and head of the
first networks of a Small-CNN-protocol zoo when one is given. Each becomes a torch ``Linear`` / ``Conv2d`` (weights
transposed to torch's [out, in] / [out, in, kh, kw]) in one ``nn.Sequential``; ``WeightWatcher(model).analyze()``
runs with its defaults. Writes crosscheck.json (per matrix both sets of figures) and README.md.
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = ("alpha", "alpha_weighted", "stable_rank", "log_spectral_norm", "log_norm")


def _spectral():
    """wa.weights.spectral, loaded from its file (numpy alone: it runs in the weightwatcher environment too)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("wa_spectral", os.path.join(ROOT, "wa", "weights", "spectral.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dump(path: str, zoo: str) -> None:
    sys.path.insert(0, ROOT)
    rng = np.random.default_rng(0)
    mats = {}
    for shape in ((64, 32), (256, 128), (512, 512), (1000, 300)):
        mats[f"gauss_{shape[0]}x{shape[1]}"] = rng.normal(0, 1 / np.sqrt(shape[0]), shape)
        mats[f"student_t3_{shape[0]}x{shape[1]}"] = rng.standard_t(3, shape) / np.sqrt(shape[0])
    for cin, cout in ((16, 16), (32, 64)):
        mats[f"conv_gauss_3x3x{cin}x{cout}"] = rng.normal(0, 0.1, (3, 3, cin, cout))
        mats[f"conv_t3_3x3x{cin}x{cout}"] = rng.standard_t(3, (3, 3, cin, cout)) * 0.1
    from flax import traverse_util

    from wa import models
    loaded = models.load(os.path.join(ROOT, "third_party", "stories260k", "hf"))
    for k, v in traverse_util.flatten_dict(loaded.params, sep="/").items():
        v = np.asarray(v, np.float64)
        if v.ndim == 3:          # a scanned stack of layers: one matrix per layer
            for i in range(v.shape[0]):
                mats[f"stories260k/{k}/layer{i}"] = v[i]
        elif v.ndim == 2:
            mats[f"stories260k/{k}"] = v
    if zoo:
        from wa.zoo import store
        z = store.Zoo.open(zoo)
        for mid in z.final()["model_id"].to_numpy()[:4]:
            p = z.load(int(mid))
            for layer in ("conv_0", "conv_1", "conv_2", "head"):
                mats[f"zoo_model{mid}/{layer}"] = np.asarray(p[layer]["kernel"], np.float64)
    sp = _spectral()
    ours = {k: sp.layer(v.astype(np.float32)) for k, v in mats.items()}   # the values weightwatcher will read
    np.savez(path, **{k: v.astype(np.float32) for k, v in mats.items()})
    with open(path + ".wa.json", "w") as f:
        json.dump(ours, f)
    print(f"{len(mats)} matrices -> {path}")


def check(path: str, out: str) -> None:
    import torch
    import weightwatcher as ww
    mats = dict(np.load(path))
    ours = json.load(open(path + ".wa.json"))
    layers, names = [], []
    for k, w in mats.items():
        if w.ndim == 4:
            m = torch.nn.Conv2d(w.shape[2], w.shape[3], 3, bias=False)
            m.weight.data = torch.tensor(w.transpose(3, 2, 0, 1).copy())
        else:
            m = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
            m.weight.data = torch.tensor(w.T.copy())
        layers.append(m)
        names.append(k)
    model = torch.nn.Sequential(*layers)
    df = ww.WeightWatcher(model=model).analyze()
    rows = []
    by_name = {str(r["name"]): r for _, r in df.iterrows()}     # a Sequential's children are named 0, 1, ...
    for i, k in enumerate(names):
        r = by_name.get(str(i))
        theirs = {f: (float(r[f]) if r is not None and f in r else float("nan")) for f in FEATURES}
        rows.append({"matrix": k, "shape": list(mats[k].shape), "wa": ours[k], "weightwatcher": theirs,
                     "analyzed": r is not None})
    os.makedirs(out, exist_ok=True)
    summary = {}
    for f in FEATURES:
        pairs = [(x["wa"][f], x["weightwatcher"][f]) for x in rows if x["analyzed"]]
        pairs = [(a, b) for a, b in pairs if np.isfinite(a) and np.isfinite(b)]
        d = np.array([abs(a - b) / max(abs(b), 1e-12) for a, b in pairs])
        summary[f] = {"matrices": len(pairs), "max_rel_diff": float(d.max()) if len(d) else None,
                      "within_1e-3": int((d <= 1e-3).sum()), "within_1e-2": int((d <= 1e-2).sum())}
    res = {"weightwatcher": ww.__version__, "torch": torch.__version__, "matrices": len(rows),
           "analyzed_by_weightwatcher": sum(x["analyzed"] for x in rows), "summary": summary, "rows": rows}
    with open(os.path.join(out, "crosscheck.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = ["# wa's spectral metrics against weightwatcher", "",
             f"weightwatcher {ww.__version__} (torch {torch.__version__}), `WeightWatcher(model).analyze()` with its "
             f"defaults, on {len(rows)} matrices ({res['analyzed_by_weightwatcher']} analyzed), against "
             "`wa.weights.spectral.layer` on the same float32 matrices; α where both fit one (neither fits an ESD of "
             "fewer than 8 eigenvalues). Relative difference |wa − ww| / |ww| per metric:", "",
             "| metric | matrices | within 1e-3 | within 1e-2 | largest |", "|---|---|---|---|---|"]
    for f, s in summary.items():
        big = "—" if s["max_rel_diff"] is None else f"{s['max_rel_diff']:.2e}"
        lines.append(f"| {f} | {s['matrices']} | {s['within_1e-3']} | {s['within_1e-2']} | {big} |")
    worst = sorted((x for x in rows if x["analyzed"] and np.isfinite(x["wa"]["alpha"])),
                   key=lambda x: -abs(x["wa"]["alpha"] - x["weightwatcher"]["alpha"]))[:8]
    lines += ["", "Largest α differences:", "", "| matrix | shape | wa α | weightwatcher α |", "|---|---|---|---|"]
    lines += [f"| {x['matrix']} | {x['shape']} | {x['wa']['alpha']:.4f} | {x['weightwatcher']['alpha']:.4f} |"
              for x in worst]
    lines += ["", "Reproduce: see the docstring of `experiments/spectral_crosscheck.py`.", ""]
    open(os.path.join(out, "README.md"), "w").write("\n".join(lines))
    print(json.dumps({"matrices": len(rows), **{f: s["max_rel_diff"] for f, s in summary.items()}}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump")
    ap.add_argument("--check")
    ap.add_argument("--zoo", default="")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "spectral_crosscheck"))
    a = ap.parse_args()
    if a.dump:
        dump(a.dump, a.zoo)
    elif a.check:
        check(a.check, a.out)
    else:
        ap.error("give --dump FILE (wa's environment) or --check FILE (torch + weightwatcher)")
