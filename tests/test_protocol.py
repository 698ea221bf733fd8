"""The literature's terms: the Small CNN Zoo protocol's plan, label ceilings, the data-free spectral baseline."""

import jax
import ml_collections
import numpy as np
import pandas as pd
import pytest

from configs import zoo as zoo_configs
from tests.test_learners import _set
from wa import learners
from wa.eval import reliability
from wa.learners import data as data_lib
from wa.weights import spectral
from wa.zoo import archs, build, plan
from wa.zoo import population as pop_lib


# ---- the data-free spectral metrics -------------------------------------------------------------------------
def _alpha_by_hand(evals):
    """Clauset et al.'s fit, written as loops: every candidate x_min, its MLE α and KS distance, the smallest."""
    x = sorted(v for v in evals if v > 1e-5)
    best = None
    for i in range(len(x) - 1):
        tail = x[i:]
        s = sum(np.log(v / x[i]) for v in tail)
        if s <= 0:
            continue
        a = 1 + len(tail) / s
        d = max(abs(1 - (v / x[i]) ** (1 - a) - k / len(tail)) for k, v in enumerate(tail))
        if best is None or d < best[0]:
            best = (d, a)
    return best[1]


def test_spectral_metrics_against_direct_computation():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(60, 40))
    ev = np.linalg.eigvalsh(w.T @ w)
    m = spectral.layer(w)
    assert m["alpha"] == pytest.approx(_alpha_by_hand(ev), rel=1e-9)
    assert m["stable_rank"] == pytest.approx(ev.sum() / ev.max(), rel=1e-9)
    assert m["log_spectral_norm"] == pytest.approx(np.log10(np.linalg.norm(w, 2) ** 2), rel=1e-9)
    assert m["log_norm"] == pytest.approx(np.log10((w ** 2).sum()), rel=1e-9)
    assert m["alpha_weighted"] == pytest.approx(m["alpha"] * np.log10(ev.max()), rel=1e-9)
    # A convolution: one ESD pooled over its 3x3 taps, each tap's eigenvalues halved (conv2d_norm).
    k = rng.normal(size=(3, 3, 4, 6))
    pooled = np.sort(np.concatenate([0.5 * np.linalg.eigvalsh(k[i, j].T @ k[i, j])[-4:] for i in range(3)
                                     for j in range(3)]))
    np.testing.assert_allclose(spectral.esd(k), pooled, rtol=1e-9, atol=1e-12)
    # A power law's exponent is recovered: p(x) ∝ x^-3.
    assert spectral.fit_alpha(rng.pareto(2.0, 4000) + 1)["alpha"] == pytest.approx(3.0, abs=0.15)
    # Vectors have no spectrum; fewer than 8 eigenvalues are not fitted.
    assert np.isnan(spectral.layer(np.ones(5))["log_norm"])
    small = spectral.layer(rng.normal(size=(7, 20)))    # 7 eigenvalues
    assert np.isnan(small["alpha"]) and np.isfinite(small["stable_rank"])
    # 9 eigenvalues (the Small CNN's first convolution: 1 input channel, 3x3 taps): the small-sample fit, tails of
    # at least 8, the bias-corrected exponent.
    ev = spectral.esd(rng.normal(size=(3, 3, 1, 16)))
    x = np.sort(ev)
    cands = [(1 + (n - 1) / np.log(x[i:] / x[i]).sum(), i, n) for i, n in ((0, 9), (1, 8))]
    ks = [np.abs(1 - (x[i:] / x[i]) ** (1 - a) - np.arange(n) / n).max() for a, i, n in cands]
    assert spectral.fit_alpha(ev)["alpha"] == pytest.approx(cands[int(np.argmin(ks))][0], rel=1e-12)


def test_spectral_features_share_the_statistics_layer_slots():
    ws = _set(6)
    x, depth = spectral.matrix(ws.params, ws.families)
    from wa.weights import stats
    assert depth == stats.matrix(ws.params, ws.families)[1]
    names = spectral.features(ws.params[0], ws.families[0], depth)[1]
    assert x.shape == (6, depth * len(spectral.FEATURES)) and names[-1] == "head/spectral/log_norm"
    # The MLP (family index 0) pads its missing layers with NaN before the head.
    assert np.isnan(x[0, len(spectral.FEATURES):-len(spectral.FEATURES)]).all()
    assert np.isfinite(x[0, -3:]).all()     # its 4x10 head: norms and stable rank, no α from 4 eigenvalues


@pytest.mark.parametrize("variant,width", [("spectral_gbt", 5), ("stats_spectral_gbt", 19)])
def test_spectral_learners_fit_and_predict(variant, width):
    ws = _set(18)
    cfg = learners.LEARNERS[variant]
    idx = np.arange(18)
    t = data_lib.targets(ws.rows, {"test_acc": 1.0, "family": 1.0}, idx[:12])
    lr = learners.get(variant, ml_collections.ConfigDict({**cfg.config, **cfg.smoke}), t)
    feats = lr.prepare(ws.params, ws.families, ws.activations)
    depth = max(len(archs.family(f).weight_tensors(p)) for p, f in zip(ws.params, ws.families, strict=True))
    assert feats.shape == (18, depth * width)
    lr.fit(feats, idx[:12], idx[12:15], 0)
    out = lr.predict(feats, idx[15:])
    assert out["test_acc"].shape == (3,) and out["family"].shape == (3, 3)


# ---- label ceilings -----------------------------------------------------------------------------------------
def test_split_half_reliability_and_ceilings():
    rng = np.random.default_rng(0)
    true = rng.normal(size=4000)
    a, b = true + rng.normal(0, 1, 4000), true + rng.normal(0, 1, 4000)
    r = reliability.split_half(a, b)
    half_r = np.corrcoef(a, b)[0, 1]
    assert r["half_r"] == pytest.approx(half_r) and r["reliability"] == pytest.approx(2 * half_r / (1 + half_r))
    # Halves of noise variance 1 average into a measurement of noise variance 1/2: reliability 1 / 1.5.
    assert r["reliability"] == pytest.approx(1 / 1.5, abs=0.02)
    assert r["tau_ceiling"] == pytest.approx(2 / np.pi * np.arcsin(np.sqrt(r["reliability"])))
    # The τ ceiling is the τ of the full measurement with the truth (Gaussian case).
    from scipy import stats
    full = (a + b) / 2
    assert r["tau_ceiling"] == pytest.approx(stats.kendalltau(full, true).statistic, abs=0.02)
    rows = pd.DataFrame({"test_acc": full, "test_acc_half_a": a, "test_acc_half_b": b, "gen_gap": a})
    c = reliability.ceilings(rows, {t: data_lib.TASKS[t] for t in ("test_acc", "gen_gap", "train_fraction")})
    assert c["test_acc"]["measured"] and c["test_acc"]["reliability"] == r["reliability"]
    assert c["gen_gap"] == {"measured": False, "why": "the zoo recorded no split halves of gen_gap"}
    assert c["train_fraction"]["exact"]
    assert reliability.describe(c["test_acc"], "r2") == f"{r['r2_ceiling']:.3f}"
    assert reliability.describe(c["gen_gap"], "r2") == "n/a" and reliability.describe(c["train_fraction"], "f1") == \
        "exact"
    assert reliability.describe(c["test_acc"], "accuracy") == f"ρ {r['reliability']:.3f} (test_acc)"
    assert np.isnan(reliability.split_half([1, 1, 1], [1, 2, 3])["reliability"])


# ---- the Small CNN Zoo protocol -----------------------------------------------------------------------------
def test_small_cnn_protocol_plan():
    cfg = zoo_configs.get_config("small_cnn_fmnist")
    p = plan.make_plan(cfg, 10)
    assert len(p) == 384 and set(p["arch_id"]) == {"cnn-d3-w16-v1-relu", "cnn-d3-w16-v1-tanh"}
    assert (p.groupby("unit")["train_fraction"].nunique() == 1).all()         # one epoch length per unit
    assert set(p["train_fraction"]) == {0.1, 0.25, 0.5, 1.0}
    np.testing.assert_allclose(p["weight_decay"], 2 * p["l2reg"])
    normal = p["init_scheme"].isin(archs.NORMAL_SCHEMES)
    np.testing.assert_array_equal(p.loc[normal, "init_scale"], p.loc[normal, "init_std"])
    assert (p.loc[~normal, "init_scale"] == 1.0).all()
    assert p["lr"].between(5e-4, 5e-2).all() and p["l2reg"].between(1e-8, 1e-2).all()
    assert p["dropout"].between(0, 0.7).all() and p["init_std"].between(1e-3, 0.5).all()
    assert set(p["optimizer"]) == {"sgd_plain", "adam", "rmsprop"}
    # 4,970 weights, as the released zoo's rows.
    m = archs.Arch("cnn", 3, 16, "relu", (("valid", 1),)).module(10)
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(m.init, jax.random.key(0), np.zeros((1, 28, 28, 1)))))
    assert n == 4970


def test_pool_epochs_refuse_a_fraction_smaller_than_a_batch(tmp_path):
    cfg = zoo_configs.get_config("small_cnn_smoke")
    cfg.batch_size = 1000      # a 0.5 fraction of the 1,437 digits is 718 images
    with pytest.raises(pop_lib.PopulationError, match=r"train fraction 0.5 of 1437 images is 718 images, less than "
                       r"one batch of batch_size = 1000"):
        build.Builder(cfg, str(tmp_path))


def test_population_maps_inputs_to_its_range():
    arch = archs.Arch("mlp", 0, 1, "relu")
    pop = pop_lib.Population(arch, 3, (2, 2, 1), 8, 4, 0, None, (-1.0, 1.0))
    params = {"head": {"kernel": np.eye(4, 3, dtype=np.float32), "bias": np.zeros(3, np.float32)}}
    x = np.full((1, 2, 2, 1), 0.25, np.float32)
    np.testing.assert_allclose(pop.apply(params, x), [[-0.5, -0.5, -0.5]])
