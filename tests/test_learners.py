"""Learners that read weights: targets, permutation equivariance, the shared training loop, the CLIs."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from configs import probe as probe_configs
from tests import helpers
from wa import errors, learners, runs
from wa.esa import backdoor
from wa.eval import permutation
from wa.learners import data as data_lib
from wa.train import loop as loop_lib
from wa.zoo import archs

ARCHS = [archs.Arch("mlp", 1, 4, "relu"), archs.Arch("cnn", 2, 3, "tanh"), archs.Arch("transformer", 1, 8, "gelu")]


def _set(n=18):
    """n random networks of three families; test accuracy is a function of the head's weights (learnable)."""
    params, rows = [], []
    rng = np.random.default_rng(0)
    init = [jax.jit(a.module(10).init) for a in ARCHS]   # compiled once per architecture, not op by op
    for i in range(n):
        a = ARCHS[i % 3]
        p = init[i % 3](jax.random.key(i), np.zeros((1, 8, 8, 1)))["params"]
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


def _initialized(variant, ws, **model):
    cfg = _cfg(variant)
    cfg.model.update(model)
    idx = np.arange(len(ws))
    t = data_lib.targets(ws.rows, dict(cfg.tasks), idx)
    lr = learners.get(cfg.learner, cfg.model, t)
    feats = lr.prepare(ws.params, ws.families, ws.activations)
    lr.setup(feats, idx, cfg.train.batch_size)
    loop = loop_lib.Loop(lr, t, cfg.train)
    return t, lr, loop, feats, loop.init(feats, idx)[0]


def _chains(ws):
    keep = np.flatnonzero(ws.families != "transformer")
    return data_lib.WeightSet(ws.rows.iloc[keep].reset_index(drop=True), [ws.params[i] for i in keep])


@pytest.mark.parametrize("variant,equivariant", [("nwpa", True), ("weightnet", True), ("weightnet_axial", True),
                                                 ("weightnet_flat", False),
                                                 ("nfn", True), ("nfn_np", True)])
def test_predictions_under_hidden_neuron_permutations(variant, equivariant):
    ws = _set(6)
    model = {}
    if variant.startswith("nfn"):
        ws = _chains(_set(9))
        model = {"layer": "np"} if variant == "nfn_np" else {}
        variant = "nfn"
    t, lr, loop, _, params = _initialized(variant, ws, **model)

    def predict(ps, fams, acts):
        return loop.predict(params, lr.prepare(ps, fams, acts), np.arange(len(ps)))

    g = permutation.gaps(predict, ws.params, ws.families, ws.activations, seed=3)
    # label_noise is 0 for every network of _set: a task with one class is skipped; _set has no backdoors.
    assert g["networks"] == 6 and set(g["tasks"]) == set(t.spec) == set(_cfg("nwpa").tasks) - {"label_noise",
                                                                                                "backdoored"}
    if equivariant:
        assert g["max"] <= 1e-5, g
    else:
        assert g["max"] > 1e-3, g


@pytest.mark.parametrize("variant", ["nwpa", "weightnet", "weightnet_flat"])
def test_bucketed_batches_predict_what_packed_batches_do(variant):
    """The dense per-architecture path and the packed edge-list path compute one function with one set of
    parameters; the batches of an epoch hold one architecture each and every row once."""
    ws = _set(9)
    out = {}
    for dense in (True, False):
        _, lr, loop, feats, params = _initialized(variant, ws, dense=dense, normalize=False)
        out[dense] = params, loop.predict(params, feats, np.arange(9))
        if dense:
            rows = [r for b, r in lr.batches(feats, np.arange(9), 4, np.random.default_rng(0))]
            assert sorted(np.concatenate(rows).ravel().tolist()) == [-1] * 3 + list(range(9))
            assert all(len({ws.rows["arch_id"][i] for i in r.ravel() if i >= 0}) == 1 for r in rows)
    for a, b in zip(jax.tree.leaves(out[True][0]), jax.tree.leaves(out[False][0]), strict=True):
        np.testing.assert_array_equal(a, b)
    for task, p in out[True][1].items():
        np.testing.assert_allclose(p, out[False][1][task], atol=2e-6, rtol=0)


def test_self_scoped_scaling_reads_any_architecture_alike():
    """norm_scope="self": each block by its own network's median / MAD, so a network's view does not depend on
    which architectures training held, and a scaled copy of a network (×1e3) reads the same but for the raw-scale
    node features."""
    ws = _set(6)
    cfg = _cfg("nwpa")
    cfg.model.norm_scope = "self"
    t = data_lib.targets(ws.rows, {"test_acc": 1.0}, np.arange(6))
    lr = learners.get(cfg.learner, cfg.model, t)
    feats = lr.prepare(ws.params + [jax.tree.map(lambda x: x * 1e3, ws.params[2])], list(ws.families) + ["transformer"],
                       list(ws.activations) + [ws.activations[2]])
    lr.setup(feats, np.array([0, 1, 3, 4]), 2)             # no transformer in training
    a, b = lr.view(feats[2]), lr.view(feats[6])
    for x, y in zip(a.weights, b.weights, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
        med = np.median(x)
        assert abs(med) < 1e-6 or np.abs(x).max() == cfg.model.clip
    np.testing.assert_allclose(a.nodes["x"][:, :4], b.nodes["x"][:, :4], rtol=1e-5, atol=1e-5)
    assert (b.nodes["x"][:, 4] >= a.nodes["x"][:, 4]).all() and b.nodes["x"][:, 4].max() > a.nodes["x"][:, 4].max()
    cfg.model.norm_scope = "layer"
    with pytest.raises(learners.LearnerError, match="norm_scope='layer'"):
        learners.get(cfg.learner, cfg.model, t).setup(feats, np.arange(4), 2)


def test_input_scaling_uses_training_rows_and_survives_a_diverged_network():
    ws = _set(12)
    ws.params[0] = jax.tree.map(lambda x: x * 1e4, ws.params[0])   # diverged (SGD blow-up), in training
    train = np.arange(8)
    for variant in ("nwpa", "stats_mlp"):
        cfg = _cfg(variant)
        t = data_lib.targets(ws.rows, {"test_acc": 1.0}, train)
        lr = learners.get(cfg.learner, cfg.model, t)
        feats = lr.prepare(ws.params, ws.families, ws.activations)
        lr.setup(feats, train, 4)
        # Test networks do not move the statistics: a huge test network changes nothing but itself.
        other = lr.prepare([jax.tree.map(lambda x: x * 1e6, ws.params[11])], ws.families[11:], ws.activations[11:])
        feats2 = list(feats[:11]) + list(other) if variant == "nwpa" else np.concatenate([feats[:11], other])
        lr2 = learners.get(cfg.learner, cfg.model, t)
        lr2.setup(feats2, train, 4)
        clip = cfg.model.clip
        if variant == "nwpa":
            views, views2 = [lr.view(f) for f in feats], [lr2.view(f) for f in feats2]
            for a, b in zip(views[:11], views2[:11], strict=True):
                for x, y in zip(a.weights, b.weights, strict=True):
                    np.testing.assert_array_equal(x, y)
            assert all(np.abs(w).max() <= clip for v in views for w in v.weights)
            assert np.abs(views[0].weights[0]).max() == clip and np.abs(views[1].weights[0]).max() < clip
            # The raw scale survives as a node feature: log(1 + RMS of incoming weights).
            assert views[0].nodes["x"][:, 4].max() > views[1].nodes["x"][:, 4].max() + 5
        else:
            x, x2 = lr.gather(feats, np.arange(12)), lr2.gather(feats2, np.arange(12))
            np.testing.assert_array_equal(x[:11], x2[:11])
            assert np.abs(x).max() == clip and np.median(np.abs(x[1:])) < 2


@pytest.mark.parametrize("variant", ["weightnet_flat", "flat_mlp"])
def test_permutation_augmentation_feeds_permuted_copies_while_training(variant):
    ws = _set(6)
    cfg = _cfg(variant)
    cfg.model.update(permute_augment=True, clip=1e9)   # no clipping: scaled features can be unscaled below
    t = data_lib.targets(ws.rows, {"test_acc": 1.0}, np.arange(6))
    lr = learners.get(cfg.learner, cfg.model, t)
    feats = lr.prepare(ws.params, ws.families, ws.activations)
    lr.setup(feats, np.arange(6), 2)
    rows = np.array([[0, 3]])   # one architecture (a bucket)
    plain, aug = lr.gather(feats, rows), lr.gather(feats, rows, np.random.default_rng(0))
    assert jax.tree.structure(plain) == jax.tree.structure(aug)
    leaves = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(aug),
                                                              strict=True)]
    assert any(not np.array_equal(a, b) for a, b in leaves)
    if variant == "flat_mlp":   # features are scaled per position: compare the networks' own values
        leaves = [(x * lr.scaler.scale_ + lr.scaler.center_ for x in ab) for ab in leaves]
    # The same values, moved: a permutation relabels units, it changes no weight.
    for a, b in leaves:
        np.testing.assert_allclose(np.sort(a, axis=None), np.sort(b, axis=None), rtol=1e-5, atol=1e-6)


def test_a_task_with_one_training_class_is_skipped_not_fatal():
    ws = _set(12)
    one = ws.rows.assign(arch_id=0)
    t = data_lib.targets(one, {"architecture": 1.0, "test_acc": 1.0}, np.arange(8))
    assert set(t.spec) == {"test_acc"} and "one class" in t.skipped["architecture"]
    cfg = _cfg("stats_gbt")
    lr = learners.get(cfg.learner, cfg.model, t)
    f = lr.prepare(ws.params, ws.families, ws.activations)
    lr.fit(f, np.arange(8), np.arange(8, 12), 0)
    assert set(lr.predict(f, np.arange(8, 12))) == {"embedding", "test_acc"}
    with pytest.raises(data_lib.DataError, match="every task was skipped"):
        data_lib.targets(one, {"architecture": 1.0}, np.arange(8))


def _fit(variant, workdir, model=None, **train):
    # Two families (two architectures, so batches of two buckets interleave): a third adds compiles, not cases.
    ws = _set(18)
    keep = np.flatnonzero(ws.families != "transformer")[:12]
    ws = data_lib.WeightSet(ws.rows.iloc[keep].reset_index(drop=True), [ws.params[i] for i in keep])
    cfg = _cfg(variant, **train)
    cfg.model.update(model or {})
    idx = np.arange(12)
    t = data_lib.targets(ws.rows, dict(cfg.tasks), idx[:8])
    lr = learners.get(cfg.learner, cfg.model, t, cfg.train.devices)
    feats = lr.prepare(ws.params, ws.families, ws.activations)
    lr.setup(feats, idx[:8], cfg.train.batch_size)
    return loop_lib.Loop(lr, t, cfg.train).fit(feats, idx[:8], idx[8:], workdir, progress=False)


def test_loop_resume_is_exact_and_runs_are_deterministic(tmp_path):
    # The resumed run is a fresh process-like start (new loop, state from disk), so equality with the
    # uninterrupted run also shows the run is deterministic by seed.
    full = _fit("nwpa", str(tmp_path / "a"), epochs=2, patience=10)
    halted = _fit("nwpa", str(tmp_path / "b"), epochs=2, patience=10, halt_at=1)
    assert halted.epochs_run == 1
    # A copy that lost history.json (deleted, or killed mid-write by an older wa) resumes from its checkpoint too:
    # only the curves before it are lost.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    os.remove(tmp_path / "c" / "history.json")
    no_history = _fit("nwpa", str(tmp_path / "c"), epochs=2, patience=10)
    assert no_history.resumed_from == 1 and [h["epoch"] for h in no_history.history] == [2]
    resumed = _fit("nwpa", str(tmp_path / "b"), epochs=2, patience=10)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 2 and resumed.best_epoch == full.best_epoch
    for a, b, c in zip(*(jax.tree.leaves(f.params) for f in (full, resumed, no_history)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    hist = json.load(open(tmp_path / "b" / "history.json"))
    assert [h["epoch"] for h in hist] == [1, 2]
    assert [h["val_loss"] for h in hist] == [h["val_loss"] for h in full.history]
    assert set(hist[0]["val"]) == set(_cfg("nwpa").tasks) - {"label_noise", "backdoored"}
    assert "kendall_tau" in hist[0]["val"]["test_acc"]


def test_early_stopping_keeps_the_best_epoch():
    f = _fit("stats_mlp", None, epochs=30, patience=2, lr=0.3)   # a too-large step: validation loss soon rises
    losses = [h["val_loss"] for h in f.history]
    assert f.best_epoch == int(np.argmin(losses)) + 1 and f.epochs_run == f.best_epoch + 2 < 30


def test_per_task_selection_keeps_each_tasks_best_epoch(monkeypatch):
    kept = {}
    orig = loop_lib.Loop.fit

    def fit(self, *a, **k):
        kept["loop"], kept["args"] = self, a
        return orig(self, *a, **k)

    monkeypatch.setattr(loop_lib.Loop, "fit", fit)
    f = _fit("stats_mlp", None, epochs=12, patience=3, lr=0.3, select="per_task")
    loop, (feats, _, val) = kept["loop"], kept["args"][:3]
    for t, e in f.task_best_epoch.items():
        score = [loop._task_score(t, h["val"][t]) for h in f.history]
        assert e == int(np.argmin(score)) + 1
    # Training runs while any task improves: it stops `patience` epochs after the last task's best.
    assert f.epochs_run == min(12, max(f.task_best_epoch.values()) + 3)
    assert len(set(f.task_best_epoch.values())) > 1   # the case this exists for
    out = loop.predict_fit(f, feats, val)
    for t in f.task_best_epoch:
        np.testing.assert_array_equal(out[t], loop.predict(f.task_params[t], feats, val)[t])
    np.testing.assert_array_equal(out["embedding"], loop.predict(f.params, feats, val)["embedding"])
    with pytest.raises(loop_lib.LoopError, match="select='best'"):
        _fit("stats_mlp", None, epochs=1, select="best")


def test_curriculum_feeds_the_smaller_networks_first():
    ws = _set(12)
    cfg = _cfg("stats_mlp", curriculum=3)
    t = data_lib.targets(ws.rows, {"test_acc": 1.0}, np.arange(12))
    loop = loop_lib.Loop(learners.get(cfg.learner, cfg.model, t), t, cfg.train)
    size = np.array([100, 300, 200] * 4)
    idx = np.arange(12)
    assert [sorted(set(size[loop.curriculum(idx, size, e)])) for e in range(4)] == [
        [100], [100, 200], [100, 200, 300], [100, 200, 300]]
    assert loop.curriculum(idx, None, 0) is idx      # nothing to order by: every row
    with pytest.raises(errors.ConfigError, match=r"train.curriculum=-1: expected an integer >= 0"):
        from wa.learners import probe
        c = _cfg("stats_mlp", curriculum=-1)
        probe.check(c)


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


@pytest.mark.slow
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


def test_a_learner_is_one_record(monkeypatch, tmp_path):
    """One registered Entry is all configs/probe.py, the probe's checks and learners.get need; a structure learner
    with a ``stats`` setting also gets its multi-resolution variant, and its ablations are variants."""
    from wa.learners import base, baselines, nwpa, probe
    monkeypatch.setitem(learners.LEARNERS, "pca_small", learners.Entry(
        "pca_small", baselines.PCALinear, config=dict(components=3, alpha=1.0, c=1.0, clip=8.0),
        smoke=dict(components=2)))
    monkeypatch.setitem(learners.LEARNERS, "nwpa_wide", learners.Entry(
        "nwpa_wide", nwpa.Learner, structure=True, config={**learners.LEARNERS["nwpa"].config, "dim": 64},
        smoke=dict(dim=8, layers=1, heads=2), ablations={"nwpa_wide_no_dropout": dict(node_dropout=0.0)}))
    v = learners.variants()
    assert v["pca_small"] == ("pca_small", "baseline", {})
    assert v["nwpa_wide_stats"] == ("nwpa_wide", "multi_resolution", {"stats": True})
    assert v["nwpa_wide_no_dropout"] == ("nwpa_wide", "ablation", {"node_dropout": 0.0})
    roles = [role for _, role, _ in v.values()]
    assert roles == sorted(roles, key=base.ROLES.index)
    c = probe_configs.get_config("pca_small,smoke")
    assert c.learner == "pca_small" and c.model.components == 2 and c.model.alpha == 1.0
    (tmp_path / "zoo.json").write_text("{}")   # check() only asks that the zoo exists
    c.zoo = str(tmp_path)
    probe.check(c)
    assert isinstance(learners.get(c.learner, c.model, None), baselines.PCALinear)
    c = probe_configs.get_config("nwpa_wide_no_dropout")
    assert (c.learner, c.model.dim, c.model.node_dropout, c.model.edge_dropout) == ("nwpa_wide", 64, 0.0, 0.1)
    assert probe_configs.get_config("nwpa_wide_stats,smoke").model.to_dict() == {
        **learners.LEARNERS["nwpa"].config, "stats": True, "dim": 8, "layers": 1, "heads": 2}


def test_probe_checks_its_config_before_reading_the_zoo(tmp_path):
    from wa.learners import probe
    c = _cfg("nwpa")
    c.zoo = "/nope"
    with pytest.raises(probe.ProbeError, match="'/nope' is not a zoo"):
        probe.check(c)
    c.learner = "resnet"   # reported before the zoo is looked at
    with pytest.raises(probe.ProbeError, match="--config.learner='resnet'; known:"):
        probe.run(c, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_probe_runs_and_resumes_in_process(tmp_path, smoke_zoo):
    """The probe end to end in process: fit, write, resume a finished folder (the same loop for every learner;
    NWPA's fit and exact resume are test_loop_resume_is_exact_and_runs_are_deterministic's)."""
    from wa.learners import probe
    c = _cfg("stats_mlp")
    c.zoo = str(smoke_zoo / "zoo")
    wd = str(tmp_path / "probe")
    m = probe.run(c, wd, progress=False)
    assert set(m["tasks"]) == set(c.tasks) and m["epochs_run"] == 2 and m["resumed_from"] == 0
    assert {"accuracy", "f1"} <= set(m["tasks"]["architecture"]) and "kendall_tau" in m["tasks"]["test_acc"]
    assert m["data"]["test_networks"] == len(pd.read_parquet(os.path.join(wd, "predictions.parquet")))
    assert runs.complete(wd, "probe")
    again = probe.run(c, wd, progress=False)
    assert again["resumed_from"] == 2 and again["tasks"] == m["tasks"]


@pytest.mark.slow
def test_probe_cli_resumes_and_refuses_another_run(tmp_path, smoke_zoo):
    # The launcher's own work (flags, folder, outputs, refusals) with a learner that compiles once: every
    # learner runs through the same probe.run, and NWPA through the launcher took a minute of compiling here.
    zoo = smoke_zoo
    store = str(zoo / "zoo")
    bad = helpers.run_launch("launch.probe", "--config", "configs/probe.py:stats_mlp,smoke", "--config.nosuch=1", rc=2)
    helpers.one_line_error(bad, "--config.nosuch=1: the config configs/probe.py:stats_mlp,smoke has no field 'nosuch'")
    wd = tmp_path / "probe"
    args = ("--config", "configs/probe.py:stats_mlp,smoke", f"--config.zoo={store}", "--workdir", str(wd))
    out = helpers.run_launch("launch.probe", *args).stdout
    m = json.load(open(wd / "metrics.json"))
    assert set(m["tasks"]) == set(_cfg("stats_mlp").tasks) and "permutation gap" in out
    c = m["ceilings"]["test_acc"]
    assert f"(label ceiling: R² {c['r2_ceiling']:.3f}, τ {c['tau_ceiling']:.3f})" in out
    assert m["permutation"]["max"] <= 1e-5 and m["epochs_run"] == 2
    assert {"accuracy", "f1"} <= set(m["tasks"]["architecture"]) and "kendall_tau" in m["tasks"]["test_acc"]
    assert m["data"]["test_networks"] == len(pd.read_parquet(wd / "predictions.parquet"))
    assert np.load(wd / "embeddings.npy").shape == (m["data"]["test_networks"], 16)
    assert runs.complete(str(wd), "probe")
    # (Resuming a finished folder is test_probe_runs_and_resumes_in_process's: the same loop for every learner.)
    # Another config, or another zoo, in the same folder: refused before anything is touched.
    before = {f: (wd / f).read_bytes() for f in ("metrics.json", "run.json", "DONE.json")}
    bad = helpers.run_launch("launch.probe", *args, "--config.train.lr=0.01", rc=2)
    helpers.one_line_error(bad, "holds another run, so it cannot be resumed: config.train.lr: 0.001 in the folder, "
                                "0.01 now")
    assert {f: (wd / f).read_bytes() for f in before} == before
    # The zoo's own resume refuses another batch size (its metadata would mix two settings).
    zoo_json = (zoo / "zoo" / "zoo.json").read_bytes()
    bad = helpers.run_launch("launch.make_zoo", "--config", "configs/zoo.py:smoke", "--workdir", str(zoo),
                             "--config.batch_size=16", rc=2)
    helpers.one_line_error(bad, "config.batch_size: 32 in the folder, 16 now")
    assert (zoo / "zoo" / "zoo.json").read_bytes() == zoo_json


@pytest.mark.slow
def test_lineage_and_benchmark_clis_on_a_smoke_zoo(tmp_path, smoke_zoo):
    store = str(smoke_zoo / "zoo")
    r = helpers.run_launch("launch.lineage", f"--zoo={store}", "--workdir", str(tmp_path / "lin"),
                           "--methods=wa_v1,mother,fitted", "--train_fraction=0.34").stdout
    lin = json.load(open(tmp_path / "lin" / "lineage.json"))
    # Trees (a root and its descendants; most roots have none) split by root: every method scores the edges of
    # the trees the fitted ones did not learn from.
    rows = data_lib.load(store, final_only=True).rows
    test = ~rows["root_id"].isin(lin["train_roots"])
    assert lin["train_trees"] + lin["test_trees"] == rows["root_id"].nunique() and "directed" in r
    for name in ("wa_v1", "mother", "fitted"):
        for cl in ("known", "found"):
            scored = lin["methods"][name][cl]["archs"]
            assert sum(s["edges"] for s in scored.values()) == int((test & (rows["parent_id"] >= 0)).sum()) > 0
    assert lin["methods"]["fitted"]["known"]["sign"] in ("rise", "fall")
    assert "| method | trees | directed edges |" in open(tmp_path / "lin" / "lineage.md").read()
    bad = helpers.run_launch("launch.lineage", f"--zoo={store}", "--methods=oracle", rc=2)
    helpers.one_line_error(bad, "--methods: unknown ['oracle']")

    bench = tmp_path / "bench"
    r = helpers.run_launch("experiments.nwa_benchmark", f"--zoo={store}", "--smoke", f"--workdir={bench}",
                           "--learners=stats_gbt,spectral_gbt,pca_linear", "--seeds=0,1", "--cross_arch=")
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(line) >= {"stats_gbt", "spectral_gbt", "pca_linear"} and line["pca_linear"]["perm_gap"] > 0
    assert set(line["reliability"]) == {"test_acc", "gen_gap", "disparity", "vulnerable"}   # vulnerable: PGD acc.
    res = json.load(open(bench / "results.json"))
    # Histogram GBT does not use its seed: it runs once (--single_seed); the other learners once per seed.
    assert len(res["headline"]["stats_gbt"]["test_acc"]["kendall_tau"]["values"]) == 1
    assert len(res["headline"]["pca_linear"]["test_acc"]["kendall_tau"]["values"]) == 2
    assert res["cross_arch"] == {} and len(res["lineage"]["weights_all"]) == 3
    text = open(bench / "report.md").read()
    assert "## Targets" in text and "DESIGN" not in text and "| architecture accuracy ≥ 0.99 |" in text
    refused = helpers.run_launch("experiments.nwa_benchmark", f"--zoo={store}", "--smoke", f"--workdir={bench}2",
                                 "--learners=stats_gbt", "--config_flags=backdoor_only", rc=1)
    assert "leaves test_acc out of the tasks (['backdoored'])" in refused.stderr and not (bench.parent /
                                                                                         "bench2").exists()
    # The smoke zoo has BadNets backdoors: "backdoored" is a task, reported with its AUROC.
    assert set(res["headline"]["stats_gbt"]["backdoored"]) == {"accuracy", "f1", "auroc"}
    assert "### backdoored" in text

    # Neural Cleanse, the untrained reference detector, on every final model of the same zoo.
    r = helpers.run_launch("experiments.neural_cleanse", f"--zoo={store}", f"--workdir={tmp_path / 'nc'}", "--steps=5")
    nc = json.load(open(tmp_path / "nc" / "results.json"))
    cl = pd.read_parquet(tmp_path / "nc" / "cleanse.parquet")
    assert nc["all"]["models"] == len(cl) == rows["model_id"].nunique() and nc["all"]["backdoored"] == cl[
        "backdoored"].sum() > 0
    assert nc["all"]["auroc"] == backdoor.auroc(cl["anomaly_index"].tolist(), cl["backdoored"].tolist())
    assert set(cl["split"]) == {"train", "val", "test"} and (tmp_path / "nc" / "anomaly.png").exists()
    assert json.loads(r.stdout.strip().splitlines()[-1])["auroc"] == nc["all"]["auroc"]
    # Every R² and τ has its label ceiling beside it; the accuracy range is stated.
    c = res["ceilings"]["test_acc"]
    assert f"| test_acc | {c['half_r']:.3f} | {c['reliability']:.3f} | {c['tau_ceiling']:.3f} |" in text
    assert f"| *label ceiling* | {c['r2_ceiling']:.3f} | {c['tau_ceiling']:.3f} |  |" in text
    assert "Test accuracy of the networks read (min / 5% / median / 95% / max)" in text


def _forward(ws, shape=(8, 8, 1)):
    by_id = {a.id: a for a in ARCHS}
    return data_lib.Forward(tuple(by_id[i] for i in ws.rows["arch_id"]), shape, 10, (-1.0, 1.0))


def test_probegen_runs_every_network_on_the_same_learned_probes():
    from wa.learners import probegen
    ws = _set(6)
    cfg = _cfg("probegen")
    t = data_lib.targets(ws.rows, {"test_acc": 1.0}, np.arange(6))
    lr = learners.get(cfg.learner, cfg.model, t)
    with pytest.raises(learners.LearnerError, match="needs each network's architecture"):
        lr.prepare(ws.params, ws.families, ws.activations)
    nets = lr.prepare(ws.params, ws.families, ws.activations, _forward(ws))
    module = lr.module()
    batch, rows = next(lr.batches(nets, np.arange(6), 4, None))
    assert rows.tolist() == [[0, 3, -1, -1]]    # one architecture per batch, padded
    params = module.init(jax.random.key(0), jax.tree.map(lambda x: x[0], batch))["params"]
    probes = module.apply({"params": params}, method=lambda m: m.probes())
    assert probes.shape == (cfg.model.probes, 8, 8, 1) and -1 <= probes.min() < probes.max() <= 1
    out = module.apply({"params": params}, jax.tree.map(lambda x: x[0], batch), probes,
                       method=probegen.ProbeGen.outputs)
    for k, i in enumerate(rows[0][:2]):
        ref = ARCHS[0].module(10).apply({"params": ws.params[i]}, probes)
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-5)
    # Any image size: a 4x4 grid doubled and cropped (28 = 32 cropped), the zoo's channels.
    for shape in ((28, 28, 1), (32, 32, 3), (5, 7, 2)):
        gen = probegen.Generator(shape, 3, latent=4, width=2)
        p = gen.init(jax.random.key(0))
        assert gen.apply(p).shape == (3, *shape)
    with pytest.raises(learners.LearnerError, match="set up for inputs"):
        lr.prepare(ws.params, ws.families, ws.activations, _forward(ws, (28, 28, 1)))


def test_probegen_through_the_probe_on_a_zoo(tmp_path, smoke_zoo):
    """The zoo records what running its networks needs; the permutation check passes (a permuted network computes
    the same function) and the report marks the learner as one that runs networks."""
    from wa.learners import probe
    ws = data_lib.load(str(smoke_zoo / "zoo"))
    assert [a.id for a in ws.forward.archs] == ws.rows["arch_id"].tolist()
    assert ws.forward.shape == (8, 8, 1) and ws.forward.n_classes == 10
    c = _cfg("probegen")
    c.zoo = str(smoke_zoo / "zoo")
    m = probe.run(c, str(tmp_path / "p"), progress=False)
    assert set(m["tasks"]) == set(c.tasks) and m["epochs_run"] == 2
    assert m["permutation"]["max"] <= 1e-4 and m["weights_only"] is False
    from experiments import nwa_benchmark
    assert [nwa_benchmark.label(v) for v in ("probegen", "probegen_nonlinear", "nwpa_stats", "stats_gbt")] == \
        ["probegen†", "probegen_nonlinear†", "nwpa_stats", "stats_gbt"]


@pytest.mark.slow
def test_device_check_runs_end_to_end_at_smoke_sizes(tmp_path, smoke_zoo):
    """The GPU check's every section on CPU at toy sizes: each writes figures, none fails."""
    out = tmp_path / "device"
    r = helpers.run_launch("experiments.device_check", "--smoke", f"--out={out}", f"--zoo={smoke_zoo / 'zoo'}")
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["failed"] == [] and line["device"] == "cpu"
    res = json.load(open(out / "device_check.json"))
    s = {k: v["figures"] for k, v in res["sections"].items()}
    assert set(s) == {"tests", "steps", "plan", "llama8b", "esa", "zoo", "learners"} and s["tests"]["returncode"] == 0
    assert s["steps"]["steps"]["heavy_tail_device"]["seconds"] > 0 and s["steps"]["gini_error_bound"] < 1e-6
    assert s["plan"]["one_device"]["peak_estimate_bytes_per_device"] > 0 and "hvp" in s["plan"]["one_device"]
    assert s["llama8b"]["tokens_per_second"] > 0 and s["llama8b"]["mfu"] is None   # no peak for a CPU
    assert s["llama8b"]["three_scores_fit"] and s["zoo"]["models"] == 4 and s["zoo"]["speedup"] > 0
    assert s["esa"]["seconds"] > 0 and (out / "esa" / "report.md").exists()
    assert s["learners"]["stats_mlp"]["seconds_one_epoch_with_setup"] > 0
    md = (out / "device_check.md").read_text()
    assert md.startswith("# wa on cpu") and "| llama8b |" in md
