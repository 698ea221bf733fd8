r"""ESA benchmark: prints one JSON line.

  python experiments/bench_esa.py [--checkpoint stories260k] [--windows 8] [--seq_len 256]

- per metric: seconds per 1k calibration tokens (after compilation) and peak resident memory above
  the loaded model, each metric in a fresh subprocess;
- Hutchinson cost: one vmapped chunk of c probes against c gradients on the same batch, for
  c = 1, 4, 16, timed in this process (target: per-probe cost <= 2x one gradient);
- per-window scores: seconds per calibration batch (after compilation) of grad_x_weight alone against grad_x_weight,
  grad² and (g·w)² from one pass, on a 2-layer model of SmolLM2-135M's widths with an untied head (random weights,
  8 windows of 256 tokens, 2 at a time): one score should cost no more than three. The shape matters: XLA's CPU
  backend once fused the single score's reduction with the weights inside it and took minutes per batch there
  (ratio > 10), where three scores took 16 s;
- Hutchinson accuracy: relative L2 error of the diagonal against the exact Hessian diagonal
  (computed column by column) of a ~600-parameter Llama, as a function of probe count.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METRICS = ("magnitude", "grad_x_weight", "grad_squared", "hutchinson_diag", "act_mag")

ONE_METRIC = r"""
import json, resource, sys, time
import jax, numpy as np
from wa import models, parallel
from wa.data import paths, text, tokenizers
from wa.esa import scores
ckpt, metric, windows, seq_len, probes, chunk = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
path = paths.checkpoint(ckpt)
m = models.load(path)
tok = tokenizers.get(path)
ids, mask = text.lm_windows(text.token_stream(text.documents(text.read("tinystories"), "stories")[:400], tok), seq_len)
ids, mask = ids[:windows], mask[:windows]
batches = list(parallel.iter_batches(m.mesh, {"input_ids": ids, "attention_mask": mask}, min(8, windows)))
cal = scores.Calibration(m, batches, jax.random.key(0), probes, chunk, progress=False)
jax.block_until_ready(scores.compute(metric, m.params, cal))            # compile
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
jax.block_until_ready(scores.compute(metric, m.params, cal))
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = int((mask[:, 1:] * mask[:, :-1]).sum())
print(json.dumps({"seconds": dt, "tokens": tokens, "peak_rss_mb": peak / 1024}))
"""


def per_metric(args):
    out = {}
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    for metric in METRICS:
        r = subprocess.run([sys.executable, "-c", ONE_METRIC, args.checkpoint, metric, str(args.windows),
                            str(args.seq_len), str(args.probes), str(args.probe_chunk)], capture_output=True,
                           text=True, env=env, cwd=REPO, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out[metric] = {"seconds_per_1k_tokens": round(1000 * res["seconds"] / res["tokens"], 4),
                       "peak_rss_mb": round(res["peak_rss_mb"], 1)}
    return out


def _median_time(fn, *a, reps=5):
    import jax
    jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def hutchinson_cost(args):
    import jax
    import jax.numpy as jnp

    from wa import models, parallel
    from wa.data import paths, text, tokenizers
    from wa.esa import scores

    path = paths.checkpoint(args.checkpoint)
    m = models.load(path)
    tok = tokenizers.get(path)
    ids, mask = text.lm_windows(text.token_stream(text.documents(text.read("tinystories"), "stories")[:200], tok),
                                args.seq_len)
    batch = next(parallel.iter_batches(m.mesh, {"input_ids": ids[:8], "attention_mask": mask[:8]}, 8))

    def loss(p):
        s, c = m.token_nll(p, batch)
        return s / c

    grad = jax.jit(jax.grad(loss))
    t_grad = _median_time(grad, m.params)
    out = {"seconds_per_gradient": round(t_grad, 4)}
    for c in (1, 4, 16):
        hvp = jax.jit(lambda p, k, c=c: scores.hvp_diag_chunk(loss, p, k, c, jnp.ones(c) / c))
        t = _median_time(hvp, m.params, jax.random.key(0))
        out[f"chunk_{c}"] = {"seconds": round(t, 4), "per_probe_over_gradient": round(t / (c * t_grad), 3)}
    return out


def per_window_scores():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers

    from wa.esa import scores
    from wa.models import checkpoint
    from wa.parallel import mesh as mesh_lib
    from wa.parallel import rules as rules_lib

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   tie_word_embeddings=False, rope_theta=100000.0)
    model, family = checkpoint.build_model(cfg)
    mesh = mesh_lib.make_mesh("data:1,fsdp:-1")
    shardings = rules_lib.shardings_for(model.params_shape_tree, family.partition_rules, mesh)
    params = jax.jit(lambda k: model.init_weights(k, (1, 8)), out_shardings=shardings)(jax.random.key(0))
    loaded = checkpoint.Loaded(model, params, cfg, family, mesh, shardings, "", [])
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 256)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids))}
    out = {}
    for key, names in (("one", ("grad_x_weight",)), ("three", ("grad_x_weight", "grad_squared", "taylor_squared"))):
        cal = scores.Calibration(loaded, [batch, batch], jax.random.key(0), progress=False, window_chunk=2)
        times, t = [], time.perf_counter()
        for _, acc in scores._window_sums(params, cal, names):
            jax.block_until_ready(acc)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
        out[f"{key}_score_seconds_per_batch"] = round(times[-1], 2)   # the second batch: compiled
    out["one_over_three"] = round(out["one_score_seconds_per_batch"] / out["three_score_seconds_per_batch"], 3)
    return out


def hutchinson_error():
    import jax
    import jax.flatten_util
    import jax.numpy as jnp
    import numpy as np
    import transformers

    from wa.esa import scores
    from wa.models import families, llama

    cfg = transformers.LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=8, vocab_size=12, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    model = llama.Model(cfg)
    model_params = model.init_weights(jax.random.key(0), (1, 8))
    fam = families.FAMILIES["llama"]
    ids = np.random.default_rng(0).integers(3, 12, size=(4, 10)).astype(np.int32)
    f = lambda p: fam.loss(model, p, {"input_ids": ids})  # noqa: E731
    flat, unravel = jax.flatten_util.ravel_pytree(model_params)
    g = jax.grad(lambda x: f(unravel(x)))
    n = flat.size
    exact = np.asarray(jax.jit(jax.vmap(lambda i: jax.jvp(g, (flat,), (jnp.zeros(n).at[i].set(1.0),))[1][i]))(
        jnp.arange(n)))
    steps, out = {}, {}
    for target in (1, 4, 16, 64, 256, 1024):
        c = min(target, 64)
        if c not in steps:
            steps[c] = jax.jit(lambda k, c=c: scores.hvp_diag_chunk(lambda x: f(unravel(x)), flat, k, c, jnp.ones(c)))
        est = sum(np.asarray(steps[c](jax.random.key(1000 * target + j))) for j in range(target // c)) / target
        out[str(target)] = round(float(np.linalg.norm(est - exact) / np.linalg.norm(exact)), 4)
    return {"n_params": int(n), "relative_l2_error_by_probes": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="stories260k")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--probe_chunk", type=int, default=4)
    args = ap.parse_args()
    res = {"checkpoint": args.checkpoint, "windows": args.windows, "seq_len": args.seq_len,
           "metrics": per_metric(args), "hutchinson_cost": hutchinson_cost(args),
           "hutchinson_error": hutchinson_error(), "per_window_scores": per_window_scores()}
    worst = max(v["per_probe_over_gradient"] for k, v in res["hutchinson_cost"].items() if k.startswith("chunk_"))
    res["hutchinson_target_met"] = bool(min(v["per_probe_over_gradient"] for k, v in res["hutchinson_cost"].items()
                                            if k.startswith("chunk_")) <= 2.0)
    res["hutchinson_worst_ratio"] = worst
    print(json.dumps(res))


if __name__ == "__main__":
    main()
