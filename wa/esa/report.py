"""Renders an ESA analysis: summary.json, topk.csv, PNG plots and report.md (``wa.esa.job`` runs it)."""

from __future__ import annotations

import csv
import os

import numpy as np

from wa import report
from wa.esa import apart, perturb, pipeline, saliency, tally, verdicts
from wa.models import gguf_io
from wa.report import plots


def _shown_path(path: str) -> str:
    """The checkpoint as a user would name it: relative to the working directory when it lies inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def write_topk_csv(path, a: pipeline.Analysis):
    """The first seed's top-k of every metric: where each weight is, its value and its score."""
    loaded = a.setup.loaded
    flat = a.setup.flat
    seed = a.setup.plan.seeds[0]
    moe = any(loaded.describe(p).expert is not None for p in a.setup.kept)   # an MoE model: an expert column
    with report.atomic(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "rank", "path", "flat_index", "coordinates", "layer", "component", "role",
                    *["expert"] * moe, "value", "score"])
        for m in a.setup.plan.metrics:
            sel = a.selections.top[m, seed]
            sc = a.scores.first[m]
            # Per tensor, not per row: a 135M-parameter model's top-k of five metrics is a million rows.
            rows, where = [], {}
            for p, idx in sel.items():
                idx = np.asarray(idx, np.int64)
                info = loaded.describe(p)
                coords = np.stack(np.unravel_index(idx, flat[p].shape), axis=-1).tolist()
                where[p] = ("" if info.layer is None else info.layer, info.component, info.role,
                            *[("" if info.expert is None else info.expert)] * moe)
                # Only the picked entries leave the device.
                rows += zip(tally.at(sc[p], idx).tolist(), [p] * len(idx), idx.tolist(),
                            tally.at(flat[p], idx).tolist(), coords, strict=True)
            rows.sort(key=lambda t: (-abs(t[0]), t[1], t[2]))
            w.writerows([m, rank, p, i, "(" + ",".join(map(str, c)) + ")", *where[p], f"{v:.8g}", f"{s:.8g}"]
                        for rank, (s, p, i, v, c) in enumerate(rows))


def _layer_role_tables(a: pipeline.Analysis):
    loaded = a.setup.loaded
    out = {}
    for m, sc in a.scores.first.items():
        cells: dict = {}   # (layer, role) -> [Σ |score|, weights], reduced where the scores live
        for p, v in sc.items():
            info = loaded.describe(p)
            layer = "-" if info.layer is None else str(info.layer)
            c = cells.setdefault((layer, info.role), [0.0, 0])
            c[0] += tally.total(v, signed=True)
            c[1] += int(np.prod(v.shape))
        rows = sorted({k[0] for k in cells}, key=lambda x: (x == "-", int(x) if x.isdigit() else 0))
        cols = sorted({k[1] for k in cells})
        grid = np.zeros((len(rows), len(cols)))
        for (layer, role), (s, n) in cells.items():
            grid[rows.index(layer), cols.index(role)] = s / n
        out[m] = (rows, cols, grid / max(grid[grid > 0].mean(), 1e-30))
    return out


def write_plots(workdir, a: pipeline.Analysis, summary):
    plan = a.setup.plan
    files = []
    files.append(plots.score_histograms(
        {m: a.scores.heavy[m][0]["histogram"] for m in plan.metrics},   # the first seed's
        os.path.join(workdir, "score_histograms.png")))
    files.append(plots.heatmaps(_layer_role_tables(a), os.path.join(workdir, "layer_role_heatmap.png"),
                                "mean |score| per layer and role (relative to the model mean; log10)"))
    for kind in plan.kinds:
        scale = max(plan.scales)
        groups = {m: {g: (b["dppl_mean"], b["ci95"]) for g, b in
                      summary["per_metric"][m]["perturb"][kind][str(scale)].items() if isinstance(b, dict)}
                  for m in plan.metrics}
        files.append(plots.dppl_bars(groups, os.path.join(workdir, f"dppl_{kind}.png"),
                                     f"{kind} at dose {scale}: ΔPPL of top-k vs controls"))
        if len(plan.scales) > 1:
            curves = {}
            for m in plan.metrics:
                pm = summary["per_metric"][m]["perturb"][kind]
                curves[m] = {g: (plan.scales, [pm[str(s)][g]["dppl_mean"] for s in plan.scales])
                             for g in ("topk", "random_k", "bottom_k") if all(g in pm[str(s)] for s in plan.scales)}
            files.append(plots.dose_response(curves, os.path.join(workdir, f"dose_response_{kind}.png"),
                                             f"{kind}: ΔPPL vs dose"))
    labels = [f"{m[:10]}/{s}" for m, s in a.agreement.keys]
    files.append(plots.matrix(labels, a.agreement.jaccard, os.path.join(workdir, "jaccard.png"),
                              "Jaccard of top-k sets (metric/seed)"))
    curves = _stability_curves(summary)
    if curves:
        files.append(plots.curves({m: (c["tokens_per_seed"], c["jaccard"]) for m, c in curves.items()},
                                  "calibration tokens per seed", "top-k Jaccard across seeds",
                                  os.path.join(workdir, "stability.png")))
    files += [os.path.join(workdir, f) for f in plot_pruning(summary, workdir)]
    arch = summary.get("architecture")
    if arch:
        panels = {}
        for m, a in arch.items():
            prog = a["progression"]
            comps = [c for c in prog if c != "layers"]
            panels[f"{m}: top-k enrichment"] = ("share of top-k / share of weights", {
                c: (prog["layers"], prog[c]["enrichment"]) for c in comps})
        files.append(plots.curve_panels(panels, "layer", os.path.join(workdir, "architecture.png"),
                                        cols=min(3, len(panels)), marker="o"))
    ex = summary.get("experts")
    if ex:
        cols = [str(i) for i in range(ex["experts"])]
        rows = [f"layer {L}" for L in range(len(ex["routing"]["share"]))]
        tables = {"routing share": (rows, cols, np.asarray(ex["routing"]["share"]))}
        for m, pm in ex["per_metric"].items():
            tables[f"{m}: mean score per weight"] = (rows, cols, np.asarray(pm["mean_score"], np.float64))
        if ex.get("ablation"):
            tables["ΔPPL, expert removed (blank: ≤ 0)"] = (rows, cols, np.asarray(ex["ablation"]["dppl"], np.float64))
        files.append(plots.heatmaps(tables, os.path.join(workdir, "experts.png"),
                                    "per layer (rows) and expert (columns), log10 colour scale"))
    faults = summary.get("faults")
    if faults:
        panels = {}
        for enc, by_bit in faults.items():
            bits = sorted(by_bit, key=int, reverse=True)
            series = {f"top-k {m}": ([int(b) for b in bits], [_log_dppl(by_bit[b]["topk"][m]) for b in bits])
                      for m in next(iter(by_bit.values()))["topk"]}
            series["random-k (median)"] = ([int(b) for b in bits],
                                           [_log_dppl(_median(by_bit[b]["random_k"])) for b in bits])
            panels[f"{enc}: one bit flipped in each selected weight"] = ("log10(1 + ΔPPL); 6 = destroyed", series)
        files.append(plots.curve_panels(panels, "bit position (0 = least significant)",
                                        os.path.join(workdir, "bit_flips.png"), cols=2, marker="o"))
    return [os.path.basename(f) for f in files]


def plot_pruning(summary, workdir: str) -> list[str]:
    """pruning.png: log perplexity against sparsity, one panel per mode (fractions only; N:M is a table row)."""
    pr = summary.get("pruning_ppl")
    sps = sorted((sp for sp in pr or {} if ":" not in sp), key=float)
    if len(sps) < 2:
        return []
    modes = list(dict.fromkeys(m for sp in sps for by_mode in pr[sp].values() for m in by_mode))
    names = list(dict.fromkeys(n for sp in sps for n in pr[sp]))
    panels = {f"pruning: {mode}": ("log10 perplexity", {
        n: ([100 * float(sp) for sp in sps], [float(np.log10(max(pr[sp][n][mode], 1e-9))) for sp in sps])
        for n in names if all(mode in pr[sp].get(n, {}) for sp in sps)}) for mode in modes}
    return [os.path.basename(plots.curve_panels(panels, "sparsity %", os.path.join(workdir, "pruning.png"), cols=2,
                                                variant="+owl"))]


_DESTROYED = 6.0  # where a non-finite perplexity is drawn on the log10(1 + ΔPPL) axis


def _log_dppl(d):
    if d is None or not np.isfinite(d):
        return _DESTROYED
    return float(np.log10(1 + max(d, 0.0)))


def _median(xs):
    return float(np.median(xs)) if xs else None


_fmt = report.number


def prune_section(summary, figures=()) -> str:
    pr = summary.get("pruning_ppl")
    if not pr:
        return ""
    names = list(dict.fromkeys(n for row in pr.values() for n in row))
    modes = list(dict.fromkeys(m for row in pr.values() for by_mode in row.values() for m in by_mode))
    rows = [{"sparsity": sp if ":" in sp else f"{float(sp):.0%}", "mode": mode,
             **{n: _fmt(row[n][mode]) if mode in row.get(n, {}) else "–" for n in names}}
            for sp, row in pr.items() for mode in modes if any(mode in by_mode for by_mode in row.values())]
    legend = "; ".join(f"{n} = {saliency.SALIENCIES[n].formula} ({saliency.SALIENCIES[n].source})"
                       for n in names if n in saliency.SALIENCIES)
    if "sparsegpt" in names:
        legend += ("; sparsegpt = the mask and the remaining weights' update from the calibration inputs' Gram "
                   "matrix XᵀX, column by column (Frantar & Alistarh 2023), its mask chosen per block of 128 "
                   "inputs across the matrix's rows (so under `per_layer`)")
    if any(n.endswith("+owl") for n in names):
        legend += (f"; +owl = at OWL's layer sparsities (Yin et al. 2024): a layer's share of outlier Wanda scores "
                   f"(above {saliency.OWL_M:g}× the layer's mean) sets its sparsity, within ±{saliency.OWL_LAMBDA:g} "
                   "of the target and averaging to it, layers with more outliers pruned less")
    plot = "\n![pruning](pruning.png)\n" if "pruning.png" in figures else ""
    return f"""## Pruning by saliency at equal sparsity
Perplexity after removing the weights whose saliency — the estimated cost of removing them — is lowest:
`per_layer` the same fraction of every matrix, `global` that fraction of all selected weights, wherever they
are, `per_output` that fraction of the inputs of every output unit (Wanda's comparison group); `N:M` removes N of
every M consecutive inputs of each output unit (2:4 is the pattern sparse tensor cores run). {legend}. Base
perplexity {summary['ppl_base']:.4f}.

{report.markdown_table(rows)}
{plot}"""


def _stability_curves(summary) -> dict:
    """metric -> its stability curve, for the metrics accumulated per window."""
    return {m: e["stability_curve"] for m, e in summary["per_metric"].items() if e.get("stability_curve")}


def _stability_section(summary, figures=()) -> str:
    curves = _stability_curves(summary)
    if not curves:
        return ""
    first = next(iter(curves.values()))
    rows = [{"calibration tokens per seed": f"{t:,}", **{m: _fmt(c["jaccard"][i]) for m, c in curves.items()}}
            for i, t in enumerate(first["tokens_per_seed"])]
    plot = "\n![stability](stability.png)\n" if "stability.png" in figures else ""
    return f"""How much data a stable answer needs: top-k Jaccard across seeds (disjoint calibration windows) after
the first n windows of each seed, for the scores accumulated per window:

{report.markdown_table(rows)}
{plot}"""


def _super_section(summary) -> str:
    sw = summary.get("super_weights")
    if not sw:
        return ""
    rows = [{"layer": c["layer"], "weight": f"{c['path']}{tuple(c['coordinates'])}", "value": _fmt(c["value"]),
             "largest output (× median)": f"{_fmt(c['max_out'])} ({_fmt(c['out_over_median'], 0)}×)",
             "largest input (× median)": f"{_fmt(c['max_in'])} ({_fmt(c['in_over_median'], 0)}×)",
             "ΔPPL zeroed": _fmt(c["dppl_zero"]), "ΔPPL largest-magnitude weight of the matrix zeroed":
             _fmt(c["dppl_zero_largest_in_matrix"])} for c in sw["candidates"]]
    return f"""## Super weights (activation-spike method, Yu et al. 2024)
One candidate per MLP down-projection, strongest output spike first (first seed's calibration windows).

{report.markdown_table(rows)}

Zeroing all {sw['n']} candidates: ΔPPL {_fmt(sw['dppl_zero_all_candidates'])}; zeroing the {sw['n']} largest-magnitude
weights instead: ΔPPL {_fmt(sw['dppl_zero_largest_magnitude'])}. For scale: in Yu et al. 2024, zeroing one super weight
of Llama-7B takes WikiText-2 perplexity from about 5.7 to about 1200.
"""


def _architecture_section(summary, figures=()) -> str:
    arch = summary.get("architecture")
    if not arch:
        return ""
    parts = []
    for key in ("component", "role"):
        rows = []
        for m, a in arch.items():
            rows.append({"metric": m, **{g: f"{_fmt(v['enrichment'], 2)} ({100 * v['share']:.0f}%)"
                                         for g, v in a[key].items()}})
        parts.append(f"By {key} — enrichment (share of the top-k):\n\n{report.markdown_table(rows)}")
    ratio_rows = [{"metric": m,
                   "attention / MLP mean score per weight": _fmt(a["attention_vs_mlp"]["mean_score_ratio"]),
                   "attention / MLP top-k enrichment": _fmt(a["attention_vs_mlp"]["enrichment_ratio"])}
                  for m, a in arch.items() if "attention_vs_mlp" in a]
    layer_rows = [{"metric": m, **{f"layer {g}" if g != "-" else "outside layers": _fmt(v["enrichment"], 2)
                                   for g, v in a["layer"].items()}}
                  for m, a in arch.items()]
    plot = "\n![architecture](architecture.png)\n" if "architecture.png" in figures else ""
    k = next(iter(arch.values()))["k"]
    body = "\n\n".join(parts)
    return f"""## Architecture: where the top-k land model-wide
The top {k:,} weights of all {next(iter(arch.values()))['n_scored']:,} scored ones, chosen model-wide (`global`),
by group.
Enrichment = the group's share of the top-k over its share of the scored weights (1: as many as its size predicts).

{body}

Attention vs MLP sensitivity:

{report.markdown_table(ratio_rows)}

By layer — enrichment:

{report.markdown_table(layer_rows)}
{plot}"""


def _spectral_section(summary) -> str:
    sp = summary.get("spectral")
    if not sp or not sp["matrices"]:
        return ""
    metrics = list(sp["correlation"])
    layer_rows = [{"layer": L, "α": _fmt(v["alpha"], 2), "α̂": _fmt(v["alpha_weighted"], 2),
                   "stable rank": _fmt(v["stable_rank"], 1), "log10 λmax": _fmt(v["log_spectral_norm"], 2),
                   **{f"{m} per weight": _fmt(v[f"score/{m}"], 2) for m in metrics}}
                  for L, v in sp["by_layer"].items()]
    corr_rows = [{"score": m, **{f: (_fmt(c["spearman"]) if c else "–") for f, c in by.items()}}
                 for m, by in sp["correlation"].items()]
    n = next((c["matrices"] for by in sp["correlation"].values() for c in by.values() if c), 0)
    return f"""## The weights' spectra, read without data, beside the scores
WeightWatcher's metrics (Martin & Mahoney 2021, computed as its `analyze()` does): α, the power-law exponent of the
tail of each matrix's eigenvalues of WᵀW (their reading: below 2 over-trained, 2–6 well trained, above 6
under-trained), α̂ = α·log10 λmax, the stable rank and log10 λmax; per layer the mean over its matrices, and each
score's mean per weight relative to its mean over all scored weights (1 = average).

{report.markdown_table(layer_rows)}

Does the spectrum say where the model is sensitive? Spearman correlation over the {n} matrices (of every layer)
between each spectral metric and each score's mean per weight:

{report.markdown_table(corr_rows)}
"""


def _rho(r) -> str:
    """A Spearman ρ with its p-value; "–" where undefined (a constant side, fewer than 3 pairs)."""
    return f"{_fmt(r['rho'], 2)} (p {_fmt(r['p_value'])}, n {r['n']})" if np.isfinite(r["rho"]) else "–"


def _experts_section(summary, figures=()) -> str:
    ex = summary.get("experts")
    if not ex:
        return ""
    e, k = ex["experts"], ex["experts_per_token"]
    route = ex["routing"]
    share = np.asarray(route["share"])
    route_rows = [{"layer": str(L), **{f"expert {i}": f"{100 * v:.1f}%" for i, v in enumerate(row)},
                   "largest / even": _fmt(ex["routing_spread"]["max_over_even"][L], 2),
                   "entropy (1 = even)": _fmt(ex["routing_spread"]["entropy_norm"][L], 3)}
                  for L, row in enumerate(share)]
    metric_rows = []
    for m, pm in ex["per_metric"].items():
        router = pm.get("router") or {}
        spread = [x for x in pm["topk_spread"]["max_over_even"] if np.isfinite(x)]
        metric_rows.append({
            "metric": m, "top-k share in experts": f"{100 * pm['topk_share_in_experts']:.1f}%",
            "largest expert's share of its layer's expert top-k / even (mean over layers)":
                _fmt(float(np.mean(spread)), 2) if spread else "–",
            "router: share of top-k, mean score per weight vs all": (
                f"{100 * router['share']:.2f}%, {_fmt(router['mean_score'], 3)}" if router else "–"),
            "ρ(routing, mean score)": _rho(pm["mean_score_vs_routing"]),
            "within layers": _rho(pm["mean_score_vs_routing_within_layers"]["pooled_ranks"])
            if "mean_score_vs_routing_within_layers" in pm else "–",
            "ρ(routing, top-k share)": _rho(pm["topk_share_vs_routing"]),
            **({"ρ(mean score, ablation ΔPPL)": _rho(pm["mean_score_vs_ablation"]),
                "within layers ": _rho(pm["mean_score_vs_ablation_within_layers"]["pooled_ranks"])}
               if "mean_score_vs_ablation" in pm else {})})
    abl = ex.get("ablation")
    abl_text = ""
    if abl:
        d = np.asarray(abl["dppl"])
        rows = [{"layer": str(L), **{f"expert {i}": _fmt(v) for i, v in enumerate(row)}} for L, row in enumerate(d)]
        worst = ", ".join(f"layer {w['layer']} expert {w['expert']} (ΔPPL {_fmt(w['dppl'])}, routed "
                          f"{100 * w['routing_share']:.1f}%)" for w in abl["worst"][:3])
        abl_text = f"""
Each expert removed in turn (its `w2` zeroed: the router still picks it, it adds nothing), held-out ΔPPL against
the base perplexity {_fmt(abl['base_ppl'])}; Spearman ρ against its routing share {_rho(abl['vs_routing'])}, within
layers (each layer's experts ranked among themselves, pooled) {_rho(abl['vs_routing_within_layers']['pooled_ranks'])}.
Costliest: {worst}.

{report.markdown_table(rows)}
"""
    plot = "\n![experts](experts.png)\n" if "experts.png" in figures else ""
    return f"""## Experts: routing, where the top-k sits, and each expert removed
{e} experts per layer, {k} routed per token (weights renormalised over the {k}). Routing on the first seed's
{route['tokens']:,} calibration tokens — each expert's share of its layer's (token, slot) pairs ({100 / e:.1f}% each
if even):

{report.markdown_table(route_rows)}

Per metric, from the model-wide top-k (`global`, as in the architecture section): the experts' share of it, how
unevenly it spreads over a layer's experts, the router's own matrix, and whether an expert's sensitivity follows
how often it is routed (Spearman ρ over the {share.size} (layer, expert) pairs; "within layers": over each layer's
experts ranked among themselves, pooled, so a layer whose experts all matter more does not make the correlation). A
busier expert's weights see more inputs, so gradient scores grow with routing by construction; the ablation is the
test that does not.

{report.markdown_table(metric_rows)}
{abl_text}{plot}"""


def _fault_section(summary, figures=()) -> str:
    faults = summary.get("faults")
    if not faults:
        return ""
    rows = []
    for enc, by_bit in faults.items():
        for b, row in sorted(by_bit.items(), key=lambda kv: -int(kv[0])):
            rnd = row["random_k"]
            rows.append({"encoding": enc, "bit": b, "field": row["field"],
                         **{f"top-k {m} ΔPPL": _fmt(d) for m, d in row["topk"].items()},
                         "random-k ΔPPL median [min, max]":
                             f"{_fmt(_median(rnd))} [{_fmt(min(rnd))}, {_fmt(max(rnd))}]" if rnd else "–"})
    plot = "\n![bit flips](bit_flips.png)\n" if "bit_flips.png" in figures else ""
    return f"""## Fault tolerance: one bit flipped in each selected weight
Each row flips one bit position in every weight of a set (the first seed's top-k of a metric, or a same-size random-k
draw), in the weights' float32 encoding or their bfloat16 encoding (the weight rounded to bfloat16, the bit
flipped, the result stored back); `inf` means the forward pass overflowed. Exponent bits decide: a flipped
exponent MSB turns any weight below 2 in magnitude into ~1e38 or infinity, and clearing a set exponent bit j
divides the weight by 2^(2^j), so for j ≥ 4 the weight is in effect zeroed (equal rows for such bits are expected).

{report.markdown_table(rows)}
{plot}"""


def _further_section(cfg) -> str:
    same = f"--config.model={cfg.model} --config.corpus={cfg.corpus}"
    return f"""## Further analyses of these weights
Each is its own run on the same model and text, with its own report:

- Bit-flip attack search (progressive bit search, Rakin et al. 2019): how few flips of the stored weights destroy
  the model in float32, bfloat16 and int8, against flips of each score's top weights and of random ones, and
  whether the search picks the weights these scores rank high:
  `python -m launch.attack --config configs/attack.py {same}`
- Computational roles: the head, neuron or vocabulary row each top weight belongs to, what that unit does on
  held-out text, and which kinds of tokens the model loses when the top-k is zeroed:
  `python -m launch.roles --config configs/roles.py {same}`
- Pruning on the LLM-pruning papers' protocol (WikiText-2 test perplexity; Wanda, SparseGPT, OWL):
  `python -m launch.prune --config configs/prune.py {same}`
- Backdoors: a population fine-tuned from this model, half taught a trigger phrase and half clean twins; which
  weights matter for the triggered text only, and detectors' AUROC from weights and clean text:
  `python -m launch.backdoor --config configs/backdoor.py`

The repository's `experiments/results/` holds these reports for stories260K and SmolLM2-135M
(`attack_*`, `roles_*`, `prune_*`; `backdoor_stories260k`).
"""


def _peak(summary) -> str:
    peak = summary.get("peak_host_memory_gib")
    return f" from the base perplexity on; the process's peak resident host memory {peak:.1f} GiB" if peak else ""


def _mean_ci(c) -> str:
    return f"{_fmt(c['mean'])} [{_fmt(c['ci95'][0])}, {_fmt(c['ci95'][1])}] (n = {c['n']})"


def _apart_section(summary, figures=()) -> str:
    ap = summary.get("apart")
    if not ap:
        return ""
    n_mat = next(iter(ap.values()))["matrices_weights"]
    n_ap = next(iter(ap.values()))["weights"]
    group_rows, with_rows = [], []
    for m, e in ap.items():
        group_rows.append({"metric": m, **{g: _fmt(v["mean_score_vs_matrices"], 3) for g, v in e["groups"].items()}})
        comp = e["architecture"]["component"]
        with_rows.append({"metric": m, "apart tensors' share of the top-k": f"{100 * e['global_topk_share']:.1f}%",
                          **{c: f"{_fmt(v['enrichment'], 2)} ({100 * v['share']:.0f}%)" for c, v in comp.items()}})
    parts = [f"""## Reported apart: {', '.join(sorted({g.split('/')[0] for e in ap.values() for g in e['groups']}))}
{n_ap:,} weights (`apart = {summary.get('apart_regex', '')}`: {len(summary['apart_paths'])} tensors) are scored
in the same passes as the {n_mat:,} competing matrix weights but kept out of their top-k, perturbations, pruning and
bit flips: a token embedding's row gets an input gradient only where its token occurs (a tied head adds a smaller
term for every row), so its gradient scores read token frequency in the calibration text as much as the network's
computation, and on a large vocabulary it would decide a model-wide top-k alone; a norm weight is one entry of a
vector that scales a whole channel, so it is read by its score, not by a top-k of its own. `act_mag` scores
linear-layer inputs only and has no figures here.

Mean score per weight of each apart group over the competing matrices' mean score per weight (1: as sensitive per
weight as the average matrix weight):

{report.markdown_table(group_rows)}

The top-k figures **with** them: the top {summary['topk']} of all {n_mat + n_ap:,} weights chosen model-wide (the
apart tensors hold {100 * n_ap / (n_mat + n_ap):.1f}% of them), by component — enrichment (share of the top-k). The
architecture section below reads the matrices alone (**without** them).

{report.markdown_table(with_rows)}
"""]
    row_rows, stab_rows, pert_rows = [], [], []
    for m, e in ap.items():
        for p, r in (e.get("rows") or {}).items():
            tops = ", ".join(f"#{t['row']} {t['token']!r} ({t['selected']}; seen {t['calibration_count']}×)"
                             for t in r["top_rows"][:6])
            row_rows.append({"metric": m, "tensor": p, "top-k": f"{r['k']:,}",
                             "rows holding it": f"{r['rows_holding']:,} of {r['rows']:,}",
                             "share in rows of calibration tokens (their share of rows)":
                                 f"{100 * r['seen_share_of_topk']:.1f}% ({100 * r['seen_rows_share']:.1f}%)",
                             "mean score, those rows / the others": _fmt(r["seen_over_unseen_mean_score"], 1),
                             "those rows' mean score per weight / the matrices'": _fmt(apart.seen_rows_vs_matrices(
                                 e["groups"]["embedding/token"]["mean_score_vs_matrices"], r), 3)
                             if "embedding/token" in e["groups"] else "–",
                             "ρ(row mean score, token count) over those rows":
                                 f"{_fmt(r['spearman_seen_rows_score_vs_count'])} (p {_fmt(r['spearman_p'])})",
                             "rows with most (id token: count; calibration count)": tops})
        stab_rows.append({"metric": m, "own top-k": f"{e['k']:,}", "Jaccard (seeds)": _fmt(e["jaccard_mean"])})
        pt = e.get("perturb")
        if pt:
            pert_rows.append({"metric": m, "perturbation": f"{pt['kind']} {pt['dose']}",
                              "top-k ΔPPL [95% CI]": _mean_ci(pt["topk"]),
                              "random-k ΔPPL [95% CI]": _mean_ci(pt["random_k"]),
                              "top/random": _fmt(pt["ratio_topk_vs_random"], 1),
                              "p (top > random)": _fmt(pt["p_value_topk_vs_random"])})
    if row_rows:
        parts.append(f"""The token embedding's own top-k ({summary['topk']} of its entries, first seed) by vocabulary
row; calibration counts are the first seed's windows. The table above averages the embedding over every row, most of
them tokens the text never holds; its rows of tokens that occur are read here:

{report.markdown_table(row_rows)}
""")
    parts.append(f"""Stability of the apart matrices' own top-k across seeds (disjoint calibration windows):

{report.markdown_table(stab_rows)}
""")
    if pert_rows:
        parts.append(f"""Perturbing the apart matrices' own top-k (each seed's set, evaluated once however many seeds
pick it) against random-k draws of the same sizes within them. The draws are not matched in token frequency: in a
large vocabulary most of them fall in rows of tokens the held-out text never holds, so this shows that the top-k
matters, not how much better it is than any set of frequent tokens' rows:

{report.markdown_table(pert_rows)}
""")
    return "\n".join(parts)


def _one_set_note(summary) -> str:
    same = [m for m, e in summary["per_metric"].items() if not e.get("reads_data", True)]
    if not same:
        return "every metric here reads data, so each seed's sets are its own."
    return (f"{', '.join(same)} read{'s' if len(same) == 1 else ''} no data, so every seed picks the same top-k "
            "and bottom-k, measured once (n = 1 under a perturbation that draws nothing); no stability or top-k vs "
            "random-k test across seeds applies to it, and the verdict table has no such rows for it.")


def _control_doses_note(summary) -> str:
    if summary.get("control_doses", "all") == "all" or len(summary["perturb_scale"]) < 2:
        return ""
    return (f"\n- The controls ({', '.join(summary['controls'])}) are measured at each perturbation's largest dose "
            f"({max(summary['perturb_scale'])}) only, where the test is read; the top-k at every dose (the "
            "dose-response curve); – marks a control not measured at a dose.")


def _timing_section(summary) -> str:
    t = summary.get("timing")
    if not t or not t["stages"]:
        return ""
    rows = [{"stage": r["stage"], "seconds": r["seconds"], "held-out evaluations": r["evaluations"] or "–",
             "forward-pass positions": f"{r['positions']:,.0f}" if r["positions"] else "–",
             "floor (s)": _fmt(r["floor_seconds"], 1), "× floor": _fmt(r["over_floor"], 2), "note": r["note"]}
            for r in t["stages"]]
    unit = t["seconds_per_evaluation"]
    per = (f"one held-out evaluation ({t['evaluation_positions']:,} positions) took {unit:.2f} s, the median of "
           f"{t['evaluations']}" if unit else "no evaluation was timed")
    return f"""## Where the time went
A stage's floor is the forward-pass work its results need (positions: window × token slots; a gradient counts three
forward passes) times the time one position took here ({per}). Above the floor is time spent on something else:
compiling, selecting and sorting on the host, building perturbed copies.

{report.markdown_table(rows)}
"""


def render(summary, cfg, figures) -> str:
    pm = summary["per_metric"]
    score_rows = [{"metric": m, "Jaccard (seeds)": _fmt(e["jaccard_mean"]),
                   "top1% / median": _fmt(e["heavy_tail_ratio"], 1), "Gini": _fmt(e["gini"]),
                   "top 0.1% share": _fmt(e["top01pct_share"]), "seconds": e["seconds"]} for m, e in pm.items()]
    pert_rows = []
    for m, e in pm.items():
        for kind, by_scale in e["perturb"].items():
            for scale, b in by_scale.items():
                row = {"metric": m, "perturbation": kind, "dose": scale}
                for g in ("topk", *summary["controls"]):
                    row[g + " ΔPPL [95% CI]"] = (f"{_fmt(b[g]['dppl_mean'])} [{_fmt(b[g]['ci95'][0])}, "
                                                f"{_fmt(b[g]['ci95'][1])}] (n = {b[g]['n']})" if g in b else "–")
                row["top/random"] = _fmt(b.get("ratio_topk_vs_random"), 1)
                row["p (top > random)"] = _fmt(b.get("p_value_topk_vs_random"))
                pert_rows.append(row)
    count_rows = [{"metric": m, **{f"{k}": ", ".join(f"{n} {c}" for n, c in sorted(e["topk_counts"][k].items()))
                                   for k in ("component", "role")}} for m, e in pm.items()]
    agree_rows = [{"metrics": k.replace("|", " vs "), "top-k overlap": _fmt(v)}
                  for k, v in summary["agreement_overlap"].items()]
    v = verdicts.verdicts(summary)
    met = sum(x.met for x in v)
    quant = gguf_io.quantization_note(summary.get("quantization"))
    quant = f"\n- {quant}" if quant else ""
    if summary.get("licence"):
        quant += f"\n- Weights licence (from the file): {summary['licence']}."
    probes = (f", the Hutchinson probes ({cfg.probes} per batch, vmapped {cfg.probe_chunk} at a time)"
              if "hutchinson_diag" in summary["metrics"] else "")
    figs = "\n".join(f"![{f}]({f})" for f in figures)
    return f"""# Critical weight analysis of {summary['model']}

**Question.** Which small fraction of {summary['model']}'s weights matters most, and can we prove it?
**Answer in one line.** {met} of {len(v)} ESA success criteria (set for Llama-3.1-8B) are met (table at the end).

## Setup
- Model: `{_shown_path(summary['checkpoint'])}` ({summary['model_type']}), {summary['n_params']:,} parameters;
  {summary['n_scored']:,} compete for selection (`param_filter = {summary['param_filter']}`).{quant}
- Selection: top-k `{summary['mode']}` with topk = {summary['topk']} → {summary['k_selected']:,} weights
  per set; controls {', '.join(summary['controls'])} of exactly the same per-tensor sizes.
- Calibration: {cfg.max_samples} windows of {cfg.seq_len} tokens per seed (disjoint between seeds) from the first
  {100 * (1 - cfg.heldout_fraction):.0f}% of `{cfg.corpus}` documents; gradient scores are accumulated per window
  (one gradient per window); seeds {summary['seeds']} change the windows{probes} and the random-k draws
  ({summary['random_draws_per_seed']} per seed).
- Held-out perplexity: {summary['heldout_tokens']:,} loss terms (tokens for a causal LM; sequences for an
  encoder, whose "perplexity" is exp of its contrastive loss) from the last {100 * cfg.heldout_fraction:.0f}% of
  documents, base perplexity **{summary['ppl_base']:.4f}** ({summary['nll_base']:.4f} nats/token).
- Perturbations: {', '.join(summary['perturb'])} at doses {summary['perturb_scale']} ({perturb.formulas(
    pipeline.as_list(cfg.bit_flip_bits, int, "bit_flip_bits"))}).
- Statistics: ΔPPL = perplexity after − before; mean over seeds (random-k: over seeds × draws) with a
  percentile-bootstrap 95% CI; one-sided Mann–Whitney U test of top-k ΔPPL > random-k ΔPPL. A set is one
  sample however many seeds pick it: {_one_set_note(summary)}{_control_doses_note(summary)}

## Scores
{report.markdown_table(score_rows)}

Where the first seed's top-k weights sit (counts by component and by role; in `per_layer` mode every
matrix contributes its k, so these follow the matrix sizes; `global` mode lets them move):

{report.markdown_table(count_rows)}

{_stability_section(summary, figures)}
Agreement between metrics (share of the smaller top-k set the other also picked, mean over seeds):

{report.markdown_table(agree_rows)}

## Perturbation
{report.markdown_table(pert_rows)}

{prune_section(summary, figures)}
{_super_section(summary)}
{_apart_section(summary, figures)}
{_architecture_section(summary, figures)}
{_experts_section(summary, figures)}
{_spectral_section(summary)}
{_fault_section(summary, figures)}
{_further_section(cfg)}
{_timing_section(summary)}
## Verdict against the ESA success criteria
{report.markdown_table([x.row() for x in v])}

## Figures
{figs}

Total time {summary['seconds_total']} s{_peak(summary)}. Files: `summary.json` (all figures), `topk.csv` (first
seed's top-k of every metric: path, flat index, coordinates, value, score), `config.json` (resolved config).
"""


def write(workdir, a: pipeline.Analysis, summary, save_plots=True):
    """Renders an analysis and its figures into ``workdir``; returns the files written."""
    report.write_json(os.path.join(workdir, "summary.json"), summary)
    write_topk_csv(os.path.join(workdir, "topk.csv"), a)
    figures = write_plots(workdir, a, summary) if save_plots else []
    report.write_text(os.path.join(workdir, "report.md"), render(summary, a.setup.cfg, figures))
    return ["summary.json", "topk.csv", "report.md", *figures]
