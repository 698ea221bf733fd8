"""The roles run (``launch.roles``): for each ESA score's top critical weights, the unit each belongs to and that
unit's role on held-out text; every head's attention pattern; knowledge localisation by token category; the
readable report and its plots."""

from __future__ import annotations

import collections
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wa import report  # noqa: E402
from wa.data import paths, tokenizers  # noqa: E402
from wa.esa import attack, perturb, pipeline, roles, scores, select, superweights  # noqa: E402
from wa.parallel import rules as rules_lib  # noqa: E402


def _unit_name(kind, layer, unit) -> str:
    return {"head": f"L{layer} head {unit}", "kv_head": f"L{layer} kv-head {unit}", "neuron": f"L{layer} neuron {unit}",
            "token": f"vocabulary row {unit}"}[kind]


def study(s, sc, sel, progress: bool = True) -> dict:
    cfg, loaded, data = s.cfg, s.loaded, s.data
    piece = data.piece or data.decode
    stats = roles.capture(loaded, loaded.params, data.eval_ids, data.eval_mask, cfg.batch_size)
    cats = roles.categories(data.eval_ids, piece)
    h, kv, _ = roles._heads(loaded.config)
    heads = {(layer, i): roles.head_class(stats, layer, i) for layer in stats["heads"] for i in range(h)}

    def role(kind, layer, unit) -> tuple[str | None, dict]:
        if kind == "head":
            c, figs = heads[layer, unit]
            return (None if c == "unclassified" else c), figs
        if kind == "kv_head":
            served = [heads[layer, q][0] for q in range(unit * (h // kv), (unit + 1) * (h // kv))]
            common = set(served)
            name = served[0] if len(common) == 1 and served[0] != "unclassified" else None
            return name, {"serves": served}
        if kind == "neuron":
            label, rows = roles.neuron_label(stats, layer, unit, data.eval_ids, cats, piece)
            return label, {"top": rows[:5]}
        return f"token {piece(unit)!r}", {}

    metrics = attack.ranking_metrics(s.plan.metrics)
    top: dict = {}
    for m in metrics:
        rows, units = [], {}
        for p, i in attack.score_order(sc.first[m], s.kept, cfg.roles_top):
            u = roles.unit_of(loaded, p, i, s.flat[p].shape)
            if u is None:
                rows.append({"path": p, "index": i, "unit": None, "role": None})
                continue
            if u not in units:
                units[u] = role(*u)
            rows.append({"path": p, "index": i, "unit": _unit_name(*u), "kind": u[0], "role": units[u][0]})
        named = [r for r in rows if r["role"]]
        not_token = [r for r in rows if r.get("kind") != "token"]
        top[m] = {"weights": rows, "share_named": len(named) / max(len(rows), 1),
                  "share_named_without_token_rows": sum(bool(r["role"]) for r in not_token) / max(len(not_token), 1),
                  "by_kind": dict(collections.Counter(r.get("kind") or "other" for r in rows)),
                  "by_role": dict(collections.Counter("vocabulary row" if r.get("kind") == "token" else
                                                      (r["role"] or "unnamed").split(":")[0] for r in rows)),
                  "units": {_unit_name(*u): {"role": v[0], **{k: x for k, x in v[1].items()}} for u, v in
                            sorted(units.items(), key=lambda t: -sum(r["unit"] == _unit_name(*t[0]) for r in rows))
                            [:cfg.roles_units]}}
    # Knowledge localisation: the score's top-k zeroed against same-size random-k, loss by target category. On a
    # model with massive activations every score's top-k holds super weights (Yu et al. 2024), whose loss swamps
    # every category; so the top-k is also zeroed without the super-weight candidates (one per down projection),
    # and the candidates alone.
    supers = _super_candidates(s)
    base = roles.per_token_nll(loaded, loaded.params, data.eval_ids, data.eval_mask, cfg.batch_size)
    facts, fwin = None, None
    if cfg.get("roles_facts", False):
        tok = tokenizers.get(paths.checkpoint(cfg.model))
        fwin = roles.fact_windows(tok, cfg.get("bos", True) or cfg.get("window_bos", False))
        facts = {"prompts": [list(f) for f in roles.FACTS], "base": roles.fact_scores(loaded, loaded.params, *fwin,
                                                                                        cfg.batch_size)}
    seed = s.plan.seeds[0]
    tree = rules_lib.unflattener(loaded.params)

    def knock(chosen) -> tuple[dict, dict | None]:
        knocked = tree(perturb.apply(s.flat, chosen, "zero"))
        loss = roles.category_losses(base, roles.per_token_nll(loaded, knocked, data.eval_ids, data.eval_mask,
                                                                cfg.batch_size), cats)
        return loss, (roles.fact_scores(loaded, knocked, *fwin, cfg.batch_size) if facts else None)

    local = {}
    for m in metrics:
        top_k = sel.top[m, seed]
        sets = {"topk": top_k}
        if supers:
            sets["topk_without_super"] = {p: np.setdiff1d(v, supers.get(p, [])) for p, v in top_k.items()}
        sets.update({f"random_k/{r}": select.random_k(s.flat, cfg.topk, cfg.mode, cfg.param_filter,
                                                      seed * 1000 + 900 + r) for r in range(cfg.roles_random)})
        out, fact_out = {}, {}
        for name, chosen in sets.items():
            out[name], fact_out[name] = knock(chosen)
        rand = [v for k, v in out.items() if k.startswith("random_k/")]
        local[m] = {"topk": out["topk"], "random_k": {c: float(np.mean([r[c]["dnll"] for r in rand]))
                                                      if out["topk"][c]["tokens"] else float("nan")
                                                      for c in roles.CATEGORIES},
                    "super_in_topk": int(sum(len(np.intersect1d(v, supers.get(p, []))) for p, v in top_k.items()))}
        if supers:
            local[m]["topk_without_super"] = out["topk_without_super"]
        if facts:
            facts[m] = {"topk": fact_out["topk"], "topk_without_super": fact_out.get("topk_without_super"),
                        "random_k": {k: float(np.mean([v[k] for n, v in fact_out.items() if n.startswith("random_k/")]))
                                     for k in ("answer_nll", "first_token_top1")}}
    super_alone = None
    if supers:
        loss, fs = knock({p: np.asarray(v) for p, v in supers.items()})
        super_alone = {"candidates": int(sum(len(v) for v in supers.values())), "loss": loss, "facts": fs}
    counts = {c: int(np.sum(cats[:, 1:] == i)) for i, c in enumerate(roles.CATEGORIES)}
    return {"heads": {f"{layer}/{i}": {"class": c, **figs} for (layer, i), (c, figs) in heads.items()},
            "top": top, "localisation": local, "target_categories": counts, "metrics": metrics,
            "super_weights": super_alone, "facts": facts,
            "roles_top": cfg.roles_top, "topk": cfg.topk, "mode": cfg.mode,
            "eval_tokens": int(np.sum(data.eval_mask[:, 1:]))}


def _super_candidates(s) -> dict:
    """{path: flat indices} of the super-weight candidates of the model's down projections, found on the first
    calibration windows (as the ESA run's super-weight study finds them); {} where the model has none."""
    downs = superweights.down_paths(s.loaded, s.kept)
    if not downs:
        return {}
    n = max(1, min(s.cfg.max_samples, len(s.data.cal_ids)))
    batches = scores.window_batches(s.loaded, s.data.cal_ids[:n], s.data.cal_mask[:n], s.cfg.batch_size)
    out: dict = {}
    for c in superweights.candidates(s.loaded, s.flat, superweights.spikes(s.loaded, s.loaded.params, batches, downs)):
        out.setdefault(c["path"], []).append(c["flat_index"])
    return {p: np.asarray(v, np.int64) for p, v in out.items()}


def _plot(res: dict, path: str) -> None:
    cats = [c for c in roles.CATEGORIES if res["target_categories"][c]]
    ms = res["metrics"]
    fig, axes = plt.subplots(1, len(ms), figsize=(3.4 * len(ms), 3.0), squeeze=False)
    for ax, m in zip(axes[0], ms, strict=True):
        loc = res["localisation"][m]
        x = np.arange(len(cats))
        bars = [([loc["topk"][c]["dnll"] for c in cats], "tab:red", "top-k zeroed")]
        if "topk_without_super" in loc:
            bars.append(([loc["topk_without_super"][c]["dnll"] for c in cats], "tab:orange",
                         "top-k but super-weight candidates"))
        bars.append(([loc["random_k"][c] for c in cats], "tab:gray", "random-k zeroed"))
        w = 0.8 / len(bars)
        for j, (vals, color, label) in enumerate(bars):
            ax.bar(x + (j - (len(bars) - 1) / 2) * w, vals, w, color=color, label=label)
        if "topk_without_super" in loc:
            ax.set_yscale("symlog", linthresh=0.1)   # the super weights' loss is orders above the rest
        ax.set_xticks(x, cats, rotation=35, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.set_ylabel("Δ loss (nats/token)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(workdir: str, cfg, res: dict, seconds: float) -> list[str]:
    res = dict(res, seconds=round(seconds, 1))
    report.write_json(os.path.join(workdir, "roles.json"), res)
    _plot(res, os.path.join(workdir, "localisation.png"))
    classes = collections.Counter(v["class"] for v in res["heads"].values())
    md = [f"# Computational roles of critical weights: {cfg.model}", "",
          f"For each score's {res['roles_top']} highest-scoring weights (over the matrices it ranks), the unit each "
          f"belongs to and what that unit does on {res['eval_tokens']:,} held-out tokens. {seconds / 60:.1f} min.", "",
          "## Share with a named role", "",
          report.markdown_table([{"score": m, "named": f"{t['share_named']:.0%}",
                                  "named, vocabulary rows left out": f"{t['share_named_without_token_rows']:.0%}",
                                  "units": ", ".join(f"{k} {v}" for k, v in t["by_kind"].items()),
                                  "roles": ", ".join(f"{k} {v}" for k, v in t["by_role"].items())}
                                 for m, t in res["top"].items()]), "",
          "A head is named by its attention pattern (the first that holds: "
          + "; ".join(f"{n} if its {k} statistic >= {t}" for n, k, t in roles.HEAD_CLASSES)
          + "); a key/value head by the pattern all the query heads it serves share; a neuron when at least "
          f"{roles.TOKEN_SHARE:.0%} of its top {roles.NEURON_TOP} activations sit on one token, or "
          f"{roles.CATEGORY_SHARE:.0%} on one token category at >= {roles.ENRICHMENT:g}x that category's share of "
          "the text; a vocabulary row (the output matrix's column for a token) by its token. Unnamed: the evidence "
          "does not single out a role.", "",
          "## Every head's pattern", "", ", ".join(f"{k}: {v}" for k, v in classes.most_common()), ""]
    md += [report.markdown_table([{"head": k, "class": v["class"], **{x: f"{v[x]:.2f}" for x in
                                  ("prev", "first", "self", "induction", "local", "entropy")}}
                                 for k, v in res["heads"].items()]), ""]
    md += ["## The units that hold the most top weights", ""]
    for m, t in res["top"].items():
        md += [f"**{m}**", ""]
        for name, u in t["units"].items():
            extra = ""
            if "top" in u:
                extra = "; top activations: " + ", ".join(repr(r["context"][-40:]) for r in u["top"][:3])
            elif "serves" in u:
                extra = f"; serves heads of classes {u['serves']}"
            md.append(f"- {name}: {u['role'] or 'unnamed'}{extra}")
        md.append("")
    md += ["## Knowledge localisation", "",
           f"Loss increase per category of the predicted token when each score's top-k ({cfg.topk} per "
           f"{'matrix' if cfg.mode == 'per_layer' else 'model'}) is zeroed, against same-size random-k (mean of "
           f"{cfg.roles_random}).", "", "![loss by token category](localisation.png)", ""]
    rows = []
    for m, loc in res["localisation"].items():
        for c in roles.CATEGORIES:
            if res["target_categories"][c]:
                row = {"score": m, "category": c, "tokens": res["target_categories"][c],
                       "top-k Δ nats": f"{loc['topk'][c]['dnll']:.4f}"}
                if "topk_without_super" in loc:
                    row["top-k without super-weight candidates Δ nats"] = f"{loc['topk_without_super'][c]['dnll']:.4f}"
                row["random-k Δ nats"] = f"{loc['random_k'][c]:.4f}"
                rows.append(row)
    md += [report.markdown_table(rows), ""]
    sw = res.get("super_weights")
    if sw:
        md += [f"Super-weight candidates (Yu et al. 2024; one per down projection, the weight at its largest output "
               f"spike's channel and the spiking input's channel, found on the calibration windows): "
               f"{sw['candidates']}; in each score's top-k: "
               + ", ".join(f"{m} {loc['super_in_topk']}" for m, loc in res["localisation"].items())
               + ". Zeroing the candidates alone: "
               + ", ".join(f"{c} {v['dnll']:+.3f}" for c, v in sw["loss"].items() if v["tokens"]) + " nats.", ""]
    f = res.get("facts")
    if f:
        b = f["base"]
        md += ["## Factual recall", "",
               f"{len(f['prompts'])} short factual prompts (\"The capital of France is\" → \" Paris\", ...): the "
               "answer's mean loss per token, and the share of prompts whose first answer token is the model's top "
               "prediction.", ""]
        frows = [{"weights zeroed": "none", "answer loss (nats)": f"{b['answer_nll']:.3f}",
                  "first token top-1": f"{b['first_token_top1']:.0%}"}]
        for m in res["metrics"]:
            for name, label in (("topk", "top-k"), ("topk_without_super", "top-k without super-weight candidates")):
                if f[m].get(name):
                    frows.append({"weights zeroed": f"{m} {label}",
                                  "answer loss (nats)": f"{f[m][name]['answer_nll']:.3f}",
                                  "first token top-1": f"{f[m][name]['first_token_top1']:.0%}"})
            frows.append({"weights zeroed": f"{m} random-k (mean)",
                          "answer loss (nats)": f"{f[m]['random_k']['answer_nll']:.3f}",
                          "first token top-1": f"{f[m]['random_k']['first_token_top1']:.0%}"})
        if sw and sw.get("facts"):
            frows.append({"weights zeroed": "super-weight candidates alone",
                          "answer loss (nats)": f"{sw['facts']['answer_nll']:.3f}",
                          "first token top-1": f"{sw['facts']['first_token_top1']:.0%}"})
        md += [report.markdown_table(frows), ""]
    report.write_text(os.path.join(workdir, "roles.md"), "\n".join(md))
    return ["roles.json", "roles.md", "localisation.png"]


def check(cfg) -> None:
    for name in ("roles_top", "roles_units", "roles_random"):
        if int(cfg.get(name, 0)) < 1:
            raise pipeline.ConfigError(f"--config.{name}={cfg.get(name)}: expected a positive integer")
