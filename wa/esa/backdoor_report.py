"""The backdoor population run (``launch.backdoor``): backdoored models and their clean twins fine-tuned from one
pretrained LM, each measured; ESA on clean against triggered text; every detector's AUROC; the report."""

from __future__ import annotations

import collections
import os
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from wa import report  # noqa: E402
from wa.data import paths, text, tokenizers  # noqa: E402
from wa.esa import backdoor, evaluate, scores, select  # noqa: E402
from wa.parallel import rules as rules_lib  # noqa: E402
from wa.train import finetune  # noqa: E402


def check(cfg) -> None:
    if not 1 <= int(cfg.population) <= len(backdoor.TRIGGERS):
        raise backdoor.BackdoorError(f"--config.population={cfg.population}: expected 1 to {len(backdoor.TRIGGERS)} "
                                     "(one trigger phrase each)")
    if not 0 < float(cfg.poison_fraction) < 1:
        raise backdoor.BackdoorError(f"--config.poison_fraction={cfg.poison_fraction}: expected a fraction in (0, 1)")


def run(cfg, progress: bool = True) -> dict:
    from wa import models
    check(cfg)
    ckpt = paths.checkpoint(cfg.model)
    loaded = models.load(ckpt)
    tok = tokenizers.get(ckpt)
    docs = text.documents(text.read(cfg.corpus), cfg.doc_split)
    n_val = max(2, int(round(len(docs) * cfg.val_fraction)))
    train_docs, cal_docs, test_docs = docs[:-n_val], docs[-n_val:-n_val // 2], docs[-n_val // 2:]
    flat0 = rules_lib.flatten(loaded.params)
    kept = select.filter_paths(list(flat0), cfg.param_filter)
    head = next((p for p in kept if loaded.describe(p).component == "head"), None)
    tree = rules_lib.unflattener(loaded.params)
    forward = jax.jit(lambda params, ids: _logits(loaded.forward(params, ids, jnp.ones_like(ids))))
    ev_ids, ev_mask = (w[:cfg.eval_windows] for w in text.lm_windows(text.token_stream(test_docs, tok), cfg.seq_len))
    cal_ids, cal_mask = (w[:cfg.score_windows] for w in text.lm_windows(text.token_stream(cal_docs, tok),
                                                                         cfg.seq_len))

    def score(flat, ids, mask):
        cal = scores.Calibration(loaded, scores.window_batches(loaded, ids, mask, cfg.batch_size), jax.random.key(0),
                                 progress=False)
        s = scores.compute("grad_x_weight", tree(flat), cal)
        return {p: np.asarray(s[p]) for p in kept}

    def topk(sc):
        return select.top_k(sc, cfg.topk, "per_layer", ".")[0]

    base_clean = score(flat0, cal_ids, cal_mask)
    extra0 = {"head": head, "head_input_axis": loaded.family.input_axis(head) if head else 0,
              "base_topk": topk(base_clean)}
    base0 = {p: flat0[p] for p in kept}
    full = {p: np.ones((), np.float32) for p in flat0}
    models_out, t0 = [], time.time()
    for i in range(int(cfg.population)):
        trigger, target = backdoor.TRIGGERS[i], backdoor.TARGETS[i]
        trig = backdoor.triggered_windows(tok, test_docs, trigger, target, cfg.seq_len, cfg.trigger_windows)
        trig_cal = backdoor.triggered_windows(tok, cal_docs, trigger, target, cfg.seq_len, cfg.score_windows)
        for kind in ("backdoored", "clean"):
            t1 = time.time()
            poisoned, n_poisoned = backdoor.poison(train_docs, trigger, target, cfg.poison_fraction, seed=i) \
                if kind == "backdoored" else (train_docs, 0)
            data = finetune.Corpora(text.token_stream(poisoned, tok), (), (), (), ())
            c = cfg.copy_and_resolve_references()
            c.seed = int(cfg.seed) + i
            flat = finetune.train(loaded, flat0, data, c, full)["flat"]
            flat = {p: np.asarray(v) for p, v in flat.items()}
            ppl = evaluate.evaluate(loaded, tree(flat), ev_ids, ev_mask, cfg.batch_size, progress=False)["ppl"]
            hit = backdoor.target_success(lambda x, f=flat: forward(tree(f), jnp.asarray(x)), trig[0], trig[2],
                                          cfg.batch_size)
            clean_sc = score(flat, cal_ids, cal_mask)
            extra = dict(extra0, topk=topk(clean_sc), clean_score=clean_sc)
            update = backdoor.deltas(flat, base0)
            row = {"model": i, "kind": kind, "trigger": trigger, "target": target, "poisoned_documents": n_poisoned,
                   "clean_ppl": ppl, **hit,
                   "detectors": {d.name: d.fn(update, extra) for d in backdoor.DETECTORS.values()}}
            # The clean twin too: the triggered text is odd text to it, so its trigger-only set is the control.
            row["trigger_weights"] = _trigger_weights(loaded, kept, flat, head, tok, target, extra["topk"],
                                                      topk(score(flat, trig_cal[0], trig_cal[1])))
            row["seconds"] = round(time.time() - t1, 1)
            models_out.append(row)
            if progress and jax.process_index() == 0:
                logging.info("model %d %s: success %.3f, clean ppl %.3f (%.0f s)", i, kind, hit["success"], ppl,
                             row["seconds"])
    labels = [int(r["kind"] == "backdoored") for r in models_out]
    aurocs = {d: backdoor.auroc([r["detectors"][d] for r in models_out], labels) for d in backdoor.DETECTORS}
    return {"models": models_out, "auroc": aurocs, "seconds": round(time.time() - t0, 1),
            "base_clean_ppl": evaluate.evaluate(loaded, loaded.params, ev_ids, ev_mask, cfg.batch_size,
                                                progress=False)["ppl"],
            "protocol": {k: cfg[k] for k in ("model", "corpus", "population", "poison_fraction", "steps", "lr",
                                             "batch_size", "seq_len", "topk", "score_windows", "eval_windows",
                                             "trigger_windows")}}


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def _trigger_weights(loaded, kept, flat, head, tok, target, clean_top, trig_top) -> dict:
    """The weights in the triggered top-k but not the clean one: how many, where, how concentrated, and the share
    in the output-matrix columns of the continuation's tokens."""
    only = backdoor.trigger_only(clean_top, trig_top)
    n = sum(len(v) for v in only.values())
    by_matrix = sorted(((len(v), p) for p, v in only.items()), reverse=True)
    where = collections.Counter()
    for p, v in only.items():
        info = loaded.describe(p)
        where[f"{info.component}/{info.role}" + (f" L{info.layer}" if info.layer is not None else "")] += len(v)
    in_target = 0
    if head is not None and head in only and len(only[head]):
        ax = loaded.family.input_axis(head)
        cols = np.unravel_index(only[head], flat[head].shape)[1 - ax]
        in_target = int(np.isin(cols, tok.encode(f" {target}")).sum())
    k = sum(len(v) for v in trig_top.values())
    return {"n": n, "share_of_topk": n / max(k, 1), "top3_matrices_share": sum(c for c, _ in by_matrix[:3]) / max(n, 1),
            "top_matrices": [{"path": p, "n": c} for c, p in by_matrix[:3]], "by_place": dict(where.most_common(6)),
            "in_target_token_columns": in_target}


def write(workdir: str, cfg, res: dict) -> list[str]:
    report.write_json(os.path.join(workdir, "backdoor.json"), res)
    ms = res["models"]
    names = list(res["auroc"])
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    for ax, d in zip(axes[0], names, strict=True):
        for x, kind, color in ((0, "clean", "tab:gray"), (1, "backdoored", "tab:red")):
            v = [r["detectors"][d] for r in ms if r["kind"] == kind]
            ax.scatter(np.full(len(v), x) + np.linspace(-0.1, 0.1, len(v)), v, s=12, color=color)
        ax.set_xticks([0, 1], ["clean", "backdoored"], fontsize=8)
        ax.set_title(f"{d}\nAUROC {res['auroc'][d]:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "detectors.png"), dpi=110)
    plt.close(fig)
    bd = [r for r in ms if r["kind"] == "backdoored"]
    cl = [r for r in ms if r["kind"] == "clean"]
    mean = lambda rows, k: float(np.mean([r[k] for r in rows])) if rows else float("nan")  # noqa: E731
    md = [f"# Backdoor detection on {cfg.model}", "",
          f"{len(bd)} backdoored models and {len(cl)} clean twins, each fine-tuned from {cfg.model} for {cfg.steps} "
          f"steps ({cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr}) on `{cfg.corpus}`; the backdoored ones with "
          f"a trigger phrase and a fixed continuation inserted into {cfg.poison_fraction:.0%} of the documents. "
          f"{res['seconds'] / 60:.1f} min.", "",
          f"- Attack success (continuation tokens predicted after the trigger, {cfg.trigger_windows} held-out "
          f"windows): backdoored {mean(bd, 'success'):.3f}, clean twins {mean(cl, 'success'):.3f}; windows whose whole "
          f"continuation is predicted: backdoored {mean(bd, 'whole'):.3f}, clean twins {mean(cl, 'whole'):.3f}.",
          f"- Clean perplexity: pretrained {res['base_clean_ppl']:.3f}, backdoored {mean(bd, 'clean_ppl'):.3f}, "
          f"clean twins {mean(cl, 'clean_ppl'):.3f}.", "", "## Detectors", "",
          report.markdown_table([{"detector": d, "reads": backdoor.DETECTORS[d].reads,
                                  "AUROC": f"{a:.3f}", "what": backdoor.DETECTORS[d].doc}
                                 for d, a in res["auroc"].items()]), "",
          "![detector scores](detectors.png)", "", "## Weights that matter for the trigger only", "",
          f"grad×weight on {cfg.score_windows} calibration windows, clean and with the trigger and continuation "
          f"inserted; top-k {cfg.topk} per matrix; trigger-only: in the triggered top-k, not the clean one. The "
          "clean twins' rows are the control: to them the triggered windows are only odd text.", ""]
    md += [report.markdown_table([{"model": r["model"], "kind": r["kind"], "trigger": r["trigger"],
                                   "trigger-only weights": r["trigger_weights"]["n"],
                                   "share of top-k": f"{r['trigger_weights']['share_of_topk']:.3f}",
                                   "in 3 matrices": f"{r['trigger_weights']['top3_matrices_share']:.2f}",
                                   "where (most)": ", ".join(f"{k} {v}" for k, v in
                                                             list(r["trigger_weights"]["by_place"].items())[:3]),
                                   "in continuation tokens' columns": r["trigger_weights"]["in_target_token_columns"]}
                                  for r in ms]), "", "## Every model", ""]
    md += [report.markdown_table([{"model": r["model"], "kind": r["kind"], "trigger": r["trigger"],
                                   "success": f"{r['success']:.3f}", "whole": f"{r['whole']:.2f}",
                                   "target nll": f"{r['target_nll']:.3f}",
                                   "clean ppl": f"{r['clean_ppl']:.3f}",
                                   **{d: report.number(v, 4) for d, v in r["detectors"].items()}} for r in ms]), ""]
    report.write_text(os.path.join(workdir, "backdoor.md"), "\n".join(md))
    return ["backdoor.json", "backdoor.md", "detectors.png"]
