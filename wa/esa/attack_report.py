"""The bit-flip attack run (``launch.attack``): the search and its controls in each encoding, which weights the
search picks (layer, role, bit, and where they rank under each ESA score), the readable report and its plots."""

from __future__ import annotations

import collections
import os
import time

import jax
import numpy as np
from absl import logging

from wa import report
from wa.esa import attack, pipeline
from wa.report import plots

# Orders of the no-search controls beside the ESA scores: ``random`` (uniform over the attacked weights).
PAPER = ("Rakin, He & Fan 2019 (progressive bit search): 13 flips of 93 million take an 8-bit ResNet-18 on "
         "ImageNet to 0.1% top-1, where 100 random flips cost under 1%; Das et al. 2024 (AttentionBreaker): 3 "
         "flips take an 8-bit LLaMA-3-8B-Instruct to 0% on MMLU")


def attacked_paths(s) -> list[str]:
    """The matrices ESA scores (``param_filter``): what a quantized deployment stores as integers."""
    return [p for p in s.kept if len(s.flat[p].shape) >= 2]


def _unit_role(loaded, path: str, index: int, shape) -> str:
    """The role of the output unit a weight feeds, for fused matrices (q/k/v, gate/up); else the matrix's."""
    info = loaded.describe(path)
    parts = loaded.family.parts(path, tuple(shape), loaded.config)
    if parts is None:
        return info.role
    axis, labels = parts
    return str(labels[np.unravel_index(index, shape)[axis]])


def _where(s, sc, sel, paths, flip: dict, metrics) -> dict:
    """Where one flipped weight sits and ranks: layer, component, role, and per ESA score its percentile over the
    attacked weights and whether the score's top-k holds it."""
    p, i = flip["path"], flip["index"]
    shape = tuple(s.flat[p].shape)
    info = s.loaded.describe(p)
    seed = s.plan.seeds[0]
    out = {"layer": info.layer, "component": info.component, "role": _unit_role(s.loaded, p, i, shape),
           "coords": [int(c) for c in np.unravel_index(i, shape)], "percentile": {}, "in_topk": {}}
    for m in metrics:
        out["percentile"][m] = attack.percentile(sc.first[m], paths, p, i)
        top = sel.top.get((m, seed), {})
        out["in_topk"][m] = bool(p in top and i in set(np.asarray(top[p]).tolist()))
    return out


def study(s, sc, sel, progress: bool = True) -> dict:
    """The search in each encoding, then its controls: each ESA score's ranking and random orders."""
    cfg = s.cfg
    encodings = attack.check(pipeline.as_list(cfg.attack_encodings, str, "attack_encodings"), cfg.attack_threshold,
                             cfg.attack_max_flips, cfg.attack_candidates, cfg.attack_exact)
    paths = attacked_paths(s)
    metrics = attack.ranking_metrics(s.plan.metrics)
    seed = s.plan.seeds[0]
    batches = pipeline.calibration_batches(s.loaded, s.data, cfg, s.windows[seed][:cfg.attack_windows])
    model = attack.lm_model(s.loaded, batches, s.data.eval_ids, s.data.eval_mask, cfg.batch_size)
    sizes = {p: int(np.prod(s.flat[p].shape)) for p in paths}
    axis = {p: attack.group_axis(s.loaded.describe, s.loaded.family.input_axis, p, len(s.flat[p].shape))
            for p in paths}
    cap = int(cfg.attack_control_max)
    orders = {m: attack.score_order(sc.first[m], paths, cap) for m in metrics}
    orders.update({f"random/{r}": attack.random_order(sizes, cap, seed * 1000 + 700 + r)
                   for r in range(cfg.attack_random_draws)})
    out: dict = {}
    for enc in encodings:
        t0 = time.time()
        stored = attack.store(s.flat, paths, enc, axis.get)

        def tick(n, ppl, enc=enc):
            if progress and jax.process_index() == 0:
                logging.info("%s: flip %d, perplexity %.4g", enc, n, ppl)
        res = attack.search(model, stored.copy(), cfg.attack_threshold, cfg.attack_max_flips,
                            cfg.attack_candidates, cfg.attack_exact, tick)
        for f in res["flips"]:
            f.update(_where(s, sc, sel, paths, f, metrics))
        t_search = time.time() - t0
        controls = {}
        for name, order in orders.items():
            controls[name] = attack.ordered_flips(model, stored, order, cfg.attack_threshold, res["ppl_base"])
            controls[name]["ppl"] = {str(k): v for k, v in controls[name]["ppl"].items()}
        out[enc] = {"search": res, "controls": controls, "seconds": {"search": round(t_search, 1),
                                                                     "controls": round(time.time() - t0 - t_search, 1)}}
        logging.info("%s: search %s flips, controls %s", enc, res["n_flips"],
                     {k: v["n_flips"] for k, v in controls.items()})
    return {"encodings": out, "attacked_weights": int(sum(sizes.values())), "attacked_matrices": len(paths),
            "metrics": metrics, "topk": cfg.topk, "mode": cfg.mode}


def _n(x, cap) -> str:
    return f"> {cap:,}" if x is None else f"{x:,}"


def summary_rows(res: dict, cap: int, max_flips: int) -> list[dict]:
    rows = []
    for enc, r in res["encodings"].items():
        rand = [v["n_flips"] for k, v in r["controls"].items() if k.startswith("random/")]
        row = {"encoding": enc, "stored ppl": report.number(r["search"]["ppl_base"], 4),
               "search": _n(r["search"]["n_flips"], max_flips)}
        for m in res["metrics"]:
            row[f"{m} order"] = _n(r["controls"][m]["n_flips"], cap)
        row["random (each draw)"] = ", ".join(_n(x, cap) for x in rand)
        rows.append(row)
    return rows


def picks(res: dict) -> dict:
    """What the search flipped, counted: by layer, role and bit field; the share in each score's top-k."""
    out = {}
    for enc, r in res["encodings"].items():
        flips = r["search"]["flips"]
        out[enc] = {
            "by_layer": dict(collections.Counter(str(f["layer"]) for f in flips)),
            "by_role": dict(collections.Counter(f"{f['component']}/{f['role']}" for f in flips)),
            "by_field": dict(collections.Counter(f["field"] for f in flips)),
            "in_topk_share": {m: float(np.mean([f["in_topk"][m] for f in flips])) if flips else float("nan")
                              for m in res["metrics"]},
            "median_percentile": {m: float(np.median([f["percentile"][m] for f in flips])) if flips
                                  else float("nan") for m in res["metrics"]}}
    return out


def write(workdir: str, cfg, res: dict, base: dict, seconds: float) -> list[str]:
    """attack.json, attack.md and the plots; returns the files written."""
    res = dict(res, picks=picks(res), seconds=round(seconds, 1), ppl_float_model=base["ppl"],
               eval_tokens=base["tokens"], threshold=cfg.attack_threshold)
    report.write_json(os.path.join(workdir, "attack.json"), res)
    # Per encoding: the search, one score's order (the second listed, grad×weight by default) and one random draw.
    shown = res["metrics"][min(1, len(res["metrics"]) - 1)]
    panels = {}
    for enc, r in res["encodings"].items():
        f = r["search"]["flips"]
        series = {"search": ([i + 1 for i in range(len(f))], [min(x["ppl"], 1e12) for x in f])}
        for name in (shown, "random/0"):
            if name in r["controls"]:
                pts = sorted((int(k), min(v, 1e12)) for k, v in r["controls"][name]["ppl"].items())
                series[f"{name.split('/')[0]} order"] = ([k for k, _ in pts], [v for _, v in pts])
        panels[enc] = ("held-out perplexity", series)
    plots.curve_panels(panels, "bits flipped", os.path.join(workdir, "attack.png"),
                       cols=len(res["encodings"]), marker="o", logx=True, logy=True)
    md = [f"# Bit-flip attack on {cfg.model}", "",
          f"Progressive bit search against flips without search, until the held-out perplexity passes "
          f"{cfg.attack_threshold:g}x the stored model's own ({res['eval_tokens']:,} held-out tokens; the attacker's "
          f"text: {cfg.attack_windows} calibration windows of {cfg.seq_len} tokens). {res['attacked_matrices']} "
          f"matrices, {res['attacked_weights']:,} weights attacked. {seconds / 60:.1f} min.", "",
          report.markdown_table(summary_rows(res, cfg.attack_control_max, cfg.attack_max_flips)), "",
          "Search: flips made (\"> N\": the budget ran out). Orders: the same bit (int8: the sign bit; floats: the "
          "exponent's top bit) of weights in the order of the score's ranking, or of random weights; the least "
          "count found by doubling then bisecting, which assumes more flips of one list do not help the model.", "",
          "![perplexity against bits flipped](attack.png)", "", "## What the search picks", ""]
    for enc, pk in res["picks"].items():
        md += [f"**{enc}** — layers {pk['by_layer']}; roles {pk['by_role']}; bits {pk['by_field']}; "
               "in the score's top-k: " + ", ".join(f"{m} {v:.0%}" for m, v in pk["in_topk_share"].items())
               + "; median percentile: " + ", ".join(f"{m} {v:.4f}" for m, v in pk["median_percentile"].items()),
               ""]
        rows = [{"#": i + 1, "matrix": f["path"], "coords": tuple(f["coords"]), "role": f["role"],
                 "bit": f["field"], "w before": report.number(f["before"], 4),
                 "w after": report.number(f["after"], 4), "ppl after": report.number(f["ppl"], 4),
                 **{f"{m} pct": f"{f['percentile'][m]:.4f}" for m in res["metrics"]}}
                for i, f in enumerate(res["encodings"][enc]["search"]["flips"])]
        md += [report.markdown_table(rows), ""]
    md += ["Published figures for scale: " + PAPER + ".", ""]
    report.write_text(os.path.join(workdir, "attack.md"), "\n".join(md))
    return ["attack.json", "attack.md", "attack.png"]
