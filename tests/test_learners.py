"""Learners that read weights: targets, permutation equivariance, the shared training loop, the CLIs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from configs import probe as probe_configs
from tests import helpers
from wa import learners
from wa.eval import permutation
from wa.learners import data as data_lib
from wa.train import loop as loop_lib
from wa.zoo import archs

ARCHS = [archs.Arch("mlp", 1, 4, "relu"), archs.Arch("cnn", 2, 3, "tanh"), archs.Arch("transformer", 1, 8, "gelu")]


def _set(n=18):
    """n random networks of three families; test accuracy is a function of the head's weights (learnable)."""
    params, rows = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        a = ARCHS[i % 3]
        p = a.module(10).init(jax.random.key(i), np.zeros((1, 8, 8, 1)))["params"]
        p = jax.tree.map(lambda x: np.asarray(x) * rng.uniform(0.5, 2.0), p)
        params.append(p)
        rows.append(dict(model_id=i, root_id=i, parent_id=-1, family=a.family, activation=a.activation,
                         arch_id=a.id, epoch=1, test_acc=float(np.abs(p["head"]["kernel"]).mean()),
                         gen_gap=float(rng.normal()), disparity_std=float(rng.uniform()),
                         **{"pgd_acc_0.1": float(rng.uniform())}, train_fraction=[0.25, 1.0][i % 2],
                         label_noise=0.0, imbalance=[0.0, 0.8][(i // 2) % 2], augment=i % 2))
    return data_lib.WeightSet(pd.DataFrame(rows), params)


def _cfg(variant, **train):
    c = probe_configs.get_config(variant + ",smoke")
    c.train.update(train)
    return c


def test_targets_scale_and_threshold_from_training_rows():
    ws = _set(6)
    train = np.array([0, 1, 2, 3])
    t = data_lib.targets(ws.rows, {"test_acc": 1.0, "vulnerable": 2.0, "family": 0.5}, train)
    acc = ws.rows["test_acc"].to_numpy()
    np.testing.assert_allclose(t.y["test_acc"], (acc - acc[train].mean()) / acc[train].std(), rtol=1e-5)
    np.testing.assert_allclose(t.truth("test_acc", np.arange(6)), acc, rtol=1e-5)
    pgd = ws.rows["pgd_acc_0.1"].to_numpy()
    assert t.spec["vulnerable"]["threshold"] == np.median(pgd[train])
    np.testing.assert_array_equal(t.y["vulnerable"], pgd < np.median(pgd[train]))
    assert t.spec["family"]["classes"] == ["cnn", "mlp", "transformer"] and t.y["family"].tolist() == [1, 0, 2] * 2
    assert t.out_dims() == {"test_acc": 0, "vulnerable": 2, "family": 3} and t.weights()["vulnerable"] == 2.0
    with pytest.raises(data_lib.DataError, match="unknown task 'colour'"):
        data_lib.targets(ws.rows, {"colour": 1.0}, train)


@pytest.mark.parametrize("variant,equivariant", [("nwpa", True), ("weightnet", True), ("weightnet_flat", False)])
def test_predictions_under_hidden_neuron_permutations(variant, equivariant):
    ws = _set(6)
    cfg = _cfg(variant)
    t = data_lib.targets(ws.rows, dict(cfg.tasks), np.arange(6))
    lr = learners.get(cfg.learner, cfg.model, t)
    feats = lr.prepare(ws.params, ws.families, ws.activations)
    lr.setup(feats, np.arange(6), cfg.train.batch_size)
    loop = loop_lib.Loop(lr, t, cfg.train)
    params, _ = loop.init(feats, np.arange(6))

    def predict(ps, fams, acts):
        return loop.predict(params, lr.prepare(ps, fams, acts), np.arange(len(ps)))

    g = permutation.gaps(predict, ws.params, ws.families, ws.activations, seed=3)
    assert g["networks"] == 6 and set(g["tasks"]) == set(cfg.tasks)
    if equivariant:
        assert g["max"] <= 1e-5, g
    else:
        assert g["max"] > 1e-3, g


def _fit(variant, workdir, model=None, **train):
    ws = _set(18)
    cfg = _cfg(variant, **train)
    cfg.model.update(model or {})
    idx = np.arange(18)
    t = data_lib.targets(ws.rows, dict(cfg.tasks), idx[:12])
    lr = learners.get(cfg.learner, cfg.model, t, cfg.train.devices)
    feats = lr.prepare(ws.params, ws.families, ws.activations)
    lr.setup(feats, idx[:12], cfg.train.batch_size)
    return loop_lib.Loop(lr, t, cfg.train).fit(feats, idx[:12], idx[12:], workdir, progress=False)


def test_loop_resume_is_exact_and_runs_are_deterministic(tmp_path):
    # The resumed run is a fresh process-like start (new loop, state from disk), so equality with the
    # uninterrupted run also shows the run is deterministic by seed.
    full = _fit("nwpa", str(tmp_path / "a"), epochs=2, patience=10)
    halted = _fit("nwpa", str(tmp_path / "b"), epochs=2, patience=10, halt_at=1)
    assert halted.epochs_run == 1
    resumed = _fit("nwpa", str(tmp_path / "b"), epochs=2, patience=10)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 2 and resumed.best_epoch == full.best_epoch
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hist = json.load(open(tmp_path / "b" / "history.json"))
    assert [h["epoch"] for h in hist] == [1, 2]
    assert [h["val_loss"] for h in hist] == [h["val_loss"] for h in full.history]
    assert set(hist[0]["val"]) == set(_cfg("nwpa").tasks) and "kendall_tau" in hist[0]["val"]["test_acc"]


def test_early_stopping_keeps_the_best_epoch():
    f = _fit("stats_mlp", None, epochs=30, patience=2, lr=0.3)   # a too-large step: validation loss soon rises
    losses = [h["val_loss"] for h in f.history]
    assert f.best_epoch == int(np.argmin(losses)) + 1 and f.epochs_run == f.best_epoch + 2 < 30


_DP = r"""
import json, sys
import numpy as np, jax
sys.path.insert(0, "{repo}")
from tests import test_learners as T
out = {{}}
for d in (1, 2):
    # Dropout off: each device draws its own dropout mask, so only dropout-free runs can be equal.
    f = T._fit("stats_mlp", None, model={{"dropout": 0.0}}, epochs=2, devices=d, batch_size=4)
    out[d] = [np.asarray(x).tolist() for x in jax.tree.leaves(f.params)]
print(json.dumps({{"n": len(jax.devices()), "same": all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
                                                      for a, b in zip(out[1], out[2]))}}))
"""


def test_data_parallel_over_two_devices_matches_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=helpers.REPO)
    r = subprocess.run([sys.executable, "-c", _DP.format(repo=helpers.REPO)], capture_output=True, text=True, env=env,
                       cwd=helpers.REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"n": 2, "same": True}


def test_baselines_learn_architecture_from_statistics():
    ws = _set(30)
    train, test = np.arange(21), np.arange(21, 30)
    for variant in ("stats_gbt", "pca_linear"):
        cfg = _cfg(variant)
        cfg.model.update(iters=50) if variant == "stats_gbt" else cfg.model.update(components=8)
        t = data_lib.targets(ws.rows, {"architecture": 1.0, "test_acc": 1.0}, train)
        lr = learners.get(cfg.learner, cfg.model, t)
        f = lr.prepare(ws.params, ws.families, ws.activations)
        lr.fit(f, train, test, 0)
        p = lr.predict(f, test)
        assert p["architecture"].shape == (9, 3) and p["test_acc"].shape == (9,)
        np.testing.assert_allclose(p["architecture"].sum(1), 1.0, rtol=1e-6)
        if variant == "stats_gbt":   # zero-padded depth statistics give the architecture away
            assert (p["architecture"].argmax(1) == t.y["architecture"][test]).all()
        else:
            assert p["embedding"].shape == (9, 8)


def test_probe_lineage_and_benchmark_clis_on_a_smoke_zoo(tmp_path):
    zoo = tmp_path / "zoo"
    helpers.run_launch("launch.make_zoo", "--config", "configs/zoo.py:smoke", "--workdir", str(zoo))
    store = str(zoo / "zoo")
    bad = helpers.run_launch("launch.probe", "--config", "configs/probe.py:nwpa,smoke", "--config.zoo=/nope",
                             "--workdir", str(tmp_path / "x"), rc=1)
    assert "'/nope' is not a zoo" in bad.stderr
    bad = helpers.run_launch("launch.probe", "--config", "configs/probe.py:nwpa,smoke", f"--config.zoo={store}",
                             "--config.learner=resnet", "--workdir", str(tmp_path / "x"), rc=1)
    assert "--config.learner='resnet'; known:" in bad.stderr and not (tmp_path / "x").exists()
    wd = tmp_path / "probe"
    args = ("--config", "configs/probe.py:nwpa,smoke", f"--config.zoo={store}", "--workdir", str(wd))
    out = helpers.run_launch("launch.probe", *args).stdout
    m = json.load(open(wd / "metrics.json"))
    assert set(m["tasks"]) == set(_cfg("nwpa").tasks) and "permutation gap" in out
    assert m["permutation"]["max"] <= 1e-5 and m["epochs_run"] == 2
    assert {"accuracy", "f1"} <= set(m["tasks"]["architecture"]) and "kendall_tau" in m["tasks"]["test_acc"]
    assert m["data"]["test_networks"] == len(pd.read_parquet(wd / "predictions.parquet"))
    assert np.load(wd / "embeddings.npy").shape == (m["data"]["test_networks"], 16)
    helpers.run_launch("launch.probe", *args)
    assert json.load(open(wd / "metrics.json"))["resumed_from"] == 2

    r = helpers.run_launch("launch.lineage", f"--zoo={store}", "--workdir", str(tmp_path / "lin")).stdout
    lin = json.load(open(tmp_path / "lin" / "lineage.json"))
    assert len(lin) == 3 and "mean directed-edge recovery" in r
    assert all(s["edges"] == 6 for s in lin.values())   # per architecture one tree: 2 children, 4 grandchildren

    bench = tmp_path / "bench"
    r = helpers.run_launch("experiments.nwa_benchmark", f"--zoo={store}", "--smoke", f"--workdir={bench}",
                           "--learners=stats_gbt,pca_linear", "--seeds=0,1", "--cross_arch=")
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(line) >= {"stats_gbt", "pca_linear"} and line["pca_linear"]["perm_gap"] > 0
    res = json.load(open(bench / "results.json"))
    assert res["headline"]["stats_gbt"]["test_acc"]["kendall_tau"]["values"].__len__() == 2
    assert res["cross_arch"] == {} and len(res["lineage"]["weights_all"]) == 3
    text = open(bench / "report.md").read()
    assert "## Targets (DESIGN.md)" in text and "| architecture accuracy ≥ 0.99 |" in text
