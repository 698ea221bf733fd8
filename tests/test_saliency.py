"""Pruning saliencies against hand computation, and exact lowest-fraction selection."""

import numpy as np
import pytest

from wa.esa import saliency

W = {"a": np.array([[0.5, -2.0], [1.0, 0.1]], np.float32), "b": np.array([3.0, -0.2, 0.05], np.float32)}


@pytest.mark.parametrize("name,score,want", [
    ("magnitude", None, {"a": [[0.5, 2.0], [1.0, 0.1]], "b": [3.0, 0.2, 0.05]}),
    # |g·w| is grad_x_weight itself.
    ("taylor", {"a": [[0.1, 0.4], [0.0, 2.0]], "b": [0.3, 0.0, 1.0]},
     {"a": [[0.1, 0.4], [0.0, 2.0]], "b": [0.3, 0.0, 1.0]}),
    # ½ F w²: F = 0.2 at w = -2 gives 0.5 · 0.2 · 4 = 0.4.
    ("obd_fisher", {"a": [[1.0, 0.2], [0.5, 4.0]], "b": [0.1, 1.0, 2.0]},
     {"a": [[0.125, 0.4], [0.25, 0.02]], "b": [0.45, 0.02, 0.0025]}),
    # ½ |H| w²: a negative Hutchinson estimate counts by its size.
    ("obd_hessian", {"a": [[-1.0, 0.2], [0.5, -4.0]], "b": [0.1, -1.0, 2.0]},
     {"a": [[0.125, 0.4], [0.25, 0.02]], "b": [0.45, 0.02, 0.0025]}),
    ("wanda", {"a": [[0.5, 4.0], [3.0, 0.2]], "b": [3.0, 0.4, 0.1]},
     {"a": [[0.5, 4.0], [3.0, 0.2]], "b": [3.0, 0.4, 0.1]}),
])
def test_saliency_formulas(name, score, want):
    sc = W if score is None else {p: np.asarray(v, np.float32) for p, v in score.items()}
    got = saliency.compute(name, sc, W)
    for p in want:
        np.testing.assert_allclose(got[p], np.asarray(want[p], np.float32), rtol=1e-6, err_msg=p)


def test_sensitivity_is_not_saliency():
    # Flat curvature on a large weight: grad² ranks it least important, OBD (cost of zeroing it) does not.
    fisher = {"x": np.array([1e-4, 1.0], np.float32)}
    w = {"x": np.array([10.0, 0.01], np.float32)}
    assert saliency.lowest(fisher, 0.5, "per_layer")["x"].tolist() == [0]
    assert saliency.lowest(saliency.compute("obd_fisher", fisher, w), 0.5, "per_layer")["x"].tolist() == [1]


def test_lowest_per_layer_and_global_take_exact_counts():
    sal = {"a": np.array([[4.0, 1.0], [3.0, 2.0]]), "b": np.array([0.5, 5.0, 1.0])}
    # round(0.5 · 3) = 2 weights of b, 2 of a.
    assert {p: v.tolist() for p, v in saliency.lowest(sal, 0.5, "per_layer").items()} == {"a": [1, 3], "b": [0, 2]}
    # 7 weights, 3 lowest overall: 0.5 (b0), 1.0 (a1) and 1.0 (b2) tie — both taken, exactly 3.
    assert {p: v.tolist() for p, v in saliency.lowest(sal, 3 / 7, "global").items()} == {"a": [1], "b": [0, 2]}
    # A tie at the threshold goes to the earlier path: 2 lowest of (0.5, 1.0, 1.0) → a's 1.0, not b's.
    assert {p: v.tolist() for p, v in saliency.lowest(sal, 2 / 7, "global").items()} == {"a": [1], "b": [0]}
    with pytest.raises(ValueError, match="mode must be one of"):
        saliency.lowest(sal, 0.5, "row")


def test_prune_zeroes_exactly_the_lowest():
    sal = {"a": np.array([[4.0, 1.0], [3.0, 2.0]]), "b": np.array([0.5, 5.0, 1.0])}
    w = {"a": np.array([[1.0, -2.0], [3.0, -4.0]], np.float32), "b": np.array([5.0, 6.0, -7.0], np.float32)}
    got = dict(saliency.prune(w, sal, 3 / 7, "global"))
    np.testing.assert_array_equal(got["a"], [[1.0, 0.0], [3.0, -4.0]])
    np.testing.assert_array_equal(got["b"], [0.0, 6.0, 0.0])
    assert got["a"].dtype == np.float32 and got["a"].shape == (2, 2)
    got = dict(saliency.prune(w, sal, 0.5, "per_layer"))
    np.testing.assert_array_equal(got["a"], [[1.0, 0.0], [3.0, 0.0]])
    np.testing.assert_array_equal(w["a"], [[1.0, -2.0], [3.0, -4.0]])   # the weights themselves are untouched
    # One partition for several fractions cuts exactly where one partition per fraction does, ties included.
    fractions = [1 / 7, 2 / 7, 3 / 7, 0.5, 6 / 7]
    for mode in ("per_layer", "global"):
        shared = saliency.plans(sal, fractions, mode)
        for f in fractions:
            one = {p: v.tolist() for p, v in saliency.prune(w, sal, f, mode)}
            assert {p: v.tolist() for p, v in saliency.prune(w, sal, f, mode, shared[f])} == one


def test_available_follows_the_computed_metrics():
    assert saliency.available(["magnitude", "grad_squared", "act_mag"]) == ["magnitude", "obd_fisher", "wanda"]


def test_per_output_compares_within_each_output_row():
    # Flax [in, out] kernel: column j holds output j's inputs. Each output loses its own two lowest, so output 1
    # loses 0.9 and 5.0 though output 0's 0.3 is smaller than both.
    sal = {"k": np.array([[0.1, 0.9], [0.2, 5.0], [0.3, 7.0], [0.05, 8.0]])}
    got = saliency.lowest(sal, 0.5, "per_output")["k"]
    mask = np.zeros(8, bool)
    mask[got] = True
    np.testing.assert_array_equal(mask.reshape(4, 2), [[1, 1], [0, 1], [0, 0], [1, 0]])
    assert saliency.lowest(sal, 0.5, "per_layer")["k"].tolist() == [0, 2, 4, 6]
    # [out, in] (GPT-2's Conv1D is the opposite way): the input axis is 1, rows are the outputs.
    t = {"k": sal["k"].T.copy()}
    np.testing.assert_array_equal(
        saliency.lowest(t, 0.5, "per_output", {"k": 1})["k"], [0, 3, 4, 5])
    # Ties go to the lower input index; round(0.25 · 4) = 1 per row.
    assert saliency.lowest({"k": np.ones((4, 2))}, 0.25, "per_output")["k"].tolist() == [0, 1]


def test_n_m_patterns_are_exact():
    rng = np.random.default_rng(0)
    sal = {"k": rng.random((16, 6)), "b": rng.random((8, 3))}   # [in, out]
    for spec, (n, m) in (("2:4", (2, 4)), ("4:8", (4, 8)), ("1:4", (1, 4))):
        got = dict(saliency.masks(sal, spec, "per_layer"))
        for p, v in sal.items():
            mask = got[p].reshape(v.shape)
            grouped = mask.T.reshape(v.shape[1], -1, m)          # [out, groups, m] along each output's inputs
            assert (grouped.sum(-1) == n).all(), (spec, p)
            vals = v.T.reshape(v.shape[1], -1, m)
            # Every removed weight is below every kept one of its group.
            assert (np.where(grouped, vals, -np.inf).max(-1) < np.where(grouped, np.inf, vals).min(-1)).all()
        # The mode does not change a semi-structured pattern.
        assert all((got[p] == dict(saliency.masks(sal, spec, "global"))[p]).all() for p in sal)
    with pytest.raises(ValueError, match="multiple of 4"):
        dict(saliency.masks({"k": np.ones((6, 2))}, "2:4", "per_layer"))
    for bad in ("4:4", "2:x", "1.5", "0"):
        with pytest.raises(ValueError, match="sparsity"):
            saliency.pattern(bad)
    assert saliency.label("2:4") == "2:4" and saliency.label(0.5) == "0.5"


def test_owl_prunes_layers_with_more_outliers_less():
    scores = {"l0/a": np.array([1.0, 1, 1, 1, 10]), "l1/a": np.array([1.0, 1]), "l1/b": np.array([1.0, 1]),
              "l2/a": np.array([1.0, 1, 1, 9, 9, 1]), "head": np.array([5.0, 1.0])}
    layer_of = {"l0/a": 0, "l1/a": 1, "l1/b": 1, "l2/a": 2, "head": None}
    got = saliency.owl(scores, layer_of, 0.5, m=2.0, lam=0.1)
    # Outlier shares (> 2 × the layer mean) 0.2, 0 and 1/3, scaled to [0, 2λ] = 0.12, 0, 0.2 and centred on the
    # kept share 0.5: sparsities 0.5 − (0.12 − 0.10667) etc.
    want = {"l0/a": 0.5 - (0.12 - 0.32 / 3), "l1/a": 0.5 + 0.32 / 3, "l1/b": 0.5 + 0.32 / 3,
            "l2/a": 0.5 - (0.2 - 0.32 / 3), "head": 0.5}
    assert got == pytest.approx(want)
    assert np.mean([got["l0/a"], got["l1/a"], got["l2/a"]]) == pytest.approx(0.5)
    # Each matrix (or each row) then takes its own fraction: round(0.6067 · 2) = 1 of l1's, round(0.4067 · 6) = 2.
    m = dict(saliency.masks(scores, got, "per_layer"))
    assert [int(m[p].sum()) for p in scores] == [2, 1, 1, 2, 1]
    assert m["l2/a"].tolist() == [True, True, False, False, False, False]
    with pytest.raises(ValueError, match="global"):
        dict(saliency.masks(scores, got, "global"))
    # No outliers anywhere: every layer at the target.
    flat = {"a": np.ones(4), "b": np.ones(4)}
    assert saliency.owl(flat, {"a": 0, "b": 1}, 0.7) == pytest.approx({"a": 0.7, "b": 0.7})


def test_device_masks_pick_what_the_host_masks_pick():
    """Masks made where the saliencies live (as on an accelerator) against the host partitions and row sorts: the
    same weights in every mode and pattern, ties included (integer saliencies), and the same pruned copies."""
    rng = np.random.default_rng(0)
    sal = {"a": rng.integers(0, 6, (8, 12)).astype(np.float32), "b": rng.integers(0, 6, (4, 8)).astype(np.float32),
           "c": rng.standard_normal((2, 8, 4)).astype(np.float32), "d": rng.integers(0, 3, 8).astype(np.float32)}
    axes = {"a": 1, "c": 1}
    owl = {"a": 0.3, "b": 0.55, "c": 0.5, "d": 0.0}
    cases = [(f, m) for f in (0.25, 0.5, 3 / 7) for m in ("per_layer", "global", "per_output")]
    cases += [("2:4", "per_output"), ("2:4", "global"), (owl, "per_layer"), (owl, "per_output")]
    for spec, mode in cases:
        host = dict(saliency.masks(sal, spec, mode, input_axes=axes))
        dev = {p: np.asarray(m).ravel() for p, m in saliency.device_masks(sal, spec, mode, axes)}
        assert {p: m.tolist() for p, m in dev.items()} == {p: m.tolist() for p, m in host.items()}, (spec, mode)
        assert sum(int(m.sum()) for m in dev.values()) > 0
    w = {p: rng.standard_normal(v.shape).astype(np.float32) for p, v in sal.items()}
    for mode in ("global", "per_output"):
        host = {p: v.tolist() for p, v in saliency.prune(w, sal, 0.5, mode, input_axes=axes, on_device=False)}
        dev = {p: np.asarray(v).tolist() for p, v in saliency.prune(w, sal, 0.5, mode, input_axes=axes,
                                                                    on_device=True)}
        assert dev == host, mode
    assert set(saliency.compute("obd_fisher", sal, w, on_device=True)) == set(sal)
