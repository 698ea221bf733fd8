"""The model zoo: population training, properties, plan, store."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import accuracy_score, recall_score

from configs import zoo as zoo_configs
from tests import helpers
from wa.data import images
from wa.zoo import archs, plan, store
from wa.zoo import population as pop_lib
from wa.zoo import properties as props


@pytest.fixture(scope="module")
def digits():
    return images.load("digits")


def _members(n, n_train, seed=0):
    rng = np.random.default_rng(seed)
    opts = ["sgd", "adam", "rmsprop"]
    hp = [dict(optimizer=opts[i % 3], lr=[0.05, 3e-3, 1e-3][i % 3], weight_decay=[0.0, 1e-3][i % 2],
               dropout=[0.0, 0.2][(i // 2) % 2], augment=i % 3) for i in range(n)]
    mask = rng.uniform(size=(n, n_train)) < np.linspace(0.4, 1.0, n)[:, None]
    labels = rng.integers(0, 10, (n, n_train)).astype(np.int32)
    keys = np.asarray(jax.vmap(jax.random.PRNGKey)(np.arange(n) + 100))
    return hp, mask, labels, keys


def _train(pop, hp, mask, labels, keys, images_, epochs, schemes, scales):
    params = pop.init(keys, schemes, scales)
    opt = pop.opt_init(params)
    params, opt, k, h, m, y = pop.shard((params, opt, keys, pop_lib.hparams_arrays(hp), mask, labels))
    x = pop.replicate(images_)
    for _ in range(epochs):
        params, opt, k, _ = pop.epoch(params, opt, k, h, m, y, x)
    return jax.tree.map(np.asarray, params)


def test_population_equals_members_trained_alone(digits):
    n = 6
    x = digits.x_train[:320]
    pop = pop_lib.Population(archs.Arch("mlp", 1, 8, "tanh"), 10, digits.shape, len(x), batch_size=32)
    hp, mask, labels, keys = _members(n, len(x))
    schemes = ["he_normal", "glorot_uniform", "lecun_normal"] * 2
    scales = np.linspace(0.5, 2.0, n)
    together = _train(pop, hp, mask, labels, keys, x, 2, schemes, scales)
    for i in range(n):
        alone = _train(pop, hp[i:i + 1], mask[i:i + 1], labels[i:i + 1], keys[i:i + 1], x, 2, schemes[i:i + 1],
                       scales[i:i + 1])
        for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(a[i], b[0], rtol=2e-5, atol=2e-6)
    # Different members really did train differently.
    w = together["hidden_0"]["kernel"]
    assert not np.allclose(w[0], w[1])


@pytest.mark.parametrize("name,reference,decay", [("sgd", lambda lr: optax.sgd(lr, momentum=0.9), "all"),
                                                  ("adam", optax.adam, "all"), ("rmsprop", optax.rmsprop, "all"),
                                                  ("sgd_plain", optax.sgd, "kernels"), ("adam", optax.adam, "kernels")])
def test_switchable_optimizer_is_optax(name, reference, decay):
    rng = np.random.default_rng(0)
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
    hp = {"lr": 0.01, "weight_decay": 1e-2, "optimizer": pop_lib.OPTIMIZER_NAMES.index(name)}
    mine = pop_lib.optimizer(hp, decay)
    # Keras' kernel_regularizer: decay on kernels only.
    mask = {"w": {"kernel": True, "bias": decay == "all"}}
    ref = optax.chain(optax.add_decayed_weights(1e-2, mask=mask), reference(0.01))
    p1 = p2 = params
    s1, s2 = mine.init(params), ref.init(params)
    for _ in range(5):
        g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
        u1, s1 = mine.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_init_scheme_and_scale(digits):
    pop = pop_lib.Population(archs.Arch("mlp", 1, 256, "relu"), 10, digits.shape, 100, batch_size=10)
    keys = np.asarray(jax.vmap(jax.random.PRNGKey)(np.arange(2)))
    p = pop.init(keys, ["he_normal", "he_normal"], np.array([1.0, 3.0]))
    k = p["hidden_0"]["kernel"]
    # he_normal: truncated normal with std sqrt(2 / fan_in); scale 3 triples it.
    np.testing.assert_allclose(k[0].std(), np.sqrt(2 / 64), rtol=0.05)
    np.testing.assert_allclose(k[1].std() / k[0].std(), 3.0, rtol=0.05)
    assert not p["hidden_0"]["bias"].any()


@pytest.mark.parametrize("size,stride", [(8, 2), (7, 2), (28, 2), (5, 1)])
def test_patch_conv_equals_flax_conv(size, stride):
    x = np.random.default_rng(0).normal(size=(3, size, size, 2)).astype(np.float32)
    mine = archs.Conv(5, stride=stride)
    params = mine.init(jax.random.key(1), x)["params"]
    params["bias"] = np.arange(5, dtype=np.float32)
    ref = nn.Conv(5, (3, 3), strides=(stride, stride), padding="SAME")
    np.testing.assert_allclose(mine.apply({"params": params}, x), ref.apply({"params": params}, x), rtol=1e-5,
                               atol=1e-5)


def test_every_architecture_runs(digits):
    for arch in (archs.Arch("mlp", 2, 8, "gelu"), archs.Arch("cnn", 3, 4, "relu"),
                 archs.Arch("transformer", 1, 8, "silu", (("patch", 4),))):
        m = arch.module(10)
        params = jax.jit(m.init)(jax.random.key(0), digits.x_test[:2])["params"]
        out = jax.jit(m.apply)({"params": params}, digits.x_test[:5])
        assert out.shape == (5, 10) and np.isfinite(out).all()
    with pytest.raises(archs.ArchError, match="unknown activation 'swishy'"):
        archs.Arch("mlp", 1, 8, "swishy").check()
    with pytest.raises(archs.ArchError, match="patch 3 does not tile 8x8"):
        archs.Arch("transformer", 1, 8, "relu", (("patch", 3),)).check((8, 8, 1))


# ---- properties against independent computations on a linear model --------------------------------------
def _linear_case(digits, n=3):
    pop = pop_lib.Population(archs.Arch("mlp", 0, 1, "relu"), 10, digits.shape, len(digits.y_train), batch_size=32)
    rng = np.random.default_rng(1)
    params = {"head": {"kernel": rng.normal(0, 0.3, (n, 64, 10)).astype(np.float32),
                       "bias": rng.normal(0, 0.1, (n, 10)).astype(np.float32)}}
    return pop, params


def _np_logits(params, i, x):
    return x.reshape(len(x), -1) @ params["head"]["kernel"][i] + params["head"]["bias"][i]


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_grad_x(params, i, x, y):
    p = _np_softmax(_np_logits(params, i, x))
    p[np.arange(len(y)), y] -= 1.0
    return (p @ params["head"]["kernel"][i].T).reshape(x.shape)


def test_properties_match_independent_computation(digits):
    spec = props.EvalSpec(fgsm_eps=(0.0, 0.1), pgd_eps=(0.1,), pgd_steps=3, pgd_random_start=False,
                          noise_sigma=(0.2,), ece_bins=10, train_examples=500, robust_examples=100, batch=128)
    pop, params = _linear_case(digits)
    ev = props.Evaluator(pop, spec)
    ed = props.EvalData.build(digits, spec, seed=3)
    n, nt = 3, len(digits.y_train)
    rng = np.random.default_rng(2)
    mask = rng.uniform(size=(n, nt)) < 0.7
    labels = np.where(rng.uniform(size=(n, nt)) < 0.2, rng.integers(0, 10, (n, nt)), digits.y_train).astype(np.int32)
    keys = np.asarray(jax.vmap(jax.random.PRNGKey)(np.arange(n)))
    rows = props.evaluate(ev, params, ed, mask, labels, keys)
    x, y = digits.x_test, digits.y_test
    for i, r in enumerate(rows):
        z = _np_logits(params, i, x)
        pred, prob = z.argmax(-1), _np_softmax(z)
        assert r["test_acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        assert r["test_loss"] == pytest.approx(-np.log(prob[np.arange(len(y)), y]).mean(), rel=1e-4)
        rec = recall_score(y, pred, average=None, labels=range(10), zero_division=0)
        np.testing.assert_allclose(r["class_acc"], rec, atol=1e-12)
        assert r["disparity_range"] == pytest.approx(rec.max() - rec.min(), abs=1e-12)
        assert r["disparity_std"] == pytest.approx(rec.std(), abs=1e-12)
        # ECE written independently: loop over examples into 10 bins (right-closed).
        conf, correct = prob.max(-1), pred == y
        bins = [[] for _ in range(10)]
        for c, ok in zip(conf, correct, strict=True):
            bins[min(int(np.ceil(c * 10)) - 1, 9)].append((c, ok))
        expect = sum(len(b) / len(y) * abs(np.mean([o for _, o in b]) - np.mean([c for c, _ in b])) for b in bins if b)
        assert r["ece"] == pytest.approx(expect, abs=1e-5)
        # Training accuracy: the model's own pool among the evaluated training images, its own labels.
        tm = mask[i, ed.train_index]
        tp = _np_logits(params, i, digits.x_train[ed.train_index]).argmax(-1)
        assert r["train_acc"] == pytest.approx((tp == labels[i, ed.train_index])[tm].mean(), abs=1e-12)
        assert r["gen_gap"] == pytest.approx(r["train_acc"] - r["test_acc"], abs=1e-12)
        # Noise: the stored noisy images, predicted in numpy.
        assert r["noise_acc_0.2"] == pytest.approx((_np_logits(params, i, ed.noisy[0.2]).argmax(-1) == y).mean())
        # FGSM with the analytic input gradient of a linear softmax classifier.
        xr, yr = x[:100], y[:100]
        assert r["fgsm_acc_0"] == pytest.approx((_np_logits(params, i, xr).argmax(-1) == yr).mean())
        xa = np.clip(xr + 0.1 * np.sign(_np_grad_x(params, i, xr, yr)), 0, 1)
        assert r["fgsm_acc_0.1"] == pytest.approx((_np_logits(params, i, xa).argmax(-1) == yr).mean(), abs=0.011)
        # PGD, same analytic gradient, no random start.
        xa = xr.copy()
        for _ in range(3):
            xa = xa + 2.5 * 0.1 / 3 * np.sign(_np_grad_x(params, i, xa, yr))
            xa = np.clip(np.clip(xa, xr - 0.1, xr + 0.1), 0, 1)
        pgd = (_np_logits(params, i, xa).argmax(-1) == yr).mean()
        assert r["pgd_acc_0.1"] == pytest.approx(pgd, abs=0.011)
        assert r["pgd_acc_0.1"] <= r["fgsm_acc_0"]
        # Every property again on each half of the evaluation images (disjoint, class-stratified).
        for h, name in enumerate(("a", "b")):
            te_h, tr_h = ed.halves["test"][h], ed.halves["train"][h]
            assert r[f"test_acc_half_{name}"] == pytest.approx(accuracy_score(y[te_h], pred[te_h]), abs=1e-12)
            rec_h = recall_score(y[te_h], pred[te_h], average=None, labels=range(10), zero_division=0)
            assert r[f"disparity_std_half_{name}"] == pytest.approx(rec_h.std(), abs=1e-12)
            own = (tp == labels[i, ed.train_index])[tr_h][tm[tr_h]]
            assert r[f"train_acc_half_{name}"] == pytest.approx(own.mean())
            rob_h = ed.halves["robust"][h]
            assert r[f"fgsm_acc_0_half_{name}"] == pytest.approx(
                (_np_logits(params, i, xr).argmax(-1) == yr)[rob_h].mean())
        assert r["test_acc"] == pytest.approx((r["test_acc_half_a"] * len(ed.halves["test"][0]) + r["test_acc_half_b"]
                                               * len(ed.halves["test"][1])) / len(y))
    a, b = ed.halves["test"]
    assert not set(a) & set(b) and len(a) + len(b) == len(y)
    assert max(abs((y[a] == c).sum() - (y[b] == c).sum()) for c in range(10)) <= 1


def test_eval_spec_rejects_negative_epsilon():
    c = zoo_configs.get_config("smoke")
    c.eval.pgd_eps = (0.1, -0.05)
    with pytest.raises(props.PropertyError, match=r"eval.pgd_eps = -0.05: must be >= 0"):
        props.EvalSpec.from_config(c.eval)


# ---- plan ------------------------------------------------------------------------------------------------
def test_plan_family_trees_and_rows():
    c = zoo_configs.get_config("smoke")
    p = plan.assign_rows(plan.make_plan(c, 10), 2)
    assert len(p) == 3 * (4 + 2 + 4)
    assert p["model_id"].tolist() == list(range(len(p)))
    kids = p[p["generation"] > 0]
    for _, k in kids.iterrows():
        par = p.loc[k["parent_id"]]
        assert par["generation"] == k["generation"] - 1 and par["arch_id"] == k["arch_id"]
        assert p.loc[k["root_id"], "generation"] == 0 and k["mutation"] in ("data", "classes", "hparams")
    assert (p[p["generation"] == 0]["parent_id"] == -1).all()
    # Rows: unique within a layout; every unit starts on a chunk boundary.
    assert not p.duplicated(["layout_id", "row"]).any()
    assert (p.groupby("unit")["row"].min() % 2 == 0).all()
    # Same config, same plan (every process and every restart computes it).
    assert store.plan_hash(p) == store.plan_hash(plan.assign_rows(plan.make_plan(c, 10), 2))


def test_training_data_characteristics():
    y = np.repeat(np.arange(10), 300)
    base = {"model_id": 0, "data_seed": 5, "train_fraction": 0.5, "imbalance": 0.0, "label_noise": 0.0,
            "classes": ",".join(map(str, range(10)))}
    m, lab, _ = plan.training_data(base, y, 10)
    assert m.sum() == 1500 and (lab == y).all()
    m, lab, _ = plan.training_data(dict(base, train_fraction=1.0, label_noise=0.3), y, 10)
    flipped = lab != y
    assert abs(flipped.mean() - 0.3) < 0.03 and m.all()
    m, _, _ = plan.training_data(dict(base, train_fraction=1.0, imbalance=0.8), y, 10)
    kept = np.bincount(y[m], minlength=10) / 300
    assert kept.max() > 0.95 and abs(kept.min() - 0.2) < 0.07
    m, _, _ = plan.training_data(dict(base, classes="1,4,7"), y, 10)
    assert set(np.unique(y[m])) == {1, 4, 7}


def test_badnets_trigger_is_a_checkerboard_in_the_corner():
    t = pop_lib.Trigger(patch=2, margin=1)
    where, value = t.arrays((5, 5, 1))
    assert np.argwhere(where[..., 0]).tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    assert value[2:4, 2:4, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]] and value.sum() == 2
    x = np.full((2, 5, 5, 3), 0.5, np.float32)
    y = t.stamp(x)
    assert y[:, 3, 3].tolist() == [[1.0] * 3] * 2 and y[:, 2, 3].tolist() == [[0.0] * 3] * 2
    assert (y[:, :2] == 0.5).all() and (y[:, :, 4] == 0.5).all()
    np.testing.assert_array_equal(np.asarray(t.stamp(jnp.asarray(x))), y)
    with pytest.raises(pop_lib.PopulationError, match="patch 5, margin 1"):
        pop_lib.Trigger(5, 1).check((5, 5, 1))


def test_backdoor_plan_leaves_every_other_draw_alone_and_poisons_the_asked_share():
    c = zoo_configs.get_config("smoke")
    with_bd = plan.make_plan(c, 10)
    del c.data_characteristics["backdoor"]
    without = plan.make_plan(c, 10)
    assert "backdoor" not in without and plan.trigger(c) is None
    assert with_bd.drop(columns=["backdoor", "backdoor_target", "backdoored"]).equals(without)
    assert set(with_bd["backdoor"]) == {0.0, 0.2} and (with_bd["backdoored"] == (with_bd["backdoor"] > 0)).all()
    kids = with_bd[with_bd["generation"] > 0]
    par = with_bd.loc[kids["parent_id"]]
    assert (kids["backdoor"].to_numpy() == par["backdoor"].to_numpy()).all()
    assert (kids["backdoor_target"].to_numpy() == par["backdoor_target"].to_numpy()).all()

    y = np.repeat(np.arange(10), 300)
    row = {"model_id": 0, "data_seed": 5, "train_fraction": 0.5, "imbalance": 0.0, "label_noise": 0.0,
           "classes": ",".join(map(str, range(10))), "backdoor": 0.1, "backdoor_target": 3}
    m, lab, poison = plan.training_data(row, y, 10)
    m0, lab0, p0 = plan.training_data(dict(row, backdoor=0.0), y, 10)
    assert (m == m0).all() and not p0.any() and (lab0 == y).all()
    assert poison.sum() == 150 and (poison <= m).all() and (y[poison] != 3).all()
    assert (lab[poison] == 3).all() and (lab[~poison] == y[~poison]).all()
    c.data_characteristics.backdoor = (0.0, 1.0)
    with pytest.raises(plan.PlanError, match=r"backdoor = \(0.0, 1.0\): each share .* in \[0, 1\)"):
        plan.make_plan(c, 10)


def test_plan_rejects_bad_config():
    c = zoo_configs.get_config("smoke")
    c.groups[0]["activation"] = "swishy"
    with pytest.raises(plan.PlanError, match=r"groups\[0\]: unknown activation 'swishy'"):
        plan.make_plan(c, 10)
    c = zoo_configs.get_config("smoke")
    c.checkpoints = (0, 3)
    with pytest.raises(plan.PlanError, match=r"checkpoints = \[0, 3\]: must be increasing epochs in \[0, 2\]"):
        plan.make_plan(c, 10)
    c = zoo_configs.get_config("smoke")
    with pytest.raises(plan.PlanError, match="does not divide over 4 devices"):
        plan.make_plan(c, 10, n_devices=4)


def test_missing_fashion_mnist_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(images.DataError, match="apt-get install -y dataset-fashion-mnist"):
        images.load("fmnist")
    with pytest.raises(images.DataError, match="unknown image data set 'cifar'"):
        images.load("cifar")


def test_data_sets():
    d = images.load("digits")
    assert (len(d.y_train), len(d.y_test), d.shape, d.n_classes) == (1437, 360, (8, 8, 1), 10)
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    m = images.load("mnist5k", max_test=200)
    assert (len(m.y_train), len(m.y_test), m.shape) == (4000, 200, (28, 28, 1))
    assert np.bincount(m.y_test).tolist() == [20] * 10


# ---- store -------------------------------------------------------------------------------------------------
def test_layout_roundtrip():
    params = {"b": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.ones(3)}, "a": {"pos": np.zeros((1, 2, 2))}}
    lay = store.layout_of(params)
    assert [e["path"] for e in lay] == ["a/pos", "b/bias", "b/kernel"] and store.n_params(lay) == 13
    back = store.from_flat(store.to_flat(params, lay, batched=False), lay)
    for k in ("bias", "kernel"):
        np.testing.assert_array_equal(back["b"][k], params["b"][k])


def test_make_zoo_smoke_store_and_queries(smoke_zoo):
    wd = smoke_zoo
    import json
    s = json.load(open(wd / "zoo_summary.json"))
    assert s["n_models"] == 30 and s["n_checkpoints"] == 12 * 3 + 18 * 2
    assert s["families"] == {"cnn": 10, "mlp": 10, "transformer": 10}
    assert s["family_trees_3_generations"] == 3 and s["models_per_second"] > 0
    assert s["test_acc"]["q00"] <= s["test_acc"]["q50"] <= s["test_acc"]["q100"]
    for f in ("report.md", "distributions.png", "train_vs_test.png", "development.png"):
        assert (wd / f).exists()
    assert "## How reliably each property is measured" in (wd / "report.md").read_text()
    z = store.Zoo.open(str(wd / "zoo"))
    md = z.metadata
    assert len(md) == 72 and not md.duplicated(["model_id", "checkpoint"]).any()
    for col in ("train_acc", "test_acc", "gen_gap", "ece", "fgsm_acc_0.05", "pgd_acc_0.1", "noise_acc_0.3",
                "disparity_range", "disparity_std", "n_params", "arch_depth", "arch_width", "activation", "family",
                "dataset", "lr", "weight_decay", "optimizer", "init_scheme", "init_scale", "dropout", "augment",
                "train_fraction", "label_noise", "imbalance", "parent_id", "root_id", "generation", "mutation"):
        assert col in md and md[col].notna().all(), col
    # The planted BadNets backdoors are learned: the trigger sends most backdoored models' test images to their
    # target, hardly any clean model's. Two epochs also leave the backdoored models biased towards the target (its
    # class is 20% of their pool), so the trigger's own effect is the rise over the unstamped images.
    fin = z.final()
    assert fin["backdoored"].any() and (~fin["backdoored"]).any() and fin["backdoor_success"].between(0, 1).all()
    bd = fin.groupby("backdoored")["backdoor_success"].median()
    assert bd[True] > 0.5 > 0.2 > bd[False], bd
    rise = (fin["backdoor_success"] - fin["backdoor_clean_rate"]).groupby(fin["backdoored"]).median()
    assert rise[True] > 0.05 > abs(rise[False]), rise
    assert "## Backdoors" in (wd / "report.md").read_text()
    # A child's first checkpoint is its parent's last.
    child = md[(md["generation"] == 1)].iloc[0]
    np.testing.assert_array_equal(z.load_flat(int(child["model_id"]), 0), z.load_flat(int(child["parent_id"])))
    params = z.load(int(child["model_id"]))
    arch = archs.Arch(child["family"], int(child["arch_depth"]), int(child["arch_width"]), child["activation"],
                      (("patch", int(child["patch"])),) if child["family"] == "transformer" else ())
    x = images.load("digits").x_test
    logits = arch.module(10).apply({"params": params}, x)
    acc = float((np.asarray(logits).argmax(-1) == images.load("digits").y_test).mean())
    last = md[md["model_id"] == child["model_id"]].iloc[-1]
    assert acc == pytest.approx(last["test_acc"], abs=1e-9)
    assert len(z.select('family == "cnn" and generation == 2')) == 4 * 2
    with pytest.raises(store.StoreError, match="has no checkpoint at epoch 7"):
        z.load(0, step=7)
    with pytest.raises(store.StoreError, match="does not exist"):
        z.load(10_000)


def _same_zoo(a: str, b: str):
    za, zb = store.Zoo.open(a), store.Zoo.open(b)
    ma, mb = za.metadata, zb.metadata
    assert ma.columns.tolist() == mb.columns.tolist() and len(ma) == len(mb)
    for col in ma.columns:
        if col == "class_acc":
            assert [list(x) for x in ma[col]] == [list(x) for x in mb[col]]
        else:
            assert ma[col].equals(mb[col]), col
    for lid in za.info["arrays"]:
        wa_, wb = za.array(lid).read().result(), zb.array(lid).read().result()
        assert np.array_equal(wa_, wb, equal_nan=True), lid


@pytest.mark.slow
def test_zoo_resumes_after_a_crash_and_splits_over_two_writers(tmp_path, smoke_zoo):
    ref, crashed, shared = smoke_zoo, tmp_path / "crashed", tmp_path / "two"
    smoke = ("--config", "configs/zoo.py:smoke")
    # Killed (os._exit, no clean-up) in generation 1, after unit 7 wrote its second checkpoint.
    helpers.run_launch("launch.make_zoo", *smoke, "--workdir", str(crashed), "--config.debug.crash_unit=7",
                       "--config.debug.crash_checkpoint=1", rc=17)
    z = store.Zoo.open(str(crashed / "zoo"))
    assert z.done_units() == {0, 1, 2, 3, 4, 5, 6}
    assert set(z.metadata["unit"]) == {0, 1, 2, 3, 4, 5, 6}  # unit 7's written weights are not visible
    with pytest.raises(store.StoreError, match="planned but not finished"):
        z.load(int(z.plan[z.plan["unit"] == 7]["model_id"].iloc[0]))
    r = helpers.run_launch("launch.make_zoo", *smoke, "--workdir", str(crashed))
    assert "has 15 units, 7 already done" in r.stderr
    _same_zoo(str(ref / "zoo"), str(crashed / "zoo"))
    # Two processes (jax.distributed, gloo) write disjoint units of one zoo at once.
    port = helpers.free_port()
    env = dict(__import__("os").environ, PYTHONPATH=helpers.REPO)
    import subprocess
    import sys
    procs = [subprocess.Popen([sys.executable, "-m", "launch.make_zoo", *smoke, "--workdir", str(shared),
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    for i, log in enumerate(logs):
        assert f"this process ({i} of 2) has" in log
    _same_zoo(str(ref / "zoo"), str(shared / "zoo"))


@pytest.mark.slow
def test_population_sharded_over_devices_equals_one_device():
    code = r'''
import jax, numpy as np
from jax.sharding import Mesh
from tests.test_zoo import _members, _train
from wa.data import images
from wa.zoo import archs, population as pop_lib
assert jax.device_count() == 4
d = images.load("digits")
x = d.x_train[:256]
hp, mask, labels, keys = _members(8, len(x))
out = []
for devs in (jax.devices(), jax.devices()[:1]):
    pop = pop_lib.Population(archs.Arch("cnn", 2, 4, "relu"), 10, d.shape, len(x), batch_size=32,
                             mesh=Mesh(np.array(devs), ("pop",)))
    out.append(_train(pop, hp, mask, labels, keys, x, 1, ["he_normal"] * 8, np.ones(8)))
    if len(devs) == 4:
        try:
            pop.check_size(6)
        except pop_lib.PopulationError as e:
            print("ERR", e)
for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print("OK")
'''
    out = helpers.run_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert "OK" in out
    assert "population of 6 models does not divide over the 4 devices" in out


@pytest.mark.parametrize("args,env,message", [
    (["--config.lineage.mutations=('data', 'grafting')"], {}, "lineage.mutations: unknown value 'grafting'"),
    (["--host_devices=2", "--config.population=3"], {}, "population = 3 does not divide over the 2 devices"),
    (["--config.data.name=fmnist"], {"WA_FASHION_MNIST": "/nowhere"}, "apt-get install -y dataset-fashion-mnist"),
    (["--config.eval.fgsm_eps=(0.1, -0.1)"], {}, "eval.fgsm_eps = -0.1: must be >= 0"),
])
def test_make_zoo_rejects_bad_config_before_training(tmp_path, args, env, message):
    r = helpers.run_launch("launch.make_zoo", "--config", "configs/zoo.py:smoke", "--workdir", str(tmp_path / "z"),
                           *args, env_extra=env, rc=2)
    helpers.one_line_error(r, message)
    assert not (tmp_path / "z" / "zoo").exists()
