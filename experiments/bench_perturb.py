r"""Perturbation evaluations, one at a time vs several per compiled call: prints one JSON line.

  python experiments/bench_perturb.py [--checkpoint stories260k] [--sets 32] [--group 8] [--windows 32]

Builds ``--sets`` random-k sign flips (top 0.2% per matrix, as ESA's null) and measures held-out perplexity
for each, (a) one set at a time (``wa.esa.evaluate.evaluate`` on each perturbed tree: what ESA did) and
(b) ``evaluate_many``: one set per compiled call with only the perturbed tensors as arguments (``serial``), and
``--group`` sets per call, one after another inside it (``map``) or vmapped (``vmap``); all after compilation,
in one process. Reports seconds per set for each, the speedups over (a), and the largest difference in loss
from (a).
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="stories260k")
    ap.add_argument("--corpus", default="tinystories")
    ap.add_argument("--sets", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    a = ap.parse_args()

    import jax
    import numpy as np

    from wa import models
    from wa.data import paths, text, tokenizers
    from wa.esa import evaluate, perturb, select
    from wa.parallel import rules as rules_lib

    path = paths.checkpoint(a.checkpoint)
    m = models.load(path)
    tok = tokenizers.get(path)
    ids, mask = text.lm_windows(text.token_stream(text.documents(text.read(a.corpus), "stories")[-200:], tok),
                                a.seq_len)
    ids, mask = ids[:a.windows], mask[:a.windows]
    flat = rules_lib.flatten(m.params)
    kept = select.filter_paths(list(flat), select.DEFAULT_FILTER)
    sels = [select.random_k(flat, 0.002, "per_layer", select.DEFAULT_FILTER, s) for s in range(a.sets)]
    treedef = jax.tree_util.tree_structure(m.params)

    def sets():
        for i, sel in enumerate(sels):
            yield perturb.apply(flat, sel, "sign_flip", 1.0, key=jax.random.key(i))

    def serial(n):
        out = []
        for s in list(sets())[:n]:
            tree = jax.tree_util.tree_unflatten(treedef, list(s.values()))
            out.append(evaluate.evaluate(m, tree, ids, mask, a.batch_size, progress=False)["nll"])
        return out

    def batched(n, how):
        gen = (s for i, s in enumerate(sets()) if i < n)
        return [r["nll"] for r in evaluate.evaluate_many(m, gen, kept, ids, mask, a.batch_size, a.group, how=how)]

    serial(1)
    for how in evaluate.BATCHING:
        batched(a.group, how)  # compile
    t = time.perf_counter()
    one = serial(a.sets)
    out = {"checkpoint": a.checkpoint, "sets": a.sets, "group": a.group, "eval_tokens": int(mask[:, 1:].sum()),
           "seconds_per_set_evaluate": round((time.perf_counter() - t) / a.sets, 4)}
    for how in evaluate.BATCHING:
        t = time.perf_counter()
        many = batched(a.sets, how)
        out[f"seconds_per_set_{how}"] = round((time.perf_counter() - t) / a.sets, 4)
        out[f"speedup_{how}"] = round(out["seconds_per_set_evaluate"] / out[f"seconds_per_set_{how}"], 2)
        out[f"max_abs_nll_difference_{how}"] = float(np.max(np.abs(np.asarray(one) - np.asarray(many))))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
