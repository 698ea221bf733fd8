"""Where the important weights sit: top-k chosen model-wide, read by layer, component and role.

In ``per_layer`` mode every matrix contributes its k, so counts follow the matrix sizes and say nothing about
the architecture. Here the top-k is chosen over all scored weights at once (``global`` mode), and each group
(a layer, a component such as attention or MLP, a role such as q or down; in a mixture-of-experts model also an
expert index over layers and each layer's expert) is read three ways:

- ``share``: its fraction of the top-k;
- ``enrichment``: that share over its share of the scored weights (1 = as many as its size predicts);
- ``mean_score``: its mean score per weight relative to the mean over all scored weights.

The attention-vs-MLP sensitivity ratio is the attention mean score per weight over the MLP's (and the same ratio
of enrichments). This is the architecture analyzer of the seed ESA workflow.
"""

from __future__ import annotations

import numpy as np

from wa.esa import select, tally

GROUPS = ("layer", "component", "role")


def _label(info, key: str) -> str:
    if key == "layer":
        return "-" if info.layer is None else str(info.layer)
    if key == "expert":   # an MoE expert's index, over layers; "-" for every matrix outside the experts
        return "-" if info.expert is None else str(info.expert)
    if key == "layer_expert":
        return "-" if info.expert is None else f"{info.layer}/{info.expert}"
    return getattr(info, key)


def _order(labels):
    def key(x):
        nums = x.split("/")
        return (not all(n.isdigit() for n in nums), [int(n) for n in nums if n.isdigit()], x)
    return sorted(labels, key=key)


def analyze(scores: dict, describe, topk, signed: bool = False, parts=None) -> dict:
    """Global top-k of ``scores`` ({path: array}, the scored matrices) grouped by layer, component and role.

    ``describe(path)`` gives each path's layer, component and role (``Loaded.describe``). ``parts(path, shape)``
    (``Loaded.parts``), where given, splits a fused matrix — Phi-3's ``qkv_proj`` and ``gate_up_proj``,
    GPT-NeoX's ``query_key_value``, GPT-2's ``c_attn`` — into the roles of its rows, so the role table reads q, k
    and v (gate and up) for every family alike.
    """
    sel, _ = select.top_k(scores, topk, "global", r".", signed)
    k = select.size(sel)
    sizes, sums, pieces = {}, {}, []   # pieces: (path, role, weights, score sum, selected)
    for p, v in scores.items():
        # Sums reduced where the scores live: only a figure per matrix (per row of a fused one) reaches the host.
        shape = tuple(v.shape)
        size = int(np.prod(shape))
        split = parts(p, shape) if parts is not None else None
        if split is None:
            sizes[p], sums[p] = size, tally.total(v, signed)
            pieces.append((p, describe(p).role, size, sums[p], len(sel.get(p, ()))))
            continue
        axis, labels = split
        per_row = tally.along(v, axis, signed)
        sizes[p], sums[p] = size, float(per_row.sum())
        picked = np.unravel_index(np.asarray(sel.get(p, ()), np.int64), shape)[axis]
        for role in dict.fromkeys(labels):
            rows = labels == role
            pieces.append((p, role, int(rows.sum()) * (size // shape[axis]), float(per_row[rows].sum()),
                           int(rows[picked].sum())))
    n_all, s_all = sum(sizes.values()), sum(sums.values())
    mean_all = s_all / n_all if n_all else 0.0
    out: dict = {"k": k, "n_scored": n_all}
    moe = any(describe(p).expert is not None for p in scores)
    for key in GROUPS + (("expert", "layer_expert") if moe else ()):
        rows: dict = {}
        for p, role, n, total, chosen in pieces:
            g = role if key == "role" else _label(describe(p), key)
            r = rows.setdefault(g, {"selected": 0, "weights": 0, "score_sum": 0.0})
            r["selected"] += chosen
            r["weights"] += n
            r["score_sum"] += total
        table = {}
        for g in _order(rows):
            r = rows[g]
            share, size_share = r["selected"] / k, r["weights"] / n_all
            table[g] = {"selected": r["selected"], "weights": r["weights"], "share": share,
                        "enrichment": share / size_share,
                        "mean_score": (r["score_sum"] / r["weights"]) / mean_all if mean_all > 0 else float("nan")}
        out[key] = table
    comp = out["component"]
    if "attention" in comp and "mlp" in comp:
        out["attention_vs_mlp"] = {
            "mean_score_ratio": comp["attention"]["mean_score"] / comp["mlp"]["mean_score"],
            "enrichment_ratio": (comp["attention"]["enrichment"] / comp["mlp"]["enrichment"]
                                 if comp["mlp"]["enrichment"] > 0 else float("inf"))}
    # Layer by layer, attention and MLP apart: the progression plot's lines.
    by_lc: dict = {}
    for p in scores:
        info = describe(p)
        if info.layer is None:
            continue
        r = by_lc.setdefault((info.layer, info.component), [0, 0, 0.0])
        r[0] += len(sel.get(p, ()))
        r[1] += sizes[p]
        r[2] += sums[p]
    layers = sorted({lc[0] for lc in by_lc})
    out["progression"] = {"layers": layers, **{
        comp_name: {"enrichment": [(by_lc[L, comp_name][0] / k) / (by_lc[L, comp_name][1] / n_all)
                                   if (L, comp_name) in by_lc else float("nan") for L in layers],
                    "mean_score": [(by_lc[L, comp_name][2] / by_lc[L, comp_name][1]) / mean_all
                                   if (L, comp_name) in by_lc and mean_all > 0 else float("nan") for L in layers]}
        for comp_name in sorted({lc[1] for lc in by_lc})}}
    return out
