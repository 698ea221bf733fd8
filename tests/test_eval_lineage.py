"""Metrics, splits and lineage recovery."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from wa import lineage
from wa.eval import metrics, splits


def test_metrics_against_formulas():
    c = metrics.classification([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1])
    assert c["accuracy"] == pytest.approx(4 / 6)
    # per class precision 1, 1/2, 2/3; recall 1, 1/2, 2/3
    assert c["precision"] == pytest.approx((1 + 0.5 + 2 / 3) / 3) and c["recall"] == pytest.approx(c["precision"])
    assert "auroc" not in c
    # Two classes with a score: AUROC = share of (positive, negative) pairs ordered right, ties half: 3.5 of 4.
    b = metrics.classification([0, 0, 1, 1], [0, 1, 1, 1], score=[0.1, 0.6, 0.6, 0.9])
    assert b["auroc"] == pytest.approx(3.5 / 4) and b["accuracy"] == pytest.approx(3 / 4)
    assert "auroc" not in metrics.classification([1, 1], [1, 0], score=[0.2, 0.1])   # one class: undefined
    y, p = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 1.5, 3.5, 4.5])
    r = metrics.regression(y, p)
    assert r["mae"] == pytest.approx(0.5) and r["rmse"] == pytest.approx(0.5)
    assert r["r2"] == pytest.approx(1 - 1.0 / 5.0)
    assert r["spearman"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3, 4])[0, 1])
    assert r["kendall_tau"] == pytest.approx(5 / np.sqrt(6 * 5))  # tau-b with one tie in predictions
    assert metrics.regression(y, np.ones(4))["kendall_tau"] == 0.0


def test_splits_keep_models_and_trees_whole():
    md = pd.DataFrame({"model_id": np.repeat(np.arange(40), 3), "root_id": np.repeat(np.arange(40) // 4, 3),
                       "family": np.repeat(["mlp", "cnn"] * 20, 3)})
    for group in ("model_id", "root_id"):
        s = splits.by_group(md, (0.6, 0.2, 0.2), seed=1, group=group)
        assert sorted(np.concatenate(list(s.values()))) == list(range(len(md)))
        sets = [set(md[group].iloc[v]) for v in s.values()]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    x = splits.cross_architecture(md, "cnn")
    assert set(md["family"].iloc[x["test"]]) == {"cnn"} and set(md["family"].iloc[x["train"]]) == {"mlp"}
    with pytest.raises(splits.SplitError, match="'resnet' is not in the zoo"):
        splits.cross_architecture(md, "resnet")


def _tune(w, rng):
    return w + 0.01 * w**3 + 0.1 * rng.normal(size=w.shape)


def test_lineage_recovers_a_synthetic_forest():
    rng = np.random.default_rng(0)
    w, parent = [], []
    for _ in range(4):  # 4 trees: root -> 2 children -> 2 grandchildren each
        w.append(rng.normal(size=500))
        parent.append(-1)
        r = len(w) - 1
        for _ in range(2):
            # Fine-tuning: a small step that grows the largest weights (raises kurtosis, as MoTHer observed).
            w.append(_tune(w[r], rng))
            parent.append(r)
            c = len(w) - 1
            for _ in range(2):
                w.append(_tune(w[c], rng))
                parent.append(c)
    res = lineage.recover(np.stack(w))
    s = lineage.score(np.array(parent), res["parent"])
    assert s["undirected_edges"] == 1.0 and s["root_recall"] == 1.0 and s["root_precision"] == 1.0
    assert s["directed_edges"] == 1.0
    # Without the kurtosis cue the tree is the same up to direction, which distance alone cannot tell.
    s0 = lineage.score(np.array(parent), lineage.recover(np.stack(w), direction_penalty=0.0)["parent"])
    assert s0["undirected_edges"] == 1.0 and s0["directed_edges"] < 1.0


def _forest(n_trees=6, seed=0):
    """Trees root -> 2 children -> 2 grandchildren each, of two-matrix models; fine-tuning raises kurtosis."""
    rng = np.random.default_rng(seed)
    params, rows = [], []
    for _ in range(n_trees):
        root = len(params)
        for offset in (None, 0, 0, 1, 1, 2, 2):    # each model's parent, as a position in its tree
            if offset is None:
                p = {"a": {"kernel": rng.normal(size=(10, 20)), "bias": np.zeros(20)},
                     "b": {"kernel": rng.normal(size=(20, 5))}}
            else:
                p = {k: {n: (_tune(v, rng) if n == "kernel" else v) for n, v in layer.items()}
                     for k, layer in params[root + offset].items()}
            rows.append({"model_id": len(params), "parent_id": -1 if offset is None else root + offset,
                         "root_id": root, "arch_id": "a"})
            params.append(p)
    return pd.DataFrame(rows), params


def test_lineage_methods_mother_and_fitted_on_known_and_found_trees():
    rows, params = _forest()
    assert rows.groupby("root_id").size().tolist() == [7] * 6
    assert (rows["parent_id"] >= 0).sum() == 36
    # MoTHer's distance written out: per matrix max(W_i - W_j), min-max scaled over pairs, max over matrices.
    a = np.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    b = np.array([[1.0], [0.0], [3.0]])
    s_a = np.array([[0, 2, 0.5], [2, 0, 1.5], [0.5, 1.5, 0]])
    s_b = np.array([[0, 1, -2], [-1, 0, -3], [2, 3, 0]])
    off = ~np.eye(3, dtype=bool)
    ref = np.maximum((s_a - s_a[off].min()) / np.ptp(s_a[off]), (s_b - s_b[off].min()) / np.ptp(s_b[off]))
    ref[~off] = 0
    np.testing.assert_allclose(lineage.linf_distance([a, b]), ref)
    # MoTHer's direction statistic: the kernels' excess kurtosis, summed (biases left out).
    assert lineage.layer_kurtosis(params[0]) == pytest.approx(
        sum(stats.kurtosis(params[0][k]["kernel"].ravel()) for k in ("a", "b")))
    train = {0, 7, 14}
    rise = lineage.rebuild(rows, params, "mother_rise", "known", train)
    fall = lineage.rebuild(rows, params, "mother", "known", train)
    assert set(rise["archs"]["a"]["model_id"]) == set(range(21, 42))    # the test trees only
    # Every tree's edges found; the direction cue agrees with every true edge when its sign is right, with none
    # when it is MoTHer's (kurtosis falling from pretrained parent to fine-tuned child).
    assert rise["archs"]["a"]["undirected_edges"] == 1.0 and rise["archs"]["a"]["kurtosis_agrees"] == 1.0
    assert fall["archs"]["a"]["kurtosis_agrees"] == 0.0
    assert fall["archs"]["a"]["directed_edges"] < 0.5 < rise["archs"]["a"]["directed_edges"]
    fitted = lineage.rebuild(rows, params, "fitted", "found", train)
    assert fitted["sign"] == "rise" and fitted["fit"]["train_directed_edges"] == 1.0
    s = fitted["archs"]["a"]
    assert s["directed_edges"] == 1.0 and s["root_precision"] == 1.0 and s["root_recall"] == 1.0
    pair = lineage.rebuild(rows, params, "pairwise", "known", train)
    assert 0 <= pair["archs"]["a"]["directed_edges"] <= 1 and "train_directed_edges" in pair["fit"]
    with pytest.raises(lineage.LineageError, match="fitted on training trees; none were given"):
        lineage.rebuild(rows, params, "fitted", "known")
    with pytest.raises(lineage.LineageError, match="unknown lineage method 'oracle'"):
        lineage.rebuild(rows, params, "oracle")
