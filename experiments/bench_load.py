r"""Checkpoint loading: wall time and peak host memory, wa's loader vs transformers' Flax from_pretrained (where
the installed transformers still has Flax classes, the 4.x line; with 5.x only wa's figures are printed).

  python experiments/bench_load.py [--checkpoint minilm] [--repeats 2]

Each measurement runs in a fresh subprocess (peak RSS is per process). Prints one JSON line:
seconds and peak RSS above the interpreter-plus-imports baseline, for both loaders. On a CPU
backend the "device" arrays live in host memory too, so one copy of the parameters is the
floor; ``*_copies_beyond_device`` is (extra RSS - model-construction overhead - parameter
bytes) / parameter bytes, where the overhead is measured by building the model without weights.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SNIPPET = r"""
import json, os, resource, sys, time
import jax, numpy as np, transformers
from wa import models
from wa.data import paths
path = paths.checkpoint(sys.argv[1]); how = sys.argv[2]
FLAX_CLASSES = {"bert": "FlaxBertModel", "roberta": "FlaxRobertaModel", "gpt2": "FlaxGPT2LMHeadModel",
                "gpt_neo": "FlaxGPTNeoForCausalLM", "opt": "FlaxOPTForCausalLM", "llama": "FlaxLlamaForCausalLM",
                "mistral": "FlaxMistralForCausalLM"}
jax.numpy.zeros(1).block_until_ready()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if how == "overhead":
    cfg = models.read_config(path)
    model, _ = models.build_model(cfg)
    params = jax.numpy.zeros(1)
elif how == "wa":
    params = models.load(path).params
elif how == "transformers":
    cfg = models.read_config(path)
    cls = getattr(transformers, FLAX_CLASSES.get(cfg.model_type, ""), None)
    if cls is None:   # transformers 5 has no Flax classes
        print(json.dumps({"skipped": f"transformers {transformers.__version__} has no Flax class for "
                                     f"{cfg.model_type}"}))
        sys.exit(0)
    params = cls.from_pretrained(path, from_pt=not any(f.startswith("flax_model") for f in os.listdir(path))).params
jax.block_until_ready(params)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
print(json.dumps({"seconds": dt, "extra_rss_bytes": (peak - base) * 1024, "param_bytes": n}))
"""


def measure(ckpt, how):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", SNIPPET, ckpt, how], capture_output=True, text=True, env=env,
                       cwd=REPO, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="minilm")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    out = {"checkpoint": a.checkpoint}
    overhead = min(measure(a.checkpoint, "overhead")["extra_rss_bytes"] for _ in range(a.repeats)) / 2**20
    out["construction_overhead_mb"] = round(overhead, 1)
    hows = ["wa", "transformers"]
    for how in list(hows):
        runs = [measure(a.checkpoint, how) for _ in range(a.repeats)]
        if "skipped" in runs[0]:   # the comparison needs transformers 4.x's Flax classes
            out["transformers"] = runs[0]["skipped"]
            hows.remove(how)
            continue
        best = min(runs, key=lambda r: r["seconds"])
        out[f"{how}_seconds"] = round(best["seconds"], 3)
        out[f"{how}_extra_rss_mb"] = round(min(r["extra_rss_bytes"] for r in runs) / 2**20, 1)
        out["param_mb"] = round(best["param_bytes"] / 2**20, 1)
    for how in hows:
        beyond = out[f"{how}_extra_rss_mb"] - overhead - out["param_mb"]
        out[f"{how}_copies_beyond_device"] = round(beyond / out["param_mb"], 2)
    if "transformers_seconds" in out:
        out["speedup"] = round(out["transformers_seconds"] / out["wa_seconds"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
