"""Metrics, splits and lineage recovery."""

import numpy as np
import pandas as pd
import pytest

from wa import lineage
from wa.eval import metrics, splits


def test_metrics_against_formulas():
    c = metrics.classification([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1])
    assert c["accuracy"] == pytest.approx(4 / 6)
    # per class precision 1, 1/2, 2/3; recall 1, 1/2, 2/3
    assert c["precision"] == pytest.approx((1 + 0.5 + 2 / 3) / 3) and c["recall"] == pytest.approx(c["precision"])
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
