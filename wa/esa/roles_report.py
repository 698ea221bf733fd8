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
from wa.esa import attack, perturb, pipeline, roles, select  # noqa: E402
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
    # Knowledge localisation: the score's top-k zeroed against same-size random-k, loss by target category.
    base = roles.per_token_nll(loaded, loaded.params, data.eval_ids, data.eval_mask, cfg.batch_size)
    seed = s.plan.seeds[0]
    tree = rules_lib.unflattener(loaded.params)
    local = {}
    for m in metrics:
        sets = {"topk": sel.top[m, seed]}
        sets.update({f"random_k/{r}": select.random_k(s.flat, cfg.topk, cfg.mode, cfg.param_filter,
                                                      seed * 1000 + 900 + r) for r in range(cfg.roles_random)})
        out = {}
        for name, chosen in sets.items():
            knocked = tree(perturb.apply(s.flat, chosen, "zero"))
            out[name] = roles.category_losses(base, roles.per_token_nll(loaded, knocked, data.eval_ids, data.eval_mask,
                                                                          cfg.batch_size), cats)
        rand = [v for k, v in out.items() if k.startswith("random_k/")]
        local[m] = {"topk": out["topk"], "random_k": {c: float(np.mean([r[c]["dnll"] for r in rand]))
                                                      if out["topk"][c]["tokens"] else float("nan")
                                                      for c in roles.CATEGORIES}}
    counts = {c: int(np.sum(cats[:, 1:] == i)) for i, c in enumerate(roles.CATEGORIES)}
    return {"heads": {f"{layer}/{i}": {"class": c, **figs} for (layer, i), (c, figs) in heads.items()},
            "top": top, "localisation": local, "target_categories": counts, "metrics": metrics,
            "roles_top": cfg.roles_top, "topk": cfg.topk, "mode": cfg.mode,
            "eval_tokens": int(np.sum(data.eval_mask[:, 1:]))}


def _plot(res: dict, path: str) -> None:
    cats = [c for c in roles.CATEGORIES if res["target_categories"][c]]
    ms = res["metrics"]
    fig, axes = plt.subplots(1, len(ms), figsize=(3.4 * len(ms), 3.0), squeeze=False)
    for ax, m in zip(axes[0], ms, strict=True):
        loc = res["localisation"][m]
        x = np.arange(len(cats))
        ax.bar(x - 0.2, [loc["topk"][c]["dnll"] for c in cats], 0.4, color="tab:red", label="top-k zeroed")
        ax.bar(x + 0.2, [loc["random_k"][c] for c in cats], 0.4, color="tab:gray", label="random-k zeroed")
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
                rows.append({"score": m, "category": c, "tokens": res["target_categories"][c],
                             "top-k Δ nats": f"{loc['topk'][c]['dnll']:.4f}",
                             "random-k Δ nats": f"{loc['random_k'][c]:.4f}"})
    md += [report.markdown_table(rows), ""]
    report.write_text(os.path.join(workdir, "roles.md"), "\n".join(md))
    return ["roles.json", "roles.md", "localisation.png"]


def check(cfg) -> None:
    for name in ("roles_top", "roles_units", "roles_random"):
        if int(cfg.get(name, 0)) < 1:
            raise pipeline.ConfigError(f"--config.{name}={cfg.get(name)}: expected a positive integer")
