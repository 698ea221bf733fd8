"""Held-out evaluation of many perturbed parameter sets per compiled call, and the architecture analysis."""

import jax
import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.esa import architecture, evaluate, perturb, select
from wa.models.families import ParamInfo
from wa.parallel import rules as rules_lib


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    d, _, _ = helpers.write_checkpoint(tmp_path_factory.mktemp("m"), "llama_micro")
    return models.load(d)


@pytest.mark.parametrize("how", evaluate.BATCHING)
def test_many_sets_per_call_equal_one_call_each(micro, how):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 12, size=(5, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    flat = rules_lib.flatten(micro.params)
    kept = select.filter_paths(list(flat), select.DEFAULT_FILTER)
    sels = [select.random_k(flat, 0.2, "per_layer", select.DEFAULT_FILTER, s) for s in range(5)]
    sets = [perturb.apply(flat, sel, "sign_flip", 1.0) for sel in sels] + [flat]
    treedef = jax.tree_util.tree_structure(micro.params)
    want = [evaluate.evaluate(micro, jax.tree_util.tree_unflatten(treedef, list(s.values())), ids, mask, 2,
                              progress=False) for s in sets]
    done = []
    # 6 sets in groups of 4 (one at a time when serial): the last group is padded, the sets consumed lazily.
    got = list(evaluate.evaluate_many(micro, iter(sets), kept, ids, mask, 2, group=4, progress=done.append, how=how))
    assert done == ([1] * 6 if how == "serial" else [4, 2]) and len(got) == 6
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"] and g["windows"] == w["windows"] == 5
        assert g["nll"] == pytest.approx(w["nll"], rel=1e-6)
    assert got[0]["nll"] != got[-1]["nll"]   # the perturbation reached the model


def test_architecture_groups_by_hand():
    info = {"0/attn/kernel": ParamInfo(0, "attention", "q"), "0/mlp/kernel": ParamInfo(0, "mlp", "down"),
            "1/mlp/kernel": ParamInfo(1, "mlp", "down")}
    scores = {"0/attn/kernel": np.array([9.0, 8.0, 1.0, 1.0]),      # 4 weights, sum 19
              "0/mlp/kernel": np.array([7.0, 1.0, 1.0, 1.0]),       # 4 weights, sum 10
              "1/mlp/kernel": np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}  # 8 weights, sum 8
    a = architecture.analyze(scores, info.__getitem__, 3)              # top 3 of 16: 9, 8 (attention), 7 (mlp 0)
    assert a["k"] == 3 and a["n_scored"] == 16
    comp = a["component"]
    assert comp["attention"]["selected"] == 2 and comp["mlp"]["selected"] == 1
    assert comp["attention"]["enrichment"] == pytest.approx((2 / 3) / (4 / 16))
    assert comp["mlp"]["enrichment"] == pytest.approx((1 / 3) / (12 / 16))
    mean_all = 37 / 16
    assert comp["attention"]["mean_score"] == pytest.approx((19 / 4) / mean_all)
    assert comp["mlp"]["mean_score"] == pytest.approx((18 / 12) / mean_all)
    assert a["attention_vs_mlp"]["mean_score_ratio"] == pytest.approx((19 / 4) / (18 / 12))
    assert a["attention_vs_mlp"]["enrichment_ratio"] == pytest.approx(((2 / 3) / (4 / 16)) / ((1 / 3) / (12 / 16)))
    assert list(a["layer"]) == ["0", "1"] and a["layer"]["1"]["selected"] == 0
    assert a["role"]["down"]["weights"] == 12
    prog = a["progression"]
    assert prog["layers"] == [0, 1] and np.isnan(prog["attention"]["enrichment"][1])
    assert prog["mlp"]["enrichment"] == pytest.approx([(1 / 3) / (4 / 16), 0.0])


def test_architecture_reads_a_fused_matrix_by_the_roles_of_its_rows():
    # One [in 2, out 3] kernel whose output units are q, k, v; the top 2 are in the q and v columns.
    info = {"0/attn/qkv/kernel": ParamInfo(0, "attention", "qkv"), "0/mlp/kernel": ParamInfo(0, "mlp", "down")}
    scores = {"0/attn/qkv/kernel": np.array([[9.0, 1.0, 1.0], [1.0, 1.0, 8.0]]), "0/mlp/kernel": np.ones(6)}
    parts = {"0/attn/qkv/kernel": (1, np.array(["q", "k", "v"]))}
    a = architecture.analyze(scores, info.__getitem__, 2, parts=lambda p, shape: parts.get(p))
    role = a["role"]
    assert set(role) == {"q", "k", "v", "down"}
    assert (role["q"]["selected"], role["k"]["selected"], role["v"]["selected"]) == (1, 0, 1)
    assert (role["q"]["weights"], role["k"]["weights"], role["v"]["weights"]) == (2, 2, 2)
    mean_all = 27 / 12
    assert role["q"]["mean_score"] == pytest.approx((10 / 2) / mean_all)
    assert role["v"]["mean_score"] == pytest.approx((9 / 2) / mean_all)
    assert a["component"]["attention"]["selected"] == 2   # the other groupings see the matrix whole
