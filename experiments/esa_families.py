r"""Three real families side by side: stories260K (llama2.c Llama, TinyStories), SmolLM2-135M-Instruct (Llama,
instruction-tuned) and Gemma-3-270M (base), each analysed by its own ESA config, compared on what the seed ESA
workflow's architecture analysis asks for, with the statistics behind each claim.

  python experiments/esa_families.py [--workdir runs/esa_families] [--out experiments/results/esa_families]
  python experiments/esa_families.py --runs stories260k=runs/esa,smollm2=runs/esa-smollm2,gemma3=runs/esa-gemma3

Each family's ESA (``configs/esa.py:<variant>``) runs into ``<workdir>/<variant>`` unless that folder (or the one
``--runs`` names) already holds a finished analysis (``summary.json`` and ``DONE.json``): on 2 CPU cores stories260K
takes about a minute, SmolLM2 about 15 and Gemma-3 about 30. Then, from the three ``summary.json`` files alone
(no model is loaded again, except Gemma-3's config for its layer types), it writes ``report.md``,
``comparison.json`` and the plots into ``--out``.

What is compared (the ESA summary field each figure comes from in brackets): sensitivity by component and role
(``architecture``: the model-wide top-k's enrichment and the mean score per weight), attention vs MLP (the ratio,
and a Wilcoxon signed-rank test of attention vs MLP mean score over layers), sliding-window vs global layers
(Gemma-3; Mann-Whitney U over layers), the first and last layers (their rank among layers, and Spearman's ρ of mean
score with depth), norm weights (QK-norm, post-norms) and the embedding (``apart``), the heavy tail, stability
across seeds, sign-flip perturbation against random-k, super-weight candidates and pruning curves. Stories260K is
analysed on TinyStories (the text it was trained on), the other two on WikiText-2 validation text: figures
relative to each model's own base (ΔPPL ratios, perplexity over base, enrichment) are what carries across.
"""

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FAMILIES = {"stories260k": "stories260K (Llama, llama2.c)", "smollm2": "SmolLM2-135M-Instruct (Llama)",
            "gemma3": "Gemma-3-270M (Gemma-3, base)"}
MAIN = "grad_x_weight"                      # the per-window Taylor score: the comparison's main reading
ALPHA = 0.05


def _finished(wd: str) -> bool:
    return os.path.exists(os.path.join(wd, "summary.json")) and os.path.exists(os.path.join(wd, "DONE.json"))


WALL = "esa_families_wall.json"   # the wall time of an ESA this script ran, kept beside it for later reuses


def run_or_reuse(variant: str, wd: str) -> float | None:
    """Runs ``configs/esa.py:<variant>`` into ``wd`` unless it holds a finished analysis; the wall seconds it took
    (when this script ran it, now or before). Each in its own process, so that each summary's peak host memory is
    its own model's."""
    wall = os.path.join(wd, WALL)
    if not _finished(wd):
        import subprocess
        t = time.time()
        subprocess.run([sys.executable, "-m", "launch.esa", "--config", f"configs/esa.py:{variant}", "--workdir",
                        wd], cwd=REPO, check=True)
        with open(wall, "w") as f:
            json.dump({"wall_seconds": time.time() - t}, f)
    if os.path.exists(wall):
        with open(wall) as f:
            return json.load(f)["wall_seconds"]
    return None


def run_folders(runs: str, names, workdir: str) -> dict:
    """name -> its ESA folder: the finished one ``--runs`` (name=folder,...) names, else ``<workdir>/<name>``."""
    given = dict(kv.split("=", 1) for kv in runs.split(",") if kv)
    unknown = set(given) - set(names)
    if unknown:
        raise SystemExit(f"error: --runs names {sorted(unknown)}; expected some of {', '.join(names)}")
    for n, wd in given.items():
        if not _finished(wd):
            raise SystemExit(f"error: --runs {n}={wd}: no finished ESA there (summary.json and DONE.json)")
    return {n: given.get(n, os.path.join(workdir, n)) for n in names}


def load(wd: str) -> dict:
    with open(os.path.join(wd, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(wd, "config.json")) as f:
        s["_config"] = json.load(f)
    return s


@functools.cache
def _model_config(name: str):
    """The checkpoint's config (read once per model), or None where it cannot be read on this machine."""
    from wa import models
    from wa.data import paths
    try:
        return models.read_config(paths.checkpoint(name))
    except Exception:   # noqa: BLE001 - a checkpoint not on this machine: the comparison goes on without it
        return None


def layer_types(s: dict) -> list[str] | None:
    """The per-layer attention type of a model with sliding-window layers (from its checkpoint's config); [] for a
    model whose layers are all of one type, None where its config cannot be read here."""
    cfg = _model_config(s["model"])
    if cfg is None:
        return None
    types = getattr(cfg, "layer_types", None)
    return list(types) if types and len(set(types)) > 1 else []


def _f(x, nd=3):
    from wa import report
    return report.number(x, nd)


def _p(p):
    if p is None or not np.isfinite(p):
        return "–"
    return "< 1e-300" if p == 0 else f"{p:.2g}"


# ---------------------------------------------------------------------------------------------- the figures


def per_layer(s, metric=MAIN):
    """(layers, attention mean score, MLP mean score, layer mean score, layer enrichment) from the architecture."""
    a = s["architecture"][metric]
    prog = a["progression"]
    layers = prog["layers"]
    return (layers, np.asarray(prog["attention"]["mean_score"]), np.asarray(prog["mlp"]["mean_score"]),
            np.asarray([a["layer"][str(L)]["mean_score"] for L in layers]),
            np.asarray([a["layer"][str(L)]["enrichment"] for L in layers]))


def attention_vs_mlp(s, metric=MAIN) -> dict:
    layers, att, mlp, _, _ = per_layer(s, metric)
    w = stats.wilcoxon(att, mlp, alternative="two-sided") if len(layers) >= 5 else None
    r = s["architecture"][metric]["attention_vs_mlp"]
    # The exact two-sided test over n pairs cannot go below 2 / 2^n (5 layers: 0.0625), whatever the data.
    return {"mean_score_ratio": r["mean_score_ratio"], "enrichment_ratio": r["enrichment_ratio"],
            "layers_attention_higher": int((att > mlp).sum()), "layers": len(layers),
            "wilcoxon_p": float(w.pvalue) if w is not None else float("nan"),
            "smallest_possible_p": 2.0 / 2 ** len(layers)}


def depth(s, metric=MAIN) -> dict:
    layers, _, _, score, enrich = per_layer(s, metric)
    rho = stats.spearmanr(layers, score)
    order = np.argsort(-score)      # rank 1 = highest mean score per weight
    rank = {int(layers[i]): r + 1 for r, i in enumerate(order)}
    middle = score[1:-1]
    return {"layers": len(layers), "spearman_rho_depth": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "first_rank": rank[layers[0]], "last_rank": rank[layers[-1]],
            "first_mean_score": float(score[0]), "last_mean_score": float(score[-1]),
            "middle_median_mean_score": float(np.median(middle)) if len(middle) else float("nan"),
            "first_enrichment": float(enrich[0]), "last_enrichment": float(enrich[-1])}


def sliding_vs_global(s, types, metric=MAIN) -> dict | None:
    if types is None:
        return {"unknown": True}
    if not types:
        return None
    layers, att, _, score, enrich = per_layer(s, metric)
    glob = np.asarray([types[L] == "full_attention" for L in layers])
    out = {"global_layers": [int(L) for L, g in zip(layers, glob, strict=True) if g],
           "seq_len": s["_config"]["seq_len"],
           "sliding_window": getattr(_model_config(s["model"]), "sliding_window", None)}
    for name, v in (("layer_mean_score", score), ("attention_mean_score", att), ("layer_enrichment", enrich)):
        u = stats.mannwhitneyu(v[glob], v[~glob], alternative="two-sided")
        out[name] = {"global_median": float(np.median(v[glob])), "sliding_median": float(np.median(v[~glob])),
                     "mannwhitney_p": float(u.pvalue)}
    return out


def _seen_rows(e) -> float:
    from wa.esa import apart
    rows = next(iter((e.get("rows") or {}).values()), None)
    g = e["groups"].get("embedding/token")
    return apart.seen_rows_vs_matrices(g["mean_score_vs_matrices"], rows) if rows and g else float("nan")


def norms(s, metric=MAIN) -> dict:
    ap = (s.get("apart") or {}).get(metric)
    return {g: v["mean_score_vs_matrices"] for g, v in ap["groups"].items()} if ap else {}


def family_figures(s: dict, types) -> dict:
    pm = s["per_metric"]
    metrics = [m for m in s["metrics"] if m in pm]
    out = {
        "model": s["model"], "n_params": s["n_params"], "n_scored": s["n_scored"], "ppl_base": s["ppl_base"],
        "corpus": s["_config"]["corpus"], "calibration_tokens_per_seed": s["calibration_tokens_per_seed"],
        "heldout_tokens": s["heldout_tokens"], "seconds_total": s["seconds_total"],
        "reads_data": [m for m in metrics if pm[m].get("reads_data", True)],
        "peak_host_memory_gib": s.get("peak_host_memory_gib"), "metrics": metrics,
        "attention_vs_mlp": {m: attention_vs_mlp(s, m) for m in metrics if m in (s.get("architecture") or {})},
        "depth": {m: depth(s, m) for m in metrics if m in (s.get("architecture") or {})},
        "sliding_vs_global": sliding_vs_global(s, types),
        "heavy_tail": {m: {"top1pct_over_median": pm[m]["heavy_tail_ratio"], "gini": pm[m]["gini"],
                           "top01pct_share": pm[m]["top01pct_share"]} for m in metrics},
        "stability": {m: pm[m]["jaccard_mean"] for m in metrics},
        "stability_curve": {m: pm[m]["stability_curve"] for m in metrics if pm[m].get("stability_curve")},
        "sign_flip": {m: {"ratio": pm[m]["ratio_topk_vs_random"], "p": pm[m]["p_value_topk_vs_random"],
                          "topk_dppl": pm[m]["perturb_main"]["topk"]["dppl_mean"],
                          "random_dppl": pm[m]["perturb_main"]["random_k"]["dppl_mean"],
                          "topk_rel": pm[m]["perturb_main"]["topk"]["dppl_mean"] / s["ppl_base"],
                          "n": len(pm[m]["perturb"][pm[m]["perturb_main"]["kind"]][str(pm[m]["perturb_main"]["scale"])]
                                   ["topk"]["values"])}
                      for m in metrics},
        "roles": {m: {r: {"mean_score": v["mean_score"], "enrichment": v["enrichment"]}
                      for r, v in s["architecture"][m]["role"].items()} for m in metrics
                  if m in (s.get("architecture") or {})},
        "components": {m: {c: {"mean_score": v["mean_score"], "enrichment": v["enrichment"]}
                           for c, v in s["architecture"][m]["component"].items()} for m in metrics
                       if m in (s.get("architecture") or {})},
        "apart": {m: {"groups": norms(s, m), "global_topk_share": e["global_topk_share"],
                      "seen_rows_vs_matrices": _seen_rows(e),
                      "weights_share": e["weights_share"], "jaccard": e["jaccard_mean"],
                      "rows": next(iter((e.get("rows") or {}).values()), None),
                      "perturb": e.get("perturb")} for m, e in (s.get("apart") or {}).items()},
        "pruning": s.get("pruning_ppl"),
    }
    sw = s.get("super_weights")
    if sw:
        singles = [c for c in sw["candidates"] if c.get("dppl_zero") is not None]
        best = max(singles, key=lambda c: c["dppl_zero"]) if singles else None
        top, n_layers = sw["candidates"][0], len(per_layer(s)[0])
        out["super_weights"] = {
            "n": sw["n"], "strongest_layer": top["layer"], "strongest_depth": top["layer"] / max(1, n_layers - 1),
            "strongest_out_over_median": top["out_over_median"], "zero_all": sw["dppl_zero_all_candidates"],
            "zero_largest_magnitude": sw["dppl_zero_largest_magnitude"],
            "single_largest": None if best is None else {
                "layer": best["layer"], "dppl": best["dppl_zero"],
                "dppl_largest_in_matrix": best["dppl_zero_largest_in_matrix"]},
        }
    return out


# ---------------------------------------------------------------------------------------------- the claims


def _holds(flags: dict) -> str:
    """flags: display name -> whether the claim holds there (None: it does not apply)."""
    known = {n: v for n, v in flags.items() if v is not None}
    if not known:
        return "–"
    where = "" if len(known) == len(flags) else f" ({len(known)} of {len(flags)} where it applies)"
    if all(known.values()):
        return "holds in all" + where
    if not any(known.values()):
        return "holds in none" + where
    return "holds in " + ", ".join(n for n, v in known.items() if v) + " only"


def claims(fig: dict) -> list[dict]:
    """Each claim: its statement, per family (the figure, whether it holds) and where the report shows it."""
    rows = []

    def add(claim, where, per):   # per: name -> (text, holds or None)
        short = {n: FAMILIES[n].split(" (")[0] for n in per}
        rows.append({"claim": claim, **{short[n]: t for n, (t, _) in per.items()},
                     "verdict": _holds({short[n]: h for n, (_, h) in per.items()}), "shown in": where})

    def each(fn):
        out = {}
        for n, f in fig.items():
            try:
                out[n] = fn(f)
            except (KeyError, TypeError, IndexError, ValueError):   # a family without the figure (no norms, ...)
                out[n] = ("–", None)
        return out

    add(f"sign-flipping the top 0.2% by {MAIN} hurts more than random-k (one-sided Mann–Whitney, p < {ALPHA})",
        "Perturbation", each(lambda f: (f"{_f(f['sign_flip'][MAIN]['ratio'], 1)}× random, p "
                                        f"{_p(f['sign_flip'][MAIN]['p'])}",
                                        f["sign_flip"][MAIN]["p"] < ALPHA)))
    add("…and so does every other metric that reads data (one-sided)", "Perturbation", each(lambda f: (
        ", ".join(f"{m} p {_p(f['sign_flip'][m]['p'])}" for m in f["reads_data"]),
        all(f["sign_flip"][m]["p"] < ALPHA for m in f["reads_data"]))))
    add(f"attention weights score higher per weight than MLP weights ({MAIN}; Wilcoxon over layers)",
        "Attention vs MLP", each(lambda f: (
            f"{_f(f['attention_vs_mlp'][MAIN]['mean_score_ratio'], 2)}×, "
            f"{f['attention_vs_mlp'][MAIN]['layers_attention_higher']}"
            f"/{f['attention_vs_mlp'][MAIN]['layers']} layers, p {_p(f['attention_vs_mlp'][MAIN]['wilcoxon_p'])}"
            + (f" (cannot go below {_p(f['attention_vs_mlp'][MAIN]['smallest_possible_p'])} with "
               f"{f['attention_vs_mlp'][MAIN]['layers']} layers)"
               if f["attention_vs_mlp"][MAIN]["smallest_possible_p"] >= ALPHA else ""),
            f["attention_vs_mlp"][MAIN]["mean_score_ratio"] > 1 and f["attention_vs_mlp"][MAIN]["wilcoxon_p"] < ALPHA)))
    add(f"mean score per weight falls with depth ({MAIN}; Spearman ρ < 0, p < {ALPHA})", "Depth", each(lambda f: (
        f"ρ {_f(f['depth'][MAIN]['spearman_rho_depth'], 2)}, p {_p(f['depth'][MAIN]['spearman_p'])}",
        f["depth"][MAIN]["spearman_rho_depth"] < 0 and f["depth"][MAIN]["spearman_p"] < ALPHA)))
    add(f"the first layer scores above the middle layers' median ({MAIN})", "Depth", each(lambda f: (
        f"rank {f['depth'][MAIN]['first_rank']} of {f['depth'][MAIN]['layers']}",
        f["depth"][MAIN]["first_mean_score"] > f["depth"][MAIN]["middle_median_mean_score"])))
    add(f"the last layer scores above the middle layers' median ({MAIN})", "Depth", each(lambda f: (
        f"rank {f['depth'][MAIN]['last_rank']} of {f['depth'][MAIN]['layers']}",
        f["depth"][MAIN]["last_mean_score"] > f["depth"][MAIN]["middle_median_mean_score"])))
    add(f"global-attention layers differ from sliding-window ones ({MAIN} mean score per layer; Mann–Whitney; at "
        "these windows' length, see the section)",
        "Sliding-window vs global layers", each(lambda f: (
            ("only global layers", None) if not f["sliding_vs_global"] else
            ("layer types unknown here", None) if f["sliding_vs_global"].get("unknown") else
            (f"global {_f(f['sliding_vs_global']['layer_mean_score']['global_median'], 2)} vs sliding "
             f"{_f(f['sliding_vs_global']['layer_mean_score']['sliding_median'], 2)}, p "
             f"{_p(f['sliding_vs_global']['layer_mean_score']['mannwhitney_p'])}",
             f["sliding_vs_global"]["layer_mean_score"]["mannwhitney_p"] < ALPHA))))
    add(f"every norm weight group scores higher per weight than the matrices ({MAIN})", "Norms and embedding",
        each(lambda f: (
            f"{_f(min(v for g, v in f['apart'][MAIN]['groups'].items() if g.startswith('norm/')), 2)}× (lowest group)",
            min(v for g, v in f["apart"][MAIN]["groups"].items() if g.startswith("norm/")) > 1)))
    add(f"averaged over its whole vocabulary, the token embedding scores lower per weight than the matrices ({MAIN}; "
        "mostly a reading of how much of the vocabulary the text covers)", "Norms and embedding",
        each(lambda f: (f"{_f(f['apart'][MAIN]['groups']['embedding/token'], 3)}× "
                        f"({100 * f['apart'][MAIN]['rows']['seen_rows_share']:.1f}% of rows seen)",
                        f["apart"][MAIN]["groups"]["embedding/token"] < 1)))
    add(f"the embedding's rows of tokens in the calibration text score lower per weight than the matrices ({MAIN})",
        "Norms and embedding", each(lambda f: (f"{_f(f['apart'][MAIN]['seen_rows_vs_matrices'], 3)}×",
                                               f["apart"][MAIN]["seen_rows_vs_matrices"] < 1)))
    add(f"among tokens in the calibration text, an embedding row's mean score follows the token's count ({MAIN}; "
        "Spearman)",
        "Norms and embedding", each(lambda f: (
            f"ρ {_f(f['apart'][MAIN]['rows']['spearman_seen_rows_score_vs_count'], 2)}, p "
            f"{_p(f['apart'][MAIN]['rows']['spearman_p'])}",
            f["apart"][MAIN]["rows"]["spearman_seen_rows_score_vs_count"] > 0
            and f["apart"][MAIN]["rows"]["spearman_p"] < ALPHA)))
    add(f"sign-flipping the embedding's own top 0.2% by {MAIN} hurts more than random-k drawn over the whole "
        "vocabulary (one-sided; not matched in token frequency)", "Norms and embedding",
        each(lambda f: (f"{_f(f['apart'][MAIN]['perturb']['ratio_topk_vs_random'], 1)}× random, p "
                        f"{_p(f['apart'][MAIN]['perturb']['p_value_topk_vs_random'])}",
                        f["apart"][MAIN]["perturb"]["p_value_topk_vs_random"] < ALPHA)))
    add(f"the top-k is stable across seeds (Jaccard > 0.4, {MAIN})", "Stability", each(lambda f: (
        _f(f["stability"][MAIN]), f["stability"][MAIN] > 0.4)))
    add("magnitudes are heavier-tailed than Gaussian weights (top 1% mean > 4.3× the median |w|)", "Heavy tail",
        each(lambda f: (f"{_f(f['heavy_tail']['magnitude']['top1pct_over_median'], 1)}×",
                        f["heavy_tail"]["magnitude"]["top1pct_over_median"] > 4.3)))
    for sal in ("taylor", "wanda"):
        add(f"at 50% sparsity per matrix, {sal} pruning leaves a lower perplexity than magnitude pruning", "Pruning",
            each(lambda f, sal=sal: (
                f"{_f(f['pruning']['0.5'][sal]['per_layer'], 4)} vs "
                f"{_f(f['pruning']['0.5']['magnitude']['per_layer'], 4)}",
                f["pruning"]["0.5"][sal]["per_layer"] < f["pruning"]["0.5"]["magnitude"]["per_layer"])))
    add("zeroing every super-weight candidate hurts more than zeroing as many largest-|w| weights", "Super weights",
        each(lambda f: (f"ΔPPL {_f(f['super_weights']['zero_all'])} vs "
                        f"{_f(f['super_weights']['zero_largest_magnitude'])}",
                        f["super_weights"]["zero_all"] > f["super_weights"]["zero_largest_magnitude"])))
    add("one candidate alone costs more than its matrix's largest-|w| weight (the strongest single)", "Super weights",
        each(lambda f: (f"layer {f['super_weights']['single_largest']['layer']}: ΔPPL "
                        f"{_f(f['super_weights']['single_largest']['dppl'])} vs "
                        f"{_f(f['super_weights']['single_largest']['dppl_largest_in_matrix'])}",
                        f["super_weights"]["single_largest"]["dppl"]
                        > f["super_weights"]["single_largest"]["dppl_largest_in_matrix"])))
    return rows


# ---------------------------------------------------------------------------------------------- plots and report


def plot_all(fig: dict, summaries: dict, types: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    names = list(fig)

    def save(f, name):
        f.tight_layout()
        f.savefig(os.path.join(out, name), dpi=110)
        plt.close(f)
        files.append(name)

    # Per-layer mean score per weight, attention and MLP, against relative depth; Gemma-3's global layers marked.
    f, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):
        layers, att, mlp, _, _ = per_layer(summaries[n])
        x = np.asarray(layers) / max(1, len(layers) - 1)
        ax.semilogy(x, att, "o-", ms=3, label="attention")
        ax.semilogy(x, mlp, "s-", ms=3, label="MLP")
        for L, t in enumerate(types.get(n) or []):
            if t == "full_attention":
                ax.axvline(L / max(1, len(layers) - 1), color="grey", lw=0.8, ls=":")
        ax.set_title(FAMILIES[n] + (" (dotted: global layers)" if types.get(n) else ""), fontsize=8)
        ax.set_xlabel("relative depth", fontsize=8)
        ax.set_ylabel(f"{MAIN} per weight / model mean", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    save(f, "progression.png")

    # Mean score per weight by role, each relative to its model's mean.
    roles = [r for r in ("q", "k", "v", "o", "gate", "up", "down", "lm_head") if any(
        r in fig[n]["roles"].get(MAIN, {}) for n in names)]
    f, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ys = [fig[n]["roles"][MAIN].get(r, {}).get("mean_score", np.nan) for r in roles]
        ax.bar(np.arange(len(roles)) + i * width, ys, width, label=FAMILIES[n].split(" (")[0])
    ax.set_yscale("log")
    ax.axhline(1, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(roles)) + 0.4 - width / 2, roles)
    ax.set_ylabel(f"{MAIN} per weight / model mean", fontsize=8)
    ax.legend(fontsize=7)
    save(f, "roles.png")

    # Norm groups and the embedding: mean score per weight over the matrices'.
    groups = sorted({g for n in names for g in fig[n]["apart"].get(MAIN, {}).get("groups", {})})
    if groups:
        f, ax = plt.subplots(figsize=(8, 3.4))
        for i, n in enumerate(names):
            ys = [fig[n]["apart"].get(MAIN, {}).get("groups", {}).get(g, np.nan) for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, ys, width, label=FAMILIES[n].split(" (")[0])
        ax.set_yscale("log")
        ax.axhline(1, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [g.split("/")[1] for g in groups], rotation=30,
                      fontsize=7)
        ax.set_ylabel(f"{MAIN} per weight / matrices'", fontsize=8)
        ax.legend(fontsize=7)
        save(f, "norms_embedding.png")

    # Stability: top-k Jaccard across seeds against calibration tokens per seed.
    f, ax = plt.subplots(figsize=(5, 3.2))
    for n in names:
        for m, c in fig[n]["stability_curve"].items():
            if m in (MAIN, "grad_squared"):
                ax.plot(c["tokens_per_seed"], c["jaccard"], "o-" if m == MAIN else "s--", ms=3,
                        label=f"{FAMILIES[n].split(' (')[0]} {m}")
    ax.set_xscale("log")
    ax.set_xlabel("calibration tokens per seed", fontsize=8)
    ax.set_ylabel("top-k Jaccard across seeds", fontsize=8)
    ax.legend(fontsize=6)
    save(f, "stability.png")

    # Pruning: perplexity over base against sparsity, per matrix, per family.
    f, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):
        pr = fig[n]["pruning"] or {}
        sps = sorted(pr, key=float)
        for sal in (pr[sps[0]] if sps else {}):
            ax.semilogy([100 * float(sp) for sp in sps], [pr[sp][sal]["per_layer"] / fig[n]["ppl_base"] for sp in sps],
                        "o-", ms=3, label=sal)
        ax.set_title(FAMILIES[n], fontsize=8)
        ax.set_xlabel("sparsity % (per matrix)", fontsize=8)
        ax.set_ylabel("perplexity / base", fontsize=8)
        ax.legend(fontsize=7)
    save(f, "pruning.png")
    return files


def _table(rows):
    from wa import report
    return report.markdown_table(rows)


def render(fig: dict, claim_rows: list, files: list, command: str, seconds: dict, compare_seconds: float) -> str:
    names = list(fig)
    short = {n: FAMILIES[n].split(" (")[0] for n in names}
    model_rows = [{"model": FAMILIES[n], "parameters": f"{f['n_params']:,}", "matrix weights scored":
                   f"{f['n_scored']:,}", "text": f["corpus"], "calibration tokens per seed":
                   f"{f['calibration_tokens_per_seed']:,}", "held-out tokens": f"{f['heldout_tokens']:,}",
                   "base perplexity": _f(f["ppl_base"], 4), "ESA time (s)": f["seconds_total"],
                   "peak host memory (GiB)": _f(f["peak_host_memory_gib"], 3)} for n, f in fig.items()]
    metrics = [m for m in fig[names[0]]["metrics"] if all(m in fig[n]["metrics"] for n in names)]
    pert_rows = [{"metric": m, **{short[n]: f"{_f(fig[n]['sign_flip'][m]['ratio'], 1)}× random "
                                            f"(ΔPPL {_f(fig[n]['sign_flip'][m]['topk_dppl'])}, "
                                            f"{_f(fig[n]['sign_flip'][m]['topk_rel'], 2)}× base; p "
                                            f"{_p(fig[n]['sign_flip'][m]['p'])}, n = {fig[n]['sign_flip'][m]['n']})"
                                  for n in names}} for m in metrics]
    roles = [r for r in ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
             if any(r in fig[n]["roles"].get(MAIN, {}) for n in names)]
    role_rows = [{"role": r, **{short[n]: (f"{_f(v['mean_score'], 2)} / {_f(v['enrichment'], 2)}"
                                           if (v := fig[n]["roles"][MAIN].get(r)) else "–") for n in names}}
                 for r in roles]
    comp_rows = [{"metric": m, "component": c, **{short[n]: (
        f"{_f(v['mean_score'], 2)} / {_f(v['enrichment'], 2)}" if (v := fig[n]["components"].get(m, {}).get(c))
        else "–") for n in names}} for m in metrics for c in ("attention", "mlp", "head")
        if any(c in fig[n]["components"].get(m, {}) for n in names)]
    avm_rows = [{"metric": m, **{short[n]: (
        f"{_f(a['mean_score_ratio'], 2)}× (enrichment {_f(a['enrichment_ratio'], 2)}×); attention higher in "
        f"{a['layers_attention_higher']}/{a['layers']} layers, Wilcoxon p {_p(a['wilcoxon_p'])}")
        if (a := fig[n]["attention_vs_mlp"].get(m)) else "–" for n in names}} for m in metrics]
    depth_rows = [{"metric": m, **{short[n]: (
        f"ρ {_f(d['spearman_rho_depth'], 2)} (p {_p(d['spearman_p'])}); first layer rank {d['first_rank']}, last "
        f"rank {d['last_rank']} of {d['layers']}; enrichment first {_f(d['first_enrichment'], 2)}, last "
        f"{_f(d['last_enrichment'], 2)}") if (d := fig[n]["depth"].get(m)) else "–" for n in names}} for m in metrics]
    svg_rows = []
    for n in names:
        sg = fig[n]["sliding_vs_global"]
        if sg:
            if sg.get("unknown"):
                continue
            for what in ("layer_mean_score", "attention_mean_score", "layer_enrichment"):
                svg_rows.append({"model": FAMILIES[n], "windows / sliding window": f"{sg['seq_len']} / "
                                 f"{sg['sliding_window']} tokens", "figure (per layer)": what.replace("_", " "),
                                 "global layers (median)": _f(sg[what]["global_median"], 3),
                                 "sliding-window layers (median)": _f(sg[what]["sliding_median"], 3),
                                 "Mann–Whitney p": _p(sg[what]["mannwhitney_p"])})
    groups = sorted({g for n in names for g in fig[n]["apart"].get(MAIN, {}).get("groups", {})})
    norm_rows = [{"group": g, **{short[n]: _f(fig[n]["apart"].get(MAIN, {}).get("groups", {}).get(g), 3)
                                 for n in names}} for g in groups]
    norm_rows.insert(1, {"group": "embedding/token, rows of tokens in the calibration text",
                         **{short[n]: _f(fig[n]["apart"].get(MAIN, {}).get("seen_rows_vs_matrices"), 3)
                            for n in names}})
    emb_rows = []
    for n in names:
        for m, e in fig[n]["apart"].items():
            r, pt = e.get("rows"), e.get("perturb")
            emb_rows.append({
                "model": short[n], "metric": m,
                "apart weights' share of all / of the model-wide top-k":
                    f"{100 * e['weights_share']:.1f}% / {100 * e['global_topk_share']:.1f}%",
                "embedding top-k rows (of vocabulary)": f"{r['rows_holding']:,} of {r['rows']:,}" if r else "–",
                "seen rows' mean score / unseen rows'": _f(r["seen_over_unseen_mean_score"], 1) if r else "–",
                "ρ(row score, token count), seen rows": _f(r['spearman_seen_rows_score_vs_count'], 2) if r else "–",
                "Jaccard (seeds)": _f(e["jaccard"]),
                "sign flip: top-k vs random ΔPPL (p)": (
                    f"{_f(pt['topk']['mean'])} vs {_f(pt['random_k']['mean'])} (p {_p(pt['p_value_topk_vs_random'])})"
                    if pt else "–")})
    tail_rows = [{"metric": m, **{short[n]: (
        f"{_f(fig[n]['heavy_tail'][m]['top1pct_over_median'], 1)}× / Gini {_f(fig[n]['heavy_tail'][m]['gini'], 2)} / "
        f"{100 * fig[n]['heavy_tail'][m]['top01pct_share']:.1f}%") for n in names}} for m in metrics]
    stab_rows = [{"metric": m, **{short[n]: _f(fig[n]["stability"][m]) for n in names}} for m in metrics]
    sw_rows = []
    for n in names:
        sw = fig[n].get("super_weights")
        if sw:
            one = sw["single_largest"]
            sw_rows.append({"model": FAMILIES[n], "candidates": sw["n"],
                            "strongest spike": f"layer {sw['strongest_layer']} (depth {_f(sw['strongest_depth'], 2)}),"
                                               f" {_f(sw['strongest_out_over_median'], 0)}× the median output",
                            "ΔPPL zero all / as many largest-|w|": f"{_f(sw['zero_all'])} / "
                                                                   f"{_f(sw['zero_largest_magnitude'])}",
                            "strongest single candidate: ΔPPL vs its matrix's largest-|w|": (
                                f"layer {one['layer']}: {_f(one['dppl'])} vs {_f(one['dppl_largest_in_matrix'])}"
                                if one else "–")})
    prune_rows = []
    sps = sorted(set.intersection(*[set(fig[n]["pruning"] or {}) for n in names]), key=float)
    for sp in sps:
        for mode in ("per_layer", "global"):
            for sal in fig[names[0]]["pruning"][sp]:
                prune_rows.append({"sparsity": f"{float(sp):.0%}", "mode": mode, "saliency": sal, **{
                    short[n]: (_f(fig[n]["pruning"][sp][sal][mode] / fig[n]["ppl_base"], 3)
                               if sal in fig[n]["pruning"][sp] else "–") for n in names}})
    img = {f: f"![{f}]({f})" for f in files}
    ran = ("ESA wall times on 2 CPU cores: " + "; ".join(f"{short[n]} {s:,.0f} s" for n, s in seconds.items() if s)
           if any(seconds.values()) else "ESAs run elsewhere (their times from the base perplexity on are below)")
    verdicts = {}
    for r in claim_rows:
        key = ("all" if r["verdict"].startswith("holds in all") else "none" if r["verdict"].startswith("holds in none")
               else "–" if r["verdict"] == "–" else "some")
        verdicts.setdefault(key, []).append(r["claim"])
    reading = "\n".join(f"- **{label}**: " + "; ".join(verdicts[k]) + "."
                         for k, label in (("all", "Holds in every family where it applies"),
                                          ("some", "Holds in some families only"),
                                          ("none", "Holds in none")) if k in verdicts)
    return f"""# Critical weights across three real families: stories260K, SmolLM2-135M, Gemma-3-270M

`{command}`

{ran}; this comparison {compare_seconds:.0f} s. Each model is analysed by its own `configs/esa.py` variant
(stories260k, smollm2, gemma3): the same scores, top 0.2% per matrix, sign flip against random-k and
bottom-k, pruning, super weights and bit flips; stories260K on TinyStories (its training text), the other two on
WikiText-2 validation text. Only figures relative to each model's own base (ratios, perplexity over base,
enrichment, mean score per weight over the model's mean) are compared. The main reading is `{MAIN}` (|g·w| per
calibration window, Molchanov et al. 2019); statistics are two-sided unless stated, at α = {ALPHA}, with each
model's seeds and layers as the samples — three models are three cases, not a sample of families.

## What holds across families and what does not
{reading}

Each claim with its figure per family, the verdict at α = {ALPHA}, and the section that shows it:

{_table(claim_rows)}

## Models
{_table(model_rows)}

## Perturbation: sign-flipping the top 0.2% (largest dose) against random-k
{_table(pert_rows)}

## Sensitivity by component and role
Mean score per weight over the model's mean / enrichment of the model-wide top 0.2% (share of it over share of the
weights), `{MAIN}`, by role:

{_table(role_rows)}

By component, every metric:

{_table(comp_rows)}

{img.get('roles.png', '')}

## Attention vs MLP
Attention's mean score per weight over the MLP's (and the ratio of top-k enrichments); per layer, how often attention
scores higher, and a Wilcoxon signed-rank test of the per-layer pairs:

{_table(avm_rows)}

## Depth: first and last layers
Spearman's ρ of a layer's mean score per weight with its depth, and the first and last layers' ranks (1 = highest):

{_table(depth_rows)}

{img.get('progression.png', '')}

## Sliding-window vs global layers
Only Gemma-3 has both (five sliding-window layers of 512 tokens to one global; stories260K and SmolLM2 attend
globally in every layer). Per layer, global against sliding-window (Mann–Whitney U over layers, two-sided). Read
with the window length: where the analysis' windows are no longer than the sliding window, both kinds of layer see
the same context and differ only in their rotary base, so this cannot find an effect of attention span — a longer
`seq_len` can:

{_table(svg_rows) if svg_rows else "No model here has both layer types."}

## Norms and embedding
Reported apart from the matrices (scored in the same gradient passes, kept out of their top-k; the ESA report of
each model says why). Mean score per weight of each group over the matrices' (`{MAIN}`); Gemma-3's `q_norm` and
`k_norm` are its QK-norm, `attn_post_norm` and `mlp_post_norm` its post-norms:

{_table(norm_rows)}

{img.get('norms_embedding.png', '')}

The embedding and norms with the matrices: their share of all weights and of the model-wide top-k when they compete;
the embedding's own top-k by vocabulary row; its stability; sign-flipping it against random-k within it:

{_table(emb_rows)}

## Heavy tail
Top 1% mean over the median / Gini / share of the total held by the top 0.1%:

{_table(tail_rows)}

## Stability
Top-k Jaccard across seeds (disjoint calibration windows):

{_table(stab_rows)}

{img.get('stability.png', '')}

## Super weights
One activation-spike candidate per MLP down-projection (Yu et al. 2024):

{_table(sw_rows)}

## Pruning
Perplexity over base after zeroing the lowest-saliency fraction (per matrix, or of all matrices at once):

{_table(prune_rows)}

{img.get('pruning.png', '')}

Files: `comparison.json` (every figure above), the plots; each model's own ESA report lies in its run folder.
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/esa_families", help="where missing ESA runs are made")
    ap.add_argument("--runs", default="", help="variant=folder,... of finished ESA runs to reuse")
    ap.add_argument("--out", default="experiments/results/esa_families")
    a = ap.parse_args()
    from wa import report

    folders = run_folders(a.runs, FAMILIES, a.workdir)
    seconds = {}
    for n, wd in folders.items():
        print(f"{n}: {'reusing' if _finished(wd) else 'running'} the ESA in {wd}", file=sys.stderr, flush=True)
        seconds[n] = run_or_reuse(n, wd)
    summaries = {n: load(wd) for n, wd in folders.items()}
    missing = {n: s for n, s in summaries.items() if not s.get("apart") or not s.get("architecture")}
    if missing:
        raise SystemExit(f"error: {sorted(missing)}: ESA run without the apart or architecture figures; rerun it with "
                         "--config.apart='embed|norm' --config.architecture=True")
    t_compare = time.time()
    types = {n: layer_types(s) for n, s in summaries.items()}
    fig = {n: family_figures(s, types[n]) for n, s in summaries.items()}
    claim_rows = claims(fig)
    os.makedirs(a.out, exist_ok=True)
    files = plot_all(fig, summaries, types, a.out)
    report.write_json(os.path.join(a.out, "comparison.json"),
                      {"families": fig, "claims": claim_rows, "runs": folders, "esa_seconds": seconds})
    command = "python experiments/esa_families.py" + "".join(
        f" --{k} {v}" for k, v in (("workdir", a.workdir), ("runs", a.runs), ("out", a.out)) if v and (
            k != "workdir" or not a.runs))
    report.write_text(os.path.join(a.out, "report.md"), render(fig, claim_rows, files, command, seconds,
                                                                time.time() - t_compare))
    print(json.dumps({"claims": {r["claim"][:60]: r["verdict"] for r in claim_rows}}))


if __name__ == "__main__":
    main()
