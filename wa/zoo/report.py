"""zoo_summary.json's companion: distributions of the zoo's properties as PNGs and a markdown report."""

from __future__ import annotations

import os

import numpy as np

from wa import report
from wa.eval import reliability
from wa.report import plots


def write(zoo, summary: dict, out_dir: str) -> str:
    md = zoo.metadata
    final = zoo.final()
    by_family = {f: g for f, g in final.groupby("family")}
    plots.distributions({f: g["test_acc"].to_numpy() for f, g in by_family.items()},
                        {f: g["gen_gap"].to_numpy() for f, g in by_family.items()},
                        os.path.join(out_dir, "distributions.png"))
    plots.scatter_by_group({f: (g["train_acc"].to_numpy(), g["test_acc"].to_numpy()) for f, g in by_family.items()},
                           "train accuracy", "test accuracy", os.path.join(out_dir, "train_vs_test.png"))
    roots = md[md["generation"] == 0]
    curves = {}
    for f, g in roots.groupby("family"):
        med = g.groupby("epoch")["test_acc"].median()
        curves[f] = (med.index.tolist(), med.tolist())
    plots.curves(curves, "epoch", "median test accuracy (roots)", os.path.join(out_dir, "development.png"))
    rows = []
    for col in ("test_acc", "gen_gap", "ece", "disparity_range", "fgsm_acc_0.1", "pgd_acc_0.1", "noise_acc_0.3"):
        if col in final:
            s = final[col]
            rows.append({"property": col, **{q: f"{s.quantile(v):.3f}" for q, v in
                                             (("min", 0), ("5%", .05), ("25%", .25), ("median", .5), ("75%", .75),
                                              ("95%", .95), ("max", 1))}})
    rel_rows = []
    for col in ("test_acc", "gen_gap", "disparity_std", "ece", "fgsm_acc_0.1", "pgd_acc_0.1", "noise_acc_0.3",
                "train_acc"):
        r = reliability.of_column(final, col)
        if r is not None:
            rel_rows.append({"property": col, "half-half r": f"{r['half_r']:.3f}",
                             "reliability ρ (R² ceiling)": f"{r['reliability']:.3f}",
                             "τ ceiling": f"{r['tau_ceiling']:.3f}"})
    rel = ("" if not rel_rows else "\n## How reliably each property is measured\nEvery property measured again on "
           "each of two disjoint, class-stratified halves of the evaluation images; r is their correlation across the "
           "final checkpoints, ρ = 2r / (1 + r) (Spearman–Brown) the reliability of the full measurement: no learner "
           "can explain more than ρ of its variance (R²) or rank it better than τ = (2/π)·arcsin(√ρ).\n\n"
           + report.markdown_table(rel_rows) + "\n")
    arch_rows = [{"architecture": a, "models": int(len(g)), "params": int(g["n_params"].iloc[0]),
                  "test acc median": f"{g['test_acc'].median():.3f}",
                  "gen gap median": f"{g['gen_gap'].median():.3f}"} for a, g in final.groupby("arch_id")]
    cost = summary.get("cost_per_arch", {})
    cost_rows = [{"architecture": a, "models trained": v["models"], "s / model": f"{v['seconds_per_model']:.3f}",
                  "s / model-epoch (training + properties)": f"{v['seconds_per_model_epoch']:.4f}"}
                 for a, v in sorted(cost.items())]
    bd_rows = [{"family": f, "side": side, "models": v["models"],
                "backdoor success median (5%–95%)": f"{v['backdoor_success']['q50']:.3f} "
                                                    f"({v['backdoor_success']['q05']:.3f}–{v['backdoor_success']['q95']:.3f})",
                "without the trigger (median)": f"{v['backdoor_clean_rate']['q50']:.3f}",
                "test acc median": f"{v['test_acc']['q50']:.3f}"}
               for f, sides in sorted(summary.get("backdoor", {}).items()) for side, v in sorted(sides.items())]
    b = zoo.info["config"].get("backdoor") or {}
    bd = ("" if not bd_rows else "\n## Backdoors\nBadNets (Gu et al. 2017): each backdoored model had a share "
          f"{sorted(set(zoo.plan['backdoor']) - {0.0})} of its training pool stamped with a {b.get('patch')}x"
          f"{b.get('patch')} checkerboard {b.get('margin')} px from the bottom-right corner and relabelled to its "
          "target class. Backdoor success: the share of test images of other classes that the model sends to its "
          "target once the trigger is stamped on (clean models: to the target drawn for them, the control); "
          "without the trigger: the same share on the unstamped images (a bias towards the target, not the "
          "trigger).\n\n"
          + report.markdown_table(bd_rows) + "\n")
    mps = summary.get("models_per_second")
    text = f"""# Model zoo: {zoo.info['data']['name']}

{summary['n_models']} models ({summary['n_planned']} planned), {summary['n_checkpoints']} model checkpoints
(checkpoints per model: {summary['checkpoints_per_model']}), {summary['family_trees']} family trees
({summary['family_trees_3_generations']} with 3 or more generations). Families: {summary['families']}.
Generations: {summary['generations']}.

This run trained {summary.get('trained_this_run')} models in {summary.get('seconds_this_run', 0):.0f} s
({'n/a' if mps is None or np.isnan(mps) else f'{mps:.2f}'} models/s, properties at every checkpoint included).

## Spread of the final checkpoints
{report.markdown_table(rows)}

![distributions](distributions.png)
![train vs test](train_vs_test.png)
![development](development.png)
{rel}{bd}
## Architectures
{report.markdown_table(arch_rows)}

## Cost (this run)
{report.markdown_table(cost_rows) if cost_rows else 'Nothing trained in this run (everything was already done).'}

Data: {zoo.info['data']}. Store: `{zoo.path}` (`wa.zoo.store.Zoo.open`).
"""
    path = os.path.join(out_dir, "report.md")
    report.write_text(path, text)
    return path
