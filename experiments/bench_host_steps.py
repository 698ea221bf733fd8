r"""The ESA steps that read every score of a model at once, where they run and what they cost: prints one JSON line.

  python experiments/bench_host_steps.py                       # SmolLM2-135M's matrices (106M scores)
  python experiments/bench_host_steps.py --shapes=llama32_1b   # Llama-3.2-1B's (1.2B scores, ~10 GiB of host RAM)

Random float32 scores of the model's weight-matrix shapes stand in for one metric's scores (the steps' cost depends
on the count, not on the values). Timed after a warm-up call (compilation excluded), each step once:

- ``host_copy``: bringing every score to host NumPy (what a host-side step must do first);
- ``global_topk_device`` (``select.top_k(mode="global")`` as wa runs it on an accelerator: the threshold found on
  device, only the winners copied) against ``global_topk_host`` (as on CPU: every score read on the host, one
  partition of their concatenation, masks); the picks are checked equal;
- ``per_layer_topk`` (``jax.lax.top_k`` per matrix on device, winners copied);
- ``heavy_tail_host`` (``select.heavy_tail`` on CPU: one host copy sorted) against ``heavy_tail_device`` (as on an
  accelerator: two passes of radix histograms where the scores live, 16 MB to the host whatever the model; the
  figures checked equal, the Gini coefficient within its stated bound);
- ``prune_masks_host`` (``saliency.masks`` on CPU: the model-wide 50% threshold by a host partition, flat masks)
  against ``prune_masks_device`` (``saliency.device_masks``: the threshold by bisection where the saliencies live,
  masks kept there); the masks checked equal.

Per step: seconds, seconds per billion scores, and the bytes it copies to the host. The device variants are slower
than the host ones on CPU (32 counting passes against one partition), where wa keeps the host path; on an
accelerator each pass reads the scores at memory bandwidth. ``at_8b`` scales each to Llama-3.1-8B's 7.50B matrix
weights linearly (every step is linear or n log n in the count: an estimate, not a measurement; the copy of one
metric's scores is 30 GB whatever the machine; the histogram steps' host bytes stay as they are).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wa.esa import saliency, select  # noqa: E402

SHAPES = {
    # hidden, intermediate, layers, q heads, kv heads, head dim, vocab, tied embeddings
    "tiny": (64, 128, 2, 4, 2, 16, 256, False),
    "smollm2_135m": (576, 1536, 30, 9, 3, 64, 49152, True),
    "llama32_1b": (2048, 8192, 16, 32, 8, 64, 128256, True),
    "llama31_8b": (4096, 14336, 32, 32, 8, 128, 128256, False),
}


def kernels(name: str) -> dict[str, tuple[int, int]]:
    h, f, n, q, kv, d, vocab, tied = SHAPES[name]
    out = {}
    for i in range(n):
        a, m = f"model/layers/{i}/self_attn/", f"model/layers/{i}/mlp/"
        out.update({a + "q_proj/kernel": (h, q * d), a + "k_proj/kernel": (h, kv * d), a + "v_proj/kernel": (h, kv * d),
                    a + "o_proj/kernel": (q * d, h), m + "gate_proj/kernel": (h, f), m + "up_proj/kernel": (h, f),
                    m + "down_proj/kernel": (f, h)})
    if not tied:
        out["lm_head/kernel"] = (h, vocab)
    return out


def _timed(fn):
    fn()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(shapes_name: str, topk: float = 0.002, host: bool = True) -> dict:
    """Every step's seconds and host bytes on random scores of ``shapes_name``'s matrices; ``host=False`` times the
    device paths alone (a GPU's run at 8B shapes, where the host paths would need 30 GB of host RAM each)."""
    shapes = kernels(shapes_name)
    key = jax.random.key(0)
    scores = {}
    for i, (p, s) in enumerate(shapes.items()):
        scores[p] = jnp.abs(jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32))
    jax.block_until_ready(scores)
    n = sum(int(np.prod(s)) for s in shapes.values())
    k = select.resolve_k(topk, n)
    out = {"shapes": shapes_name, "scores": n, "topk": k, "backend": jax.default_backend(), "steps": {}}

    fixed = set()   # steps whose host bytes do not grow with the model (histograms, per-matrix counts)

    def record(name, seconds, copied_bytes, scales=True):
        out["steps"][name] = {"seconds": round(seconds, 3), "s_per_billion": round(seconds / n * 1e9, 2),
                              "host_bytes": int(copied_bytes)}
        if not scales:
            fixed.add(name)

    dev, t = _timed(lambda: select.top_k(scores, k, mode="global", on_device=True)[0])
    record("global_topk_device", t, 16 * k)
    _, t = _timed(lambda: select.top_k(scores, topk, mode="per_layer"))
    record("per_layer_topk", t, 16 * k)
    ht_dev, t = _timed(lambda: select.heavy_tail(scores, select.DEFAULT_FILTER, on_device=True))
    record("heavy_tail_device", t, 4 * 4 * (1 << 20) + 8 * 4 * (1 << 12), scales=False)
    out["gini_error_bound"] = ht_dev["gini_error"]
    dev_m, t = _timed(lambda: jax.block_until_ready(dict(saliency.device_masks(scores, 0.5, "global"))))
    record("prune_masks_device", t, 4 * 3 * len(scores), scales=False)
    if host:
        _, t = _timed(lambda: {p: np.asarray(v) for p, v in scores.items()})
        record("host_copy", t, 4 * n)
        ref, t = _timed(lambda: select.top_k(scores, k, mode="global", on_device=False)[0])
        record("global_topk_host", t, 4 * n)
        out["global_topk_equal"] = ({p: v.tolist() for p, v in dev.items()} ==
                                    {p: v.tolist() for p, v in ref.items()})
        ht_host, t = _timed(lambda: select.heavy_tail(scores, select.DEFAULT_FILTER, on_device=False))
        record("heavy_tail_host", t, 4 * n)
        out["heavy_tail_equal"] = (all(np.isclose(ht_host[f], ht_dev[f], rtol=1e-6) for f in
                                       ("median", "max", "top01pct_share", "top1pct_mean_over_median"))
                                   and abs(ht_host["gini"] - ht_dev["gini"]) <= ht_dev["gini_error"])
        host_m, t = _timed(lambda: dict(saliency.masks(scores, 0.5, "global")))
        record("prune_masks_host", t, 4 * n)
        out["prune_masks_equal"] = all((np.asarray(dev_m[p]).ravel() == host_m[p]).all() for p in scores)
    n8b = sum(int(np.prod(s)) for s in kernels("llama31_8b").values())
    out["at_8b"] = {"scores": n8b, **{name: {"seconds_estimate": round(v["s_per_billion"] * n8b / 1e9, 1),
                                             "host_gb": round(v["host_bytes"] / (1 if name in fixed else n / n8b) / 1e9,
                                                              3)}
                                      for name, v in out["steps"].items()}}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2_135m", choices=sorted(SHAPES))
    ap.add_argument("--topk", type=float, default=0.002)
    ap.add_argument("--device_only", action="store_true", help="time the device paths alone")
    args = ap.parse_args()
    print(json.dumps(measure(args.shapes, args.topk, host=not args.device_only)))


if __name__ == "__main__":
    main()
