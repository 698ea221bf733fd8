"""A mixture-of-experts model read expert by expert (the seed's "expert vs non-expert analysis for MoE").

Each expert's matrices are ordinary parameters (``block_sparse_moe/experts/3/w1/kernel``), so every metric, the
top-k, the perturbations and the pruning already treat them as they treat a dense MLP's; the architecture
analysis groups them by expert too. What only an MoE model has is read here:

- **routing**: on the first seed's calibration windows, the share of each layer's (token, slot) pairs that went
  to each expert (1/E each if the router spread tokens evenly) and the mean router probability it got;
- **where the top-k sits**: each (layer, expert)'s share of the model-wide top-k and its mean score per weight
  (from the architecture analysis), how unevenly the top-k spreads over a layer's experts (the largest expert's
  share of the layer's expert top-k over 1/E; the normalised entropy, 1 = even);
- **ablation**: held-out ΔPPL with one expert removed (its ``w2`` zeroed, so it adds nothing where the router
  picks it, the router itself unchanged): what each expert is worth as a whole;
- **does sensitivity follow routing**: Spearman ρ over the (layer, expert) pairs between the routing share and
  each of the mean score per weight, the top-k share and the ablation ΔPPL; and within layers (each layer's
  experts ranked among themselves), so that a layer whose experts all matter more does not make the correlation.
  An expert the router sends more tokens gathers more gradient by construction (its weights see more inputs), so
  a high ρ for the gradient metrics is expected; the ablation says whether the experts that matter are the busy
  ones.

The router's own matrix (component ``router``) competes in the top-k like any matrix; its row in the
architecture tables is its sensitivity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sp_stats


def count(loaded) -> int:
    """The model's experts per layer (0: a dense model)."""
    return int(getattr(loaded.model, "experts", 0) or 0)


def down_paths(loaded, flat) -> dict[tuple[int, int], str]:
    """(layer, expert) -> the expert's output matrix (role ``down``)."""
    out = {}
    for p in flat:
        info = loaded.describe(p)
        if info.expert is not None and info.role == "down" and p.endswith("kernel"):
            out[info.layer, info.expert] = p
    return dict(sorted(out.items()))


def routing(loaded, params, batches) -> dict:
    """How the router spread the real tokens of ``batches``: per layer and expert, the (token, slot) pairs routed
    (``pairs``), their share of the layer's pairs (``share``; 1/E if even) and the mean router probability over
    the tokens (``prob_mean``)."""
    model = loaded.model

    def build():
        @jax.jit
        def step(params, batch):
            return model.routing(params, batch)
        return step

    step = loaded.compiled(("esa/routing",), build)
    pairs = probs = None
    tokens = 0.0
    for batch in batches:
        c, p, n = step(params, batch)
        c, p = np.asarray(c, np.float64), np.asarray(p, np.float64)
        pairs, probs = (c, p) if pairs is None else (pairs + c, probs + p)
        tokens += float(n)
    k = loaded.model.spec.experts_per_token
    return {"tokens": int(tokens), "experts_per_token": k, "pairs": pairs.astype(np.int64).tolist(),
            "share": (pairs / max(tokens * k, 1.0)).tolist(), "prob_mean": (probs / max(tokens, 1.0)).tolist()}


def _spearman(x, y) -> dict:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"rho": float("nan"), "p_value": float("nan"), "n": int(ok.sum())}
    r = sp_stats.spearmanr(x[ok], y[ok])
    return {"rho": float(r.statistic), "p_value": float(r.pvalue), "n": int(ok.sum())}


def _within_layers(x, y) -> dict:
    """Spearman ρ of ``x`` and ``y`` [layers, experts] within each layer: its mean over the layers where it is
    defined, and ρ over every pair of the two within-layer ranks pooled (ties share their mean rank; a layer-wide
    effect, e.g. every expert of the first layer mattering more, cancels). The pooled p-value treats the pairs as
    independent, though each layer's ranks are fixed up to order: read it as optimistic."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    per = [_spearman(a, b)["rho"] for a, b in zip(x, y, strict=True)]
    rank = lambda v: sp_stats.rankdata(v, axis=1)  # noqa: E731
    ok = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    pooled = _spearman(rank(x[ok]).ravel(), rank(y[ok]).ravel()) if ok.any() else _spearman([], [])
    defined = [r for r in per if np.isfinite(r)]
    return {"per_layer": per, "mean_rho": float(np.mean(defined)) if defined else float("nan"),
            "pooled_ranks": pooled}


def _spread(shares: np.ndarray) -> dict:
    """How unevenly the rows of ``shares`` [layers, experts] (each layer's expert top-k counts) spread."""
    out = {"max_over_even": [], "entropy_norm": []}
    e = shares.shape[1]
    for row in shares:
        total = row.sum()
        if total <= 0:
            out["max_over_even"].append(float("nan"))
            out["entropy_norm"].append(float("nan"))
            continue
        q = row / total
        nz = q[q > 0]
        out["max_over_even"].append(float(q.max() * e))
        out["entropy_norm"].append(float(-(nz * np.log(nz)).sum() / np.log(e)))
    return out


def summarize(architecture: dict | None, route: dict, ablation: dict | None, experts: int) -> dict:
    """summary.json's ``experts``: routing, per-metric (layer, expert) tables and their correlation with routing,
    and the ablation. ``ablation``: {"dppl": [layers][experts], "base_ppl"} or None."""
    share = np.asarray(route["share"])
    layers = share.shape[0]
    out = {"experts": experts, "experts_per_token": route["experts_per_token"], "routing": route,
           "routing_spread": _spread(share), "per_metric": {}}
    if ablation is not None:
        d = np.asarray(ablation["dppl"], np.float64)
        out["ablation"] = {**ablation, "vs_routing": _spearman(share.ravel(), d.ravel()),
                           "vs_routing_within_layers": _within_layers(share, d),
                           "worst": [{"layer": int(i // experts), "expert": int(i % experts),
                                      "dppl": float(d.ravel()[i]), "routing_share": float(share.ravel()[i])}
                                     for i in np.argsort(-d.ravel())[:5]]}
    for m, arch in (architecture or {}).items():
        table = arch.get("layer_expert", {})
        sel = np.zeros((layers, experts))
        mean = np.full((layers, experts), np.nan)
        for key, r in table.items():
            if key == "-":
                continue
            layer, e = (int(x) for x in key.split("/"))
            sel[layer, e], mean[layer, e] = r["share"], r["mean_score"]
        entry = {"topk_share": sel.tolist(), "mean_score": mean.tolist(),
                 "topk_share_in_experts": float(sel.sum()),
                 "topk_spread": _spread(sel),
                 "by_expert": arch.get("expert", {}),
                 "router": arch.get("component", {}).get("router"),
                 "mean_score_vs_routing": _spearman(share.ravel(), mean.ravel()),
                 "mean_score_vs_routing_within_layers": _within_layers(share, mean),
                 "topk_share_vs_routing": _spearman(share.ravel(), sel.ravel())}
        if ablation is not None:
            entry["mean_score_vs_ablation"] = _spearman(mean.ravel(), np.asarray(ablation["dppl"]).ravel())
            entry["mean_score_vs_ablation_within_layers"] = _within_layers(mean, ablation["dppl"])
        out["per_metric"][m] = entry
    return out


def zeroed(flat: dict, path: str) -> dict:
    out = dict(flat)
    out[path] = jnp.zeros_like(flat[path])
    return out
