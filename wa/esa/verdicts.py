"""The ESA success criteria, and the verdict of a run's figures against each."""

from __future__ import annotations

import dataclasses

import numpy as np

from wa import report

# Success criteria for critical weight analysis on a real pretrained model: the seed ESA workflow's (written for
# Llama-3.1-8B), stated in reports by what they are.
CRITERIA = {
    "stability": ("top-k stable across seeds", "Jaccard > 0.4"),
    # Two readings of "grad²": the Fisher diagonal g² (a sensitivity) and the squared Taylor term (g·w)².
    "agreement": ("grad×weight vs grad² top-k overlap (Fisher g², and squared Taylor (g·w)²)", "> 0.6"),
    "heavy_tail": ("top 1% scores vs the median", "> 10×"),
    "sign_flip": ("sign-flipping the top-k vs random-k", "ΔPPL ≥ 5× random-k, p < 0.01 across seeds"),
    "dose": ("dose-response", "monotone"),
    "pruning": ("saliency pruning vs magnitude pruning at equal sparsity", "> 15% lower perplexity"),
    # Yu et al. 2024 (The Super Weight in LLMs): zeroing one weight of Llama-7B takes WikiText-2 perplexity
    # from about 5.7 to about 1200, far beyond zeroing the largest-magnitude weights.
    "super_weights": ("zeroing the super-weight candidates vs the same number of largest-magnitude weights",
                      "ΔPPL larger"),
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    criterion: str
    target: str
    metric: str       # which metric, pair or setting the row is about
    measured: str
    met: bool

    def row(self) -> dict:
        return {"criterion": self.criterion, "target": self.target, "metric": self.metric,
                "measured": self.measured, "verdict": "met" if self.met else "not met"}


def verdicts(summary: dict) -> list[Verdict]:
    """The criteria the summary's figures meet or miss, in the report's order."""
    pm = summary["per_metric"]
    rows = []

    def add(key, metric, value, ok):
        what, target = CRITERIA[key]
        rows.append(Verdict(what, target, metric, value, bool(ok)))

    for m, e in pm.items():
        if not np.isnan(e["jaccard_mean"]):
            add("stability", m, f"{e['jaccard_mean']:.3f}", e["jaccard_mean"] > 0.4)
    for pair, v in summary["agreement_overlap"].items():
        if set(pair.split("|")) in ({"grad_x_weight", "grad_squared"}, {"grad_x_weight", "taylor_squared"}):
            add("agreement", pair.replace("|", " vs "), f"{v:.3f}", v > 0.6)
    for m, e in pm.items():
        add("heavy_tail", m, f"{e['heavy_tail_ratio']:.1f}×", e["heavy_tail_ratio"] > 10)
    for m, e in pm.items():
        main = e["perturb_main"]
        # A score that reads no data has one top-k set for every seed: no test across seeds applies to it.
        if main["kind"] == "sign_flip" and e.get("p_value_topk_vs_random") is not None and e.get("reads_data", True):
            ratio, p = e["ratio_topk_vs_random"], e["p_value_topk_vs_random"]
            add("sign_flip", m, f"{report.number(ratio, 1)}×, p = {report.number(p)}", ratio >= 5 and p < 0.01)
    for m, e in pm.items():
        for kind, d in e.get("dose_response", {}).items():
            add("dose", f"{m} ({kind})", "monotone" if d["monotone_increasing"] else "not monotone",
                d["monotone_increasing"])
    gains = summary.get("pruning_gain_vs_magnitude") or {}
    # The criterion is read at 50% sparsity (the nearest measured sparsity if 50% was not run).
    fractions = [x for x in gains if ":" not in x]
    if fractions:
        sp = min(fractions, key=lambda x: abs(float(x) - 0.5))
        for name, by_mode in gains[sp].items():
            for mode, g in by_mode.items():
                add("pruning", f"{name} ({mode}) at {float(sp):.0%}", f"{100 * g:+.1f}%", g > 0.15)
    sw = summary.get("super_weights")
    if sw:
        a, b = sw["dppl_zero_all_candidates"], sw["dppl_zero_largest_magnitude"]
        add("super_weights", f"{sw['n']} candidates", f"ΔPPL {report.number(a)} vs {report.number(b)}", a > b)
    return rows
