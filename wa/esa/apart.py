"""Weights scored but kept out of the top-k competition, and reported apart (``--config.apart``, a regex over the
paths ``param_filter`` leaves out): the token embedding — with a tied head, also the output matrix — and the norm
weights.

Why apart, not in the competition. A token embedding is a lookup table whose row r gets an input gradient only
where token r occurs (a tied head adds a smaller softmax term for every row): its gradient scores measure how often
a token appears in the calibration text as much as what the network computes, and its mean score per weight over
the whole vocabulary mostly says how much of the vocabulary the text covers (``seen_rows_vs_matrices`` reads the
rows of tokens that occur). On a model with a large vocabulary it also
holds most of the weights (Gemma-3-270M: 168M of 268M), so a global top-k over everything would be decided by
it and per-matrix perturbations would spend a third of their budget on one table. Norm weights are vectors:
0.2% of a 640-entry vector is one weight, and one norm weight scales a whole channel. Both are scored in the same
gradient pass as the matrices (the per-window scores accumulate every parameter's gradient), so reading them
costs host time only.

What is reported, per metric that scores them (``act_mag`` scores linear-layer inputs only):

- ``architecture``: the first seed's global top-k chosen over the matrices *and* these tensors together, read by
  layer, component and role as ``wa.esa.architecture`` reads the matrices alone: the top-k figures with them;
- ``groups``: each apart role's mean score per weight over the competing matrices' (1: as sensitive per weight);
- ``rows``: for a token embedding, its own top-k (the same fraction of its entries) by vocabulary row: how many
  rows hold it, the rows holding most of it (with their token), the share in rows of tokens that occur in the
  calibration windows, the mean score of those rows over the others', and, among them, Spearman's ρ between a
  row's mean score and its token's count;
- ``jaccard``: the stability of the apart matrices' own top-k across seeds (disjoint windows);
- ``perturb``: sign-flipping (the first perturbation, at its largest dose) the apart matrices' own top-k of each
  seed against random-k draws of the same sizes within them, with the same statistics as the matrices'.
"""

from __future__ import annotations

import re

import numpy as np
from scipy import stats as sp_stats

from wa.errors import ConfigError
from wa.esa import architecture, select, stats, tally


def paths(flat: dict, kept: list, regex: str) -> list[str]:
    """The paths outside ``kept`` that ``regex`` matches ("" -> none)."""
    if not regex:
        return []
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise ConfigError(f"--config.apart={regex!r} is not a valid regex ({e})") from e
    inside = set(kept)
    if not any(pat.search(p) for p in flat):
        raise ConfigError(f"--config.apart={regex!r} matches no parameter; paths look like {list(flat)[:3]}")
    # What param_filter already lets compete is not apart (e.g. --config.param_filter=. leaves nothing apart).
    return [p for p in flat if p not in inside and pat.search(p)]


def matrices(flat: dict, apart: list) -> list[str]:
    """The apart tensors with a top-k of their own (two or more axes; vectors are read by their scores only)."""
    return [p for p in apart if len(flat[p].shape) >= 2]


def top(scores: dict, mats: list, topk, signed: bool) -> dict:
    """Each apart matrix's own top-k (the run's fraction or count of its entries), one tensor at a time by a
    partition (an XLA top-k of 335k out of a 168M-entry embedding is slow on CPU)."""
    sel = {}
    for p in mats:
        sel.update(select.top_k({p: scores[p]}, topk, "global", r".", signed)[0])
    return sel


def seen_rows_vs_matrices(group_vs_matrices: float, rows: dict) -> float:
    """The mean score per weight of a token embedding's rows of tokens seen in the calibration windows, over the
    matrices' mean score per weight, from the whole table's figure and the seen rows' share and their mean score
    over the unseen rows' (mean = f·m_seen + (1 - f)·m_unseen, r = m_seen / m_unseen)."""
    f, r = rows["seen_rows_share"], rows["seen_over_unseen_mean_score"]
    if not f:
        return float("nan")
    return group_vs_matrices / f if np.isinf(r) else group_vs_matrices * r / (f * r + 1 - f)


def token_counts(ids: np.ndarray, mask: np.ndarray, vocab: int) -> np.ndarray:
    """How often each token id occurs among the real tokens of calibration windows."""
    real = np.asarray(ids)[np.asarray(mask) > 0]
    return np.bincount(real[real < vocab], minlength=vocab)


def _rows(shape: tuple, row_mean: np.ndarray, sel: np.ndarray, counts: np.ndarray, decode, shown: int = 10) -> dict:
    """A token embedding's own top-k read by vocabulary row. Rows of tokens absent from the calibration windows get
    gradient only through a tied head's softmax, so seen and unseen rows are compared apart (their mean scores) from
    the question whether, among seen tokens, a row's score follows its token's count (Spearman over seen rows).
    ``row_mean``: each row's mean score (|score| for signed ones), reduced where the scores live."""
    row_of = np.asarray(sel, np.int64) // shape[1]
    per_row = np.bincount(row_of, minlength=shape[0])
    seen = counts > 0
    order = np.argsort(-per_row, kind="stable")[:shown]
    rho, p = (tuple(sp_stats.spearmanr(row_mean[seen], counts[seen])) if seen.sum() > 2 else (np.nan, np.nan))
    unseen_mean = float(row_mean[~seen].mean()) if (~seen).any() else float("nan")
    return {
        "rows": int(shape[0]), "k": int(len(row_of)), "rows_holding": int((per_row > 0).sum()),
        "top_rows": [{"row": int(r), "token": decode(int(r)), "selected": int(per_row[r]),
                      "calibration_count": int(counts[r])} for r in order if per_row[r] > 0],
        "seen_rows": int(seen.sum()), "seen_rows_share": float(seen.mean()),
        "seen_share_of_topk": float(seen[row_of].mean()) if len(row_of) else float("nan"),
        # Untied, an unseen row gets no gradient at all: its score is 0 and the ratio infinite.
        "seen_over_unseen_mean_score": (float(row_mean[seen].mean()) / unseen_mean if unseen_mean > 0
                                        else float("inf") if seen.any() and row_mean[seen].mean() > 0
                                        else float("nan")),
        "spearman_seen_rows_score_vs_count": float(rho), "spearman_p": float(p),
    }


def figures(scores: dict, kept: list, apart: list, own: dict, topk, signed: bool, describe, parts,
            counts: np.ndarray | None, decode) -> dict:
    """The first seed's figures for one metric: ``scores`` holds every kept and apart path, ``own`` the apart
    matrices' own top-k (``top``), ``counts`` the calibration token counts (None: no token rows read)."""
    every = {p: scores[p] for p in kept + apart}
    arch = architecture.analyze(every, describe, topk, signed, parts)

    def total(ps):   # reduced where the scores live
        return sum(tally.total(scores[p], signed) for p in ps)

    n_kept = sum(int(np.prod(scores[p].shape)) for p in kept)
    kept_mean = total(kept) / n_kept
    groups: dict = {}
    for p in apart:
        info = describe(p)
        g = groups.setdefault(f"{info.component}/{info.role}", {"tensors": 0, "weights": 0, "score_sum": 0.0})
        g["tensors"] += 1
        g["weights"] += int(np.prod(scores[p].shape))
        g["score_sum"] += total([p])
    for g in groups.values():
        g["mean_score_vs_matrices"] = (g.pop("score_sum") / g["weights"]) / kept_mean if kept_mean > 0 else np.nan
    # The global top-k's share in the apart tensors as a whole, against their share of the weights (their roles
    # are their own: token, position, the norms).
    n_apart = sum(g["weights"] for g in groups.values())
    roles = {describe(p).role for p in apart}
    in_apart = sum(v["selected"] for r, v in arch["role"].items() if r in roles)
    out = {"architecture": arch, "groups": groups, "weights": n_apart, "matrices_weights": n_kept,
           "global_topk_share": in_apart / arch["k"], "weights_share": n_apart / (n_apart + n_kept)}
    if counts is not None:
        out["rows"] = {p: _rows(tuple(scores[p].shape), tally.along(scores[p], 0, signed) / scores[p].shape[1],
                                own[p], counts, decode)
                       for p in own if is_token_rows(describe, p)}
    return out


def is_token_rows(describe, path) -> bool:
    info = describe(path)
    return info.component == "embedding" and info.role == "token"


def has_token_rows(describe, apart: list) -> bool:
    return any(is_token_rows(describe, p) for p in apart)


def summarize(first: dict, tops: dict, seeds: list, results: dict | None, reads_data: dict) -> dict:
    """summary.json's ``apart``: ``first`` metric -> ``figures``, ``tops`` (metric, seed) -> own top-k, ``results``
    metric -> {"topk": [ΔPPL], "random_k": [ΔPPL], "kind", "dose"} (None: no perturbation), ``reads_data`` metric
    -> whether its sets can differ between seeds (a stability across data is undefined for one that cannot)."""
    out = {}
    for m, fig in first.items():
        own = (m, seeds[0]) in tops    # apart vectors only: no top-k of their own
        pairs = [select.jaccard(tops[m, a], tops[m, b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]] if own \
            else []
        entry = dict(fig, k=select.size(tops[m, seeds[0]]) if own else 0,
                     jaccard_mean=float(np.mean(pairs)) if pairs and reads_data[m] else float("nan"))
        if results and m in results:
            r = results[m]
            entry["perturb"] = {"kind": r["kind"], "dose": r["dose"],
                                "topk": {**stats.mean_ci(r["topk"]), "values": r["topk"]},
                                "random_k": {**stats.mean_ci(r["random_k"]), "values": r["random_k"]},
                                "p_value_topk_vs_random": stats.greater(r["topk"], r["random_k"])["p_value"]}
            rm = entry["perturb"]["random_k"]["mean"]
            entry["perturb"]["ratio_topk_vs_random"] = (entry["perturb"]["topk"]["mean"] / rm if rm > 0
                                                        else float("inf"))
        out[m] = entry
    return out
