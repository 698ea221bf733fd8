r"""Dense vs mixture-of-experts: the ESA of a dense Llama and of a Mixtral trained here as a matched pair (same
tokenizer, TinyStories tokens, schedule, attention and width; 8 experts of 172 with 2 routed per token against one
MLP of 344, so both multiply as many weights per token), set side by side on what the seed ESA workflow asks of
"dense vs MoE patterns" and "expert vs non-expert analysis".

  python -m launch.train_lm --config configs/train_lm.py:stories_llama --workdir runs/stories_llama
  python -m launch.train_lm --config configs/train_lm.py:stories_moe --workdir runs/stories_moe
  python experiments/esa_moe.py [--workdir runs/esa_moe] [--out experiments/results/esa_moe]
  python experiments/esa_moe.py --runs dense=runs/esa-llama,moe=runs/esa-moe

Each ESA (``configs/esa.py:stories_llama`` and ``:stories_moe``, reading ``runs/stories_*/hf``) runs into
``<workdir>/<dense|moe>`` unless that folder (or the one ``--runs`` names) holds a finished analysis. Then, from the
two ``summary.json`` files, it writes ``report.md``, ``comparison.json`` and plots into ``--out``.

Compared: the heavy tail, stability across seeds, sign flip of the top-k against random-k, attention vs MLP (the
MoE's MLP is its experts) in the model-wide top-k, the router, pruning curves and super-weight candidates (per
expert in the MoE); for the MoE alone, how the router spreads tokens and whether an expert's sensitivity, and what
removing it costs, follow how often it is routed.
"""

import argparse
import importlib.util
import json
import os
import re
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_spec = importlib.util.spec_from_file_location("esa_families", os.path.join(REPO, "experiments", "esa_families.py"))
fam = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fam)

MODELS = {"dense": ("stories_llama", "dense Llama"), "moe": ("stories_moe", "Mixtral (8 experts, 2 per token)")}
MAIN, ALPHA = fam.MAIN, fam.ALPHA
_f, _p, _table = fam._f, fam._p, fam._table


def expert_figures(s: dict) -> dict | None:
    """The MoE-only figures of one summary (None for a dense model)."""
    ex = s.get("experts")
    if not ex:
        return None
    share = np.asarray(ex["routing"]["share"])
    pm = ex["per_metric"]
    out = {"experts": ex["experts"], "experts_per_token": ex["experts_per_token"],
           "routing_max_over_even": ex["routing_spread"]["max_over_even"],
           "routing_entropy": ex["routing_spread"]["entropy_norm"],
           "routing_share": share.tolist(),
           "per_metric": {m: {"mean_score_vs_routing": e["mean_score_vs_routing"],
                              "mean_score_vs_routing_within_layers":
                                  e.get("mean_score_vs_routing_within_layers"),
                              "mean_score_vs_ablation_within_layers":
                                  e.get("mean_score_vs_ablation_within_layers"),
                              "topk_share_vs_routing": e["topk_share_vs_routing"],
                              "mean_score_vs_ablation": e.get("mean_score_vs_ablation"),
                              "topk_share_in_experts": e["topk_share_in_experts"],
                              "router": e["router"], "mean_score": e["mean_score"]} for m, e in pm.items()},
           "ablation": ex.get("ablation")}
    sw = s.get("super_weights")
    if sw:
        cands = []
        for c in sw["candidates"]:
            m = re.search(r"/experts/(\d+)/", c["path"])
            if m:
                e = int(m.group(1))
                cands.append({"layer": c["layer"], "expert": e, "out_over_median": c["out_over_median"],
                              "routing_share": float(share[c["layer"], e]), "dppl_zero": c.get("dppl_zero")})
        cands.sort(key=lambda c: -c["out_over_median"])
        spikes = np.asarray([c["out_over_median"] for c in cands])
        routed = np.asarray([c["routing_share"] for c in cands])
        from wa.esa import experts
        out["super_weights"] = {"candidates": cands, "spike_vs_routing": experts._spearman(routed, spikes)}
    return out


def components(s: dict, metric=MAIN) -> dict:
    """Share of the model-wide top-k, enrichment and mean score per weight by component."""
    return {c: {"share": v["share"], "enrichment": v["enrichment"], "mean_score": v["mean_score"]}
            for c, v in s["architecture"][metric]["component"].items()}


def claims(fig: dict, comp: dict, ex: dict | None) -> list[dict]:
    rows = []

    def add(claim, where, dense, moe, verdict):
        rows.append({"claim": claim, "dense Llama": dense, "Mixtral": moe, "verdict": verdict, "shown in": where})

    def both(fn):
        got = {}
        for n in ("dense", "moe"):
            try:
                got[n] = fn(fig[n])
            except (KeyError, TypeError, IndexError, ValueError):
                got[n] = ("–", None)
        flags = {"dense": got["dense"][1], "moe": got["moe"][1]}
        known = {n: v for n, v in flags.items() if v is not None}
        verdict = ("–" if not known else "holds in both" if all(known.values()) and len(known) == 2
                   else "holds in neither" if not any(known.values()) else
                   "holds in " + " and ".join({"dense": "the dense model", "moe": "the MoE"}[n]
                                               for n, v in known.items() if v) + " only")
        return got["dense"][0], got["moe"][0], verdict

    add(f"sign-flipping the top 0.2% by {MAIN} hurts more than random-k (one-sided Mann–Whitney, p < {ALPHA})",
        "Perturbation", *both(lambda f: (f"{_f(f['sign_flip'][MAIN]['ratio'], 1)}× random, p "
                                         f"{_p(f['sign_flip'][MAIN]['p'])}", f["sign_flip"][MAIN]["p"] < ALPHA)))
    add("…and so does every other metric that reads data", "Perturbation", *both(lambda f: (
        ", ".join(f"{m} p {_p(f['sign_flip'][m]['p'])}" for m in f["reads_data"]),
        all(f["sign_flip"][m]["p"] < ALPHA for m in f["reads_data"]))))
    add("magnitudes are heavier-tailed than Gaussian weights (top 1% mean > 4.3× the median |w|)", "Heavy tail",
        *both(lambda f: (f"{_f(f['heavy_tail']['magnitude']['top1pct_over_median'], 1)}×",
                         f["heavy_tail"]["magnitude"]["top1pct_over_median"] > 4.3)))
    add(f"the top-k is stable across seeds (Jaccard > 0.4, {MAIN})", "Stability",
        *both(lambda f: (_f(f["stability"][MAIN]), f["stability"][MAIN] > 0.4)))
    add(f"attention weights score higher per weight than MLP weights ({MAIN}; the MoE's MLP is its experts)",
        "Attention vs MLP", *both(lambda f: (
            f"{_f(f['attention_vs_mlp'][MAIN]['mean_score_ratio'], 2)}×, attention higher in "
            f"{f['attention_vs_mlp'][MAIN]['layers_attention_higher']}/{f['attention_vs_mlp'][MAIN]['layers']} layers",
            f["attention_vs_mlp"][MAIN]["mean_score_ratio"] > 1)))
    d, m = comp["dense"].get("mlp"), comp["moe"].get("mlp")
    if d and m:
        add(f"the MLP (the MoE: all its experts) holds a smaller share of the model-wide top 0.2% in the MoE ({MAIN})",
            "Attention vs MLP", f"{100 * d['share']:.1f}% (enrichment {_f(d['enrichment'], 2)})",
            f"{100 * m['share']:.1f}% (enrichment {_f(m['enrichment'], 2)})",
            "holds" if m["share"] < d["share"] else "does not hold")
    for sal in ("taylor", "wanda"):
        add(f"at 50% sparsity per matrix, {sal} pruning leaves a lower perplexity than magnitude pruning", "Pruning",
            *both(lambda f, sal=sal: (f"{_f(f['pruning']['0.5'][sal]['per_layer'], 4)} vs "
                                      f"{_f(f['pruning']['0.5']['magnitude']['per_layer'], 4)}",
                                      f["pruning"]["0.5"][sal]["per_layer"]
                                      < f["pruning"]["0.5"]["magnitude"]["per_layer"])))
    add("zeroing every super-weight candidate hurts more than zeroing as many largest-|w| weights", "Super weights",
        *both(lambda f: (f"ΔPPL {_f(f['super_weights']['zero_all'])} vs "
                         f"{_f(f['super_weights']['zero_largest_magnitude'])}",
                         f["super_weights"]["zero_all"] > f["super_weights"]["zero_largest_magnitude"])))
    if ex:
        e = ex["per_metric"].get(MAIN)

        def only_moe(claim, where, text, holds):
            rows.append({"claim": claim, "dense Llama": "–", "Mixtral": text,
                         "verdict": "–" if holds is None else "holds" if holds else "does not hold",
                         "shown in": where})

        if e:
            r = e["mean_score_vs_routing"]
            only_moe(f"an expert's mean score per weight follows how often it is routed ({MAIN}; Spearman over "
                     "(layer, expert); expected by construction for gradient scores)", "Experts",
                     f"ρ {_f(r['rho'], 2)}, p {_p(r['p_value'])}",
                     None if not np.isfinite(r["rho"]) else r["rho"] > 0 and r["p_value"] < ALPHA)
            router = e["router"]
            only_moe(f"the router's weights score higher per weight than the model's mean ({MAIN})", "Experts",
                     f"{_f(router['mean_score'], 2)}× the mean, {100 * router['share']:.2f}% of the top-k"
                     if router else "–", None if not router else router["mean_score"] > 1)
        ab = ex.get("ablation")
        if ab:
            r = ab["vs_routing"]
            only_moe("removing a busier expert costs more (held-out ΔPPL vs routing share, Spearman)", "Experts",
                     f"ρ {_f(r['rho'], 2)}, p {_p(r['p_value'])}",
                     None if not np.isfinite(r["rho"]) else r["rho"] > 0 and r["p_value"] < ALPHA)
            w = (ab.get("vs_routing_within_layers") or {}).get("pooled_ranks")
            if w:
                only_moe("…within each layer too (each layer's experts ranked among themselves, pooled)", "Experts",
                         f"ρ {_f(w['rho'], 2)}, p {_p(w['p_value'])}; per layer "
                         + ", ".join(_f(x, 2) for x in ab["vs_routing_within_layers"]["per_layer"]),
                         None if not np.isfinite(w["rho"]) else w["rho"] > 0 and w["p_value"] < ALPHA)
            if e and e.get("mean_score_vs_ablation"):
                r = e["mean_score_vs_ablation"]
                only_moe(f"an expert's mean {MAIN} score predicts what removing it costs (Spearman)", "Experts",
                         f"ρ {_f(r['rho'], 2)}, p {_p(r['p_value'])}",
                         None if not np.isfinite(r["rho"]) else r["rho"] > 0 and r["p_value"] < ALPHA)
                w = (e.get("mean_score_vs_ablation_within_layers") or {}).get("pooled_ranks")
                if w:
                    only_moe("…within each layer too (pooled within-layer ranks)", "Experts",
                             f"ρ {_f(w['rho'], 2)}, p {_p(w['p_value'])}",
                             None if not np.isfinite(w["rho"]) else w["rho"] > 0 and w["p_value"] < ALPHA)
        sw = ex.get("super_weights")
        if sw and sw["candidates"]:
            top = sw["candidates"][0]
            r = sw["spike_vs_routing"]
            only_moe("super-weight spikes sit in busier experts (candidate's spike vs its expert's routing share, "
                     "Spearman)", "Super weights",
                     f"strongest: layer {top['layer']} expert {top['expert']} ({_f(top['out_over_median'], 0)}× "
                     f"the median output, routed {100 * top['routing_share']:.1f}%); ρ {_f(r['rho'], 2)}, p "
                     f"{_p(r['p_value'])}",
                     None if not np.isfinite(r["rho"]) else r["rho"] > 0 and r["p_value"] < ALPHA)
    return rows


def plot_all(fig: dict, ex: dict | None, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []

    def save(f, name):
        f.tight_layout()
        f.savefig(os.path.join(out, name), dpi=110)
        plt.close(f)
        files.append(name)

    f, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, n in zip(axes, ("dense", "moe"), strict=True):
        pr = fig[n]["pruning"] or {}
        sps = sorted(pr, key=float)
        for sal in (pr[sps[0]] if sps else {}):
            ax.semilogy([100 * float(sp) for sp in sps], [pr[sp][sal]["per_layer"] / fig[n]["ppl_base"] for sp in sps],
                        "o-", ms=3, label=sal)
        ax.set_title(MODELS[n][1], fontsize=8)
        ax.set_xlabel("sparsity % (per matrix)", fontsize=8)
        ax.set_ylabel("perplexity / base", fontsize=8)
        ax.legend(fontsize=7)
    save(f, "pruning.png")

    f, ax = plt.subplots(figsize=(5, 3.2))
    for n, marker in (("dense", "o-"), ("moe", "s-")):
        layers, att, mlp, _, _ = fam.per_layer(fig[n]["_summary"])
        ax.semilogy(layers, att, marker, ms=3, label=f"{MODELS[n][1]}: attention")
        ax.semilogy(layers, mlp, marker.replace("-", "--"), ms=3, label=f"{MODELS[n][1]}: MLP / experts")
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel(f"{MAIN} per weight / model mean", fontsize=8)
    ax.legend(fontsize=6)
    save(f, "progression.png")

    if ex:
        share = np.asarray(ex["routing_share"]).ravel()
        panels = [("mean score per weight / model mean", np.asarray(ex["per_metric"][MAIN]["mean_score"]).ravel())]
        if ex.get("ablation"):
            panels.append(("held-out ΔPPL, expert removed", np.asarray(ex["ablation"]["dppl"]).ravel()))
        f, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
        for ax, (label, y) in zip(axes[0], panels, strict=True):
            ax.scatter(100 * share, y, s=12)
            ax.axvline(100 / ex["experts"], color="grey", lw=0.8, ls=":")
            ax.set_xlabel("routing share % (dotted: even)", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(f"{MAIN}: one point per (layer, expert)" if "score" in label else "ablation", fontsize=8)
        save(f, "experts_vs_routing.png")
    return files


def training(s: dict) -> dict | None:
    """launch.train_lm's train.json beside the analysed checkpoint (``<workdir>/hf``), where it is on this machine."""
    path = os.path.join(os.path.dirname(os.path.normpath(s["_config"]["model"])), "train.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        t = json.load(f)
    balance = [x["balance"] for x in t["history"]["train"] if "balance" in x]
    return {"n_params": t["n_params"], "n_active_params": t.get("n_active_params", t["n_params"]),
            "steps": t["steps_done"], "tokens_seen": t["tokens_seen"], "train_tokens": t["train_tokens"],
            "val_ppl": t["val_ppl"], "val_nll": t["val_nll"], "seconds": t["seconds_this_run"],
            "last_train_loss": t["history"]["train"][-1]["loss"], "balance_last": balance[-1] if balance else None}


def render(fig, comp, ex, claim_rows, files, command, seconds, compare_seconds, trained=None) -> str:
    names = ("dense", "moe")
    trained = trained or {}
    train_rows = [{"model": MODELS[n][1], "parameters / multiplied per token":
                   f"{t['n_params']:,} / {t['n_active_params']:,}", "steps (tokens seen)":
                   f"{t['steps']} ({t['tokens_seen']:,} of a {t['train_tokens']:,}-token text)",
                   "last training loss": _f(t["last_train_loss"], 3),
                   "held-out perplexity (launch.train_lm)": _f(t["val_ppl"], 4),
                   "router balance loss, last step": _f(t["balance_last"], 3) if t["balance_last"] else "–",
                   "training time (s, 2 CPU cores)": f"{t['seconds']:,.0f}"}
                  for n in names if (t := trained.get(n))]
    model_rows = [{"model": MODELS[n][1], "parameters": f"{fig[n]['n_params']:,}",
                   "matrix weights scored": f"{fig[n]['n_scored']:,}",
                   "held-out perplexity": _f(fig[n]["ppl_base"], 4),
                   "held-out tokens": f"{fig[n]['heldout_tokens']:,}",
                   "ESA time (s)": fig[n]["seconds_total"],
                   "peak host memory (GiB)": _f(fig[n]["peak_host_memory_gib"], 3)} for n in names]
    metrics = [m for m in fig["dense"]["metrics"] if m in fig["moe"]["metrics"]]
    pert_rows = [{"metric": m, **{MODELS[n][1]: f"{_f(fig[n]['sign_flip'][m]['ratio'], 1)}× random (ΔPPL "
                                                f"{_f(fig[n]['sign_flip'][m]['topk_dppl'])}, "
                                                f"{_f(fig[n]['sign_flip'][m]['topk_rel'], 2)}× base; p "
                                                f"{_p(fig[n]['sign_flip'][m]['p'])})" for n in names}}
                 for m in metrics]
    comp_rows = [{"component": c, **{MODELS[n][1]: (f"{100 * v['share']:.1f}% / {_f(v['enrichment'], 2)} / "
                                                    f"{_f(v['mean_score'], 2)}" if (v := comp[n].get(c)) else "–")
                                     for n in names}}
                 for c in ("attention", "mlp", "router", "head") if any(c in comp[n] for n in names)]
    tail_rows = [{"metric": m, **{MODELS[n][1]: (
        f"{_f(fig[n]['heavy_tail'][m]['top1pct_over_median'], 1)}× / Gini {_f(fig[n]['heavy_tail'][m]['gini'], 2)}")
        for n in names}} for m in metrics]
    stab_rows = [{"metric": m, **{MODELS[n][1]: _f(fig[n]["stability"][m]) for n in names}} for m in metrics]
    prune_rows = []
    sps = sorted(set(fig["dense"]["pruning"] or {}) & set(fig["moe"]["pruning"] or {}), key=float)
    for sp in sps:
        for mode in ("per_layer", "global"):
            for sal in fig["dense"]["pruning"][sp]:
                prune_rows.append({"sparsity": f"{float(sp):.0%}", "mode": mode, "saliency": sal, **{
                    MODELS[n][1]: _f(fig[n]["pruning"][sp][sal][mode] / fig[n]["ppl_base"], 3) for n in names}})
    img = {f: f"![{f}]({f})" for f in files}
    expert_text = ""
    if ex:
        share = np.asarray(ex["routing_share"])
        route_rows = [{"layer": str(L), **{f"expert {i}": f"{100 * v:.1f}%" for i, v in enumerate(row)},
                       "busiest / even": _f(ex["routing_max_over_even"][L], 2)} for L, row in enumerate(share)]
        corr_rows = [{"metric": m, "experts' share of the top-k": f"{100 * e['topk_share_in_experts']:.1f}%",
                      "ρ(routing, mean score)": _rho(e["mean_score_vs_routing"]),
                      "within layers": _rho((e.get("mean_score_vs_routing_within_layers") or {}).get(
                          "pooled_ranks")),
                      "ρ(routing, top-k share)": _rho(e["topk_share_vs_routing"]),
                      "ρ(mean score, ablation ΔPPL)": _rho(e["mean_score_vs_ablation"])
                      if e.get("mean_score_vs_ablation") else "–",
                      "within layers ": _rho((e.get("mean_score_vs_ablation_within_layers") or {}).get(
                          "pooled_ranks")),
                      "router: mean score / share of top-k": (f"{_f(e['router']['mean_score'], 2)} / "
                                                              f"{100 * e['router']['share']:.2f}%"
                                                              if e["router"] else "–")}
                     for m, e in ex["per_metric"].items()]
        ab = ex.get("ablation")
        abl = ""
        if ab:
            d = np.asarray(ab["dppl"])
            abl_rows = [{"layer": str(L), **{f"expert {i}": _f(v) for i, v in enumerate(row)}} for L, row in
                        enumerate(d)]
            abl = (f"\nEach expert removed in turn (its `w2` zeroed), held-out ΔPPL (base {_f(ab['base_ppl'], 4)}); "
                   f"against routing share: {_rho(ab['vs_routing'])}, within layers "
                   f"{_rho(ab['vs_routing_within_layers']['pooled_ranks'])}:\n\n{_table(abl_rows)}\n")
        sw = ex.get("super_weights")
        sw_text = ""
        if sw:
            sw_rows = [{"layer": c["layer"], "expert": c["expert"], "spike / median output":
                        _f(c["out_over_median"], 0), "routing share": f"{100 * c['routing_share']:.1f}%",
                        "ΔPPL zeroed alone": _f(c["dppl_zero"]) if c.get("dppl_zero") is not None else "–"}
                       for c in sw["candidates"][:8]]
            sw_text = (f"\nSuper-weight candidates in the experts' `w2` (one per expert; the strongest 8; "
                       f"spike vs routing {_rho(sw['spike_vs_routing'])}):\n\n{_table(sw_rows)}\n")
        expert_text = f"""## Experts (the MoE only)
Routing on the first seed's calibration tokens — each expert's share of its layer's (token, slot) pairs
({100 / ex['experts']:.1f}% each if even):

{_table(route_rows)}

Does sensitivity follow routing (Spearman over the {share.size} (layer, expert) pairs)? A busier expert's weights
see more inputs, so its gradient scores grow with routing by construction; the ablation is the test that does not:

{_table(corr_rows)}
{abl}{sw_text}
{img.get('experts_vs_routing.png', '')}
"""
    ran = ("ESA wall times on 2 CPU cores: " + "; ".join(f"{MODELS[n][1]} {s:,.0f} s" for n, s in seconds.items() if s)
           if any(seconds.values()) else "ESAs run before this comparison (their times below)")
    return f"""# Dense vs mixture-of-experts: critical weights of a matched pair trained here

`{command}`

{ran}; this comparison {compare_seconds:.0f} s. The pair: `configs/train_lm.py:stories_llama` and `:stories_moe`
(launch.train_lm, the same {fig['dense']['corpus']} tokens, tokenizer, schedule, attention and width; the Mixtral
has 8 experts of 172 with 2 routed per token where the Llama has one MLP of 344, so both multiply as many weights per
token). Each analysed by its `configs/esa.py` variant: the same scores, top 0.2% per matrix, sign flip against
random-k and bottom-k, pruning, super weights and bit flips, on the last 10% of documents (held out from training).
The main reading is `{MAIN}` (|g·w| per calibration window, Molchanov et al. 2019); α = {ALPHA}; two models are
two cases, not a sample of architectures.

## Claims
{_table(claim_rows)}

## Models
Trained by launch.train_lm (`python -m launch.train_lm --config configs/train_lm.py:<stories_llama|stories_moe>`;
its held-out perplexity over the last 10% of documents, 16k tokens):

{_table(train_rows) if train_rows else "Training records not found beside the checkpoints."}

Analysed (ESA time from the base perplexity on; the ESA's held-out set is the first 32 windows of the same
documents):

{_table(model_rows)}

## Perturbation: sign-flipping the top 0.2% (largest dose) against random-k
{_table(pert_rows)}

## Attention vs MLP
By component, the model-wide top 0.2% (`{MAIN}`): share of it / enrichment (share over share of the weights) /
mean score per weight over the model's mean. The MoE's `mlp` is all its experts; `router` its gating matrices:

{_table(comp_rows)}

{img.get('progression.png', '')}

## Heavy tail
Top 1% mean over the median / Gini:

{_table(tail_rows)}

## Stability
Top-k Jaccard across seeds (disjoint calibration windows):

{_table(stab_rows)}

## Pruning
Perplexity over base after zeroing the lowest-saliency fraction:

{_table(prune_rows)}

{img.get('pruning.png', '')}

{expert_text}
Files: `comparison.json` (every figure above), the plots; each model's own ESA report lies in its run folder.
"""


def _rho(r) -> str:
    return f"{_f(r['rho'], 2)} (p {_p(r['p_value'])})" if r and np.isfinite(r["rho"]) else "–"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/esa_moe", help="where missing ESA runs are made")
    ap.add_argument("--runs", default="", help="dense=folder,moe=folder of finished ESA runs to reuse")
    ap.add_argument("--out", default="experiments/results/esa_moe")
    a = ap.parse_args()
    from wa import report

    folders = fam.run_folders(a.runs, MODELS, a.workdir)
    seconds = {n: fam.run_or_reuse(MODELS[n][0], wd) for n, wd in folders.items()}
    summaries = {n: fam.load(wd) for n, wd in folders.items()}
    if not summaries["moe"].get("experts"):
        raise SystemExit(f"error: {folders['moe']}: not an analysis of a model with experts")
    t = time.time()
    fig = {n: dict(fam.family_figures(s, []), _summary=s) for n, s in summaries.items()}
    comp = {n: components(s) for n, s in summaries.items()}
    ex = expert_figures(summaries["moe"])
    rows = claims(fig, comp, ex)
    os.makedirs(a.out, exist_ok=True)
    files = plot_all(fig, ex, a.out)
    report.write_json(os.path.join(a.out, "comparison.json"), {
        "models": {n: {k: v for k, v in f.items() if k != "_summary"} for n, f in fig.items()},
        "components": comp, "experts": ex, "claims": rows, "runs": folders, "esa_seconds": seconds,
        "training": {n: training(s) for n, s in summaries.items()}})
    command = "python experiments/esa_moe.py" + "".join(
        f" --{k} {v}" for k, v in (("workdir", a.workdir), ("runs", a.runs), ("out", a.out)) if v and (
            k != "workdir" or not a.runs))
    trained = {n: training(s) for n, s in summaries.items()}
    report.write_text(os.path.join(a.out, "report.md"), render(fig, comp, ex, rows, files, command, seconds,
                                                                time.time() - t, trained))
    print(json.dumps({"claims": {r["claim"][:60]: r["verdict"] for r in rows}}))


if __name__ == "__main__":
    main()
