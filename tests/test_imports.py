"""Importing public model zoos: small files in each released format, built here."""

import os
import random

import numpy as np
import pandas as pd
import pytest

from wa.eval import splits
from wa.learners import data as data_lib
from wa.zoo import imports, store

# Keras variables of the Small CNN Zoo CNN in the released column order (bias before kernel in each layer).
KERAS = [("sequential/conv2d/bias:0", (16,)), ("sequential/conv2d/kernel:0", (3, 3, 1, 16)),
         ("sequential/conv2d_1/bias:0", (16,)), ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)),
         ("sequential/conv2d_2/bias:0", (16,)), ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)),
         ("sequential/dense/bias:0", (10,)), ("sequential/dense/kernel:0", (16, 10))]
STEPS = (0, 1, 86)


def small_cnn_files(folder, runs: int = 12, seed: int = 0, drop_final: int = 1):
    """A Small CNN Zoo folder: ``runs`` runs with checkpoints at STEPS (the last ``drop_final`` runs lack step 86,
    as crashed runs do), rows shuffled like the released files; returns (weights, metrics)."""
    rng = np.random.default_rng(seed)
    rows, meta = [], []
    for r in range(runs):
        hp = {"config.activation": ["relu", "tanh"][r % 2], "config.b_init": "zeros", "config.dataset": "fashion_mnist",
              "config.dnn_architecture": "cnn", "config.dropout": 0.1 * (r % 3), "config.epochs": 86,
              "config.epochs_between_checkpoints": 20, "config.init_std": 0.01 * (r + 1),
              "config.l2reg": 1e-6 * (r + 1), "config.learning_rate": 1e-3 * (r + 1), "config.num_layers": 3,
              "config.num_units": 16, "config.optimizer": ["sgd", "adam", "rmsprop"][r % 3],
              "config.random_seed": 42, "config.train_fraction": [0.1, 0.25, 0.5, 1.0][r % 4],
              "config.w_init": ["he_normal", "RandomNormal", "TruncatedNormal", "orthogonal"][r % 4],
              "modeldir": f"/zoo/run_{r:03d}"}
        for s in STEPS[:len(STEPS) - (1 if r >= runs - drop_final else 0)]:
            rows.append(rng.normal(0, 0.1, 4970).astype(np.float32))
            acc = 0.1 + 0.8 * rng.uniform()
            meta.append({**hp, "step": s, "test_accuracy": acc, "test_loss": 2 - acc, "train_accuracy": acc + 0.01,
                         "train_loss": 1.9 - acc})
    perm = rng.permutation(len(rows))
    weights = np.stack(rows)[perm]
    metrics = pd.DataFrame(meta).iloc[perm].reset_index(drop=True)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "weights.npy"), weights)
    metrics.to_csv(os.path.join(folder, "metrics.csv.gz"), index=False, compression="gzip")
    off, lay = 0, []
    for name, shape in KERAS:
        n = int(np.prod(shape))
        lay.append({"varname": name, "start_idx": off, "end_idx": off + n, "shape": str(shape), "size": n})
        off += n
    pd.DataFrame(lay).to_csv(os.path.join(folder, "layout.csv"), index=False)
    return weights, metrics


def nfn_split_file(path, n_rows: int, seed: int = 1):
    """NFN's split file as released: a permutation of the rows after a stray leading 0 (a header read as data)."""
    order = np.random.default_rng(seed).permutation(n_rows)
    pd.Series(np.concatenate([[0], order])).to_csv(path, index=False, header=False)
    return np.concatenate([[0], order])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_cnn")
    weights, metrics = small_cnn_files(root / "src")
    order = nfn_split_file(root / "split.csv", len(weights))
    zoo = imports.run("small_cnn_zoo", str(root / "src"), str(root / "out"), str(root / "split.csv"), progress=False)
    return zoo, weights, metrics, order


def test_small_cnn_zoo_weights_land_in_wa_layout(imported):
    zoo, weights, metrics, _ = imported
    final = zoo.final()
    assert len(final) == 12 and len(zoo.metadata) == len(weights)
    assert set(final["arch_id"]) == {"cnn-d3-w16-v1-relu", "cnn-d3-w16-v1-tanh"}
    for _, r in zoo.metadata.iterrows():
        src = weights[int(r["source_row"])]
        p = zoo.load(int(r["model_id"]), int(r["epoch"]))
        # Released columns: conv2d/bias 0:16, conv2d/kernel 16:160, ..., dense/bias 4800:4810, dense/kernel 4810:.
        np.testing.assert_array_equal(p["conv_0"]["bias"], src[0:16])
        np.testing.assert_array_equal(p["conv_0"]["kernel"], src[16:160].reshape(3, 3, 1, 16))
        np.testing.assert_array_equal(p["conv_2"]["kernel"], src[2496:4800].reshape(3, 3, 16, 16))
        np.testing.assert_array_equal(p["head"]["kernel"], src[4810:].reshape(16, 10))
        m = metrics.iloc[int(r["source_row"])]
        assert r["test_acc"] == m["test_accuracy"] and r["epoch"] == m["step"]
        assert r["gen_gap"] == pytest.approx(m["train_accuracy"] - m["test_accuracy"])
        assert r["optimizer"] == {"sgd": "sgd_plain", "adam": "adam", "rmsprop": "rmsprop"}[m["config.optimizer"]]
        assert r["l2reg"] == m["config.l2reg"] and r["weight_decay"] == 2 * m["config.l2reg"]
    # The run whose final checkpoint is missing keeps its other checkpoints and has no NFN split.
    crashed = zoo.metadata.groupby("model_id")["epoch"].max()
    assert (crashed == 1).sum() == 1
    assert final.loc[final["epoch"] == 1, "nfn_split"].tolist() == ["none"]


def test_small_cnn_zoo_nfn_split_is_nfn_s(imported):
    zoo, weights, metrics, order = imported
    # NFN's ZooDataset, written out: rows in the file's order, the final ones kept, the second half test, the
    # first shuffled by random.Random(0) and cut 80/20.
    final_rows = [int(i) for i in order if metrics["step"].iloc[i] == 86]
    half = int(0.5 * len(final_rows))
    tv = list(range(half))
    random.Random(0).shuffle(tv)
    cut = int(0.8 * len(tv))
    expect = {}
    for pos, part in [(p, "train") for p in tv[:cut]] + [(p, "val") for p in tv[cut:]] + [
            (p, "test") for p in range(half, len(final_rows))]:
        expect.setdefault(final_rows[pos], part)
    final = zoo.final()
    got = dict(zip(final["final_source_row"], final["nfn_split"], strict=True))
    assert {r: got[r] for r in expect} == expect
    ws = data_lib.load(zoo.path, final_only=True)
    parts = splits.by_column(ws.rows, "nfn_split")
    assert sum(len(v) for v in parts.values()) == 11 and len(parts["test"]) >= 5
    # What running the networks needs (a probing learner): their architecture, 28x28 images in [-1, 1].
    assert ws.forward.shape == (28, 28, 1) and ws.forward.input_range == (-1.0, 1.0)
    assert [a.id for a in ws.forward.archs] == ws.rows["arch_id"].tolist()


def test_probe_reads_an_imported_zoo_under_nfn_protocol(imported, tmp_path):
    from configs import probe as probe_configs
    from wa.learners import probe
    zoo, *_ = imported
    cfg = probe_configs.get_config("stats_gbt,smoke,nfn_protocol")
    cfg.zoo = zoo.path
    r = probe.run(cfg, str(tmp_path / "probe"), progress=False)
    assert set(r["tasks"]) == {"test_acc"} and r["data"]["split"]["kind"] == "column"
    assert r["data"]["test_networks"] == int((zoo.final()["nfn_split"] == "test").sum())
    assert r["ceilings"]["test_acc"] == {"measured": False, "why": "the zoo recorded no split halves of test_acc"}


@pytest.mark.parametrize("damage,message", [
    ("drop_column", r"metrics.csv.gz: lacks column 'config.l2reg'"),
    ("short_weights", r"metrics.csv.gz has 35 rows but .*weights.npy has 34"),
    ("layout_gap", r"layout.csv: its variables leave 144 of the 4970 columns of a weight row uncovered"),
    ("bad_init", r"config.w_init 'zeros' is not one wa knows"),
    ("bad_npy", r"weights.npy: not a NumPy .npy file"),
])
def test_small_cnn_zoo_bad_files_one_error_nothing_written(tmp_path, damage, message):
    src = tmp_path / "src"
    weights, metrics = small_cnn_files(src, runs=12)
    if damage == "drop_column":
        metrics.drop(columns=["config.l2reg"]).to_csv(src / "metrics.csv.gz", index=False, compression="gzip")
    elif damage == "short_weights":
        np.save(src / "weights.npy", weights[:-1])
    elif damage == "layout_gap":
        lay = pd.read_csv(src / "layout.csv")
        lay.drop(index=1).to_csv(src / "layout.csv", index=False)
    elif damage == "bad_init":
        metrics.loc[3, "config.w_init"] = "zeros"
        metrics.to_csv(src / "metrics.csv.gz", index=False, compression="gzip")
    elif damage == "bad_npy":
        (src / "weights.npy").write_bytes(b"not numpy")
    with pytest.raises(imports.ImportZooError, match=message):
        imports.run("small_cnn_zoo", str(src), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "zoo").exists() and not (tmp_path / "out" / "zoo.partial").exists()


def test_import_refuses_an_existing_zoo_and_a_foreign_split(imported, tmp_path):
    zoo, weights, *_ = imported
    out = os.path.dirname(zoo.path)
    with pytest.raises(imports.ImportZooError, match=r"zoo exists; import into another --workdir"):
        imports.run("small_cnn_zoo", os.path.join(os.path.dirname(out), "src"), out, progress=False)
    nfn_split_file(tmp_path / "other.csv", len(weights) + 5)
    with pytest.raises(imports.ImportZooError, match=r"other.csv: expected row indices in \[0, 35\)"):
        imports.run("small_cnn_zoo", os.path.join(os.path.dirname(out), "src"), str(tmp_path / "o"),
                    str(tmp_path / "other.csv"), progress=False)
    assert store.Zoo.open(zoo.path).final().shape[0] == 12


@pytest.mark.slow
def test_benchmark_on_an_imported_small_cnn_zoo_under_nfn_protocol(imported, tmp_path):
    """The command a user runs on the released Small CNN Zoo (after launch.import_zoo with NFN's split file)."""
    import json

    from tests import helpers
    zoo, *_ = imported
    bench = tmp_path / "bench"
    r = helpers.run_launch("experiments.nwa_benchmark", f"--zoo={zoo.path}", "--config_flags=nfn_protocol", "--smoke",
                           f"--workdir={bench}", "--learners=stats_gbt,spectral_gbt,probegen", "--cross_arch=",
                           "--published=small_cnn_fmnist", "--seeds=0")
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["networks"] == 12 and line["reliability"] == {}     # the crashed run is read, in no split
    res = json.load(open(bench / "results.json"))
    assert res["data"]["split"] == {**res["data"]["split"], "kind": "column", "column": "nfn_split"}
    assert res["data"]["test_networks"] == int((zoo.final()["nfn_split"] == "test").sum())
    text = open(bench / "report.md").read()
    assert "## Calibration against the published figure" in text and "| published | 0.920 | 0.9931 | 0.887 |" in text
    assert "| test_acc | not measured (the zoo recorded no split halves of test_acc) | | |" in text
    assert "stats_gbt fitted on nested subsets of this zoo's training networks" in text and res["gbt_curve"]
    # The probing learner runs the imported networks (their architecture and 28x28 inputs are recorded), and the
    # tables say it reads more than weights.
    assert "| probegen† |" in text and "† runs each network on learned input probes" in text


# ---- the Model Zoos of Schürholt et al. 2022 ----------------------------------------------------------------------
def model_zoos_folder(root, models: int = 4, epochs=(0, 1, 2), dropout_every: int = 2, seed: int = 0):
    """A zoo as released: per model params.json, result.json (JSON lines) and checkpoint_<epoch>/checkpoints
    (torch.save zip archives of the state dict; a model with dropout has its layers at shifted module indices)."""
    import json

    from tests.test_hostile import _bin
    rng = np.random.default_rng(seed)
    shapes = [(8, 1, 5, 5), (6, 8, 5, 5), (4, 6, 2, 2), (20, 36), (10, 20)]
    truth = {}
    for m in range(models):
        d = root / f"NN_tune_trainable_abcde_{m:05d}_{m}_seed={m + 1}_2021-07-01_16-59-53"
        d.mkdir(parents=True)
        drop = 0.5 if m % dropout_every else 0.0
        params = {"model::type": "CNN", "model::nlin": ["tanh", "relu", "leakyrelu", "gelu"][m % 4],
                  "model::init_type": "uniform", "model::dropout": drop, "optim::optimizer": "adam",
                  "optim::lr": 3e-4, "optim::wd": 0.0, "seed": m + 1, "training::batchsize": 10, "model::o_dim": 4}
        (d / "params.json").write_text(json.dumps(params))
        lines = []
        for e in epochs:
            lines.append(json.dumps({"training_iteration": e, "train_acc": 0.5 + 0.01 * e + 0.1 * m,
                                     "test_acc": 0.45 + 0.01 * e + 0.1 * m, "train_loss": 1.0, "test_loss": 1.1}))
            idx = [0, 3, 6, 9, 11] if not drop else [0, 4, 8, 11, 14]
            tensors, storages, ws = {}, {}, []
            for j, (i, shape) in enumerate(zip(idx, shapes, strict=True)):
                w = rng.normal(size=shape).astype(np.float32)
                b = rng.normal(size=shape[0]).astype(np.float32)
                ws.append((w, b))
                for part, a in (("weight", w), ("bias", b)):
                    key = f"{j}{part[0]}"
                    stride = tuple(int(np.prod(a.shape[k + 1:])) for k in range(a.ndim))
                    tensors[f"module_list.{i}.{part}"] = (key, a.size, 0, a.shape, stride)
                    storages[key] = a.tobytes()
            (d / f"checkpoint_{e:06d}").mkdir()
            _bin(d / f"checkpoint_{e:06d}" / "checkpoints", tensors, storages)
            truth[(m, e)] = ws
        (d / "result.json").write_text("\n".join(lines) + "\n")
    return truth


def test_model_zoos_import_and_the_pool_cnn_computes_as_torch_would(tmp_path):
    truth = model_zoos_folder(tmp_path / "src")
    zoo = imports.run("model_zoos", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    final = zoo.final()
    assert len(final) == 4 and set(final["family"]) == {"cnn_pool"} and set(final["epoch"]) == {2}
    assert final["activation"].tolist() == ["tanh", "relu", "leaky_relu", "gelu"]
    assert zoo.metadata["test_acc"].tolist()[:3] == pytest.approx([0.45, 0.46, 0.47])
    for (m, e), ws in truth.items():
        p = zoo.load(m, e)
        for name, (w, b) in zip(("conv_0", "conv_1", "conv_2", "hidden_0", "head"), ws, strict=True):
            np.testing.assert_array_equal(p[name]["kernel"], w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T)
            np.testing.assert_array_equal(p[name]["bias"], b)
    # wa's PoolCNN against the same network written out in numpy as PyTorch computes it (NCHW, cross-correlation,
    # 2x2 max-pool, flatten channel-major).
    from wa.zoo import archs
    ws = truth[(0, 2)]
    x = np.random.default_rng(3).normal(size=(2, 1, 28, 28)).astype(np.float32)

    def conv(x, w, b):
        k = w.shape[-1]
        h = x.shape[-1] - k + 1
        patches = np.stack([x[:, :, i:i + h, j:j + h] for i in range(k) for j in range(k)], -1)  # N C H W kk
        return np.einsum("nchwk,ock->nohw", patches, w.reshape(*w.shape[:2], -1)) + b[None, :, None, None]

    def pool(x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    h = pool(np.tanh(conv(x, *ws[0])))
    h = pool(np.tanh(conv(h, *ws[1])))
    h = np.tanh(conv(h, *ws[2])).reshape(2, -1)
    h = np.tanh(h @ ws[3][0].T + ws[3][1])
    ref = h @ ws[4][0].T + ws[4][1]
    out = archs.Arch("cnn_pool", 3, 8, "tanh").module(10).apply({"params": zoo.load(0, 2)}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # The statistics and spectral learners read it as any chain (its dense layer over the 3x3x4 map as a 3x3 conv).
    from wa.weights import spectral, stats
    params = [zoo.load(int(m)) for m in final["model_id"]]
    assert stats.matrix(params, ["cnn_pool"] * 4)[0].shape == (4, 5 * 2 * 7)
    assert spectral.matrix(params, ["cnn_pool"] * 4)[0].shape == (4, 5 * 5)
    # A probing learner can run them: architecture and image size are recorded.
    fwd = data_lib.load(zoo.path, final_only=True).forward
    assert fwd.shape == (28, 28, 1) and {a.id for a in fwd.archs} == set(final["arch_id"])
    # The graph views carry 3x3 kernels at most: its 5x5 ones are one clear error.
    from wa.weights import graph
    with pytest.raises(graph.GraphError, match=r"a 5x5 kernel \(25 taps\).*statistics or spectral learners"):
        graph.to_blocks(params[0], "cnn_pool", "tanh")
    # launch.probe reads it with its default tasks: those the zoo cannot answer are skipped, each with its reason.
    from configs import probe as probe_configs
    from wa.learners import probe
    cfg = probe_configs.get_config("stats_gbt,smoke")
    cfg.zoo = zoo.path
    r = probe.run(cfg, str(tmp_path / "probe"), progress=False)
    assert set(r["tasks"]) == {"architecture", "test_acc", "gen_gap"}     # architecture: the activation here
    assert r["skipped_tasks"]["disparity"] == "the zoo has no metadata column 'disparity_std'"


@pytest.mark.parametrize("damage,message", [
    ("type", r"params.json: model::type 'CNN3'; wa reads the Model Zoos' small CNN"),
    ("shape", r"checkpoints: conv_1 has weight \(6, 8, 3, 3\)"),
    ("json", r"result.json: line 2 is not JSON"),
    ("zip", r"checkpoints: not a torch zip archive"),
])
def test_model_zoos_bad_files_one_error_nothing_written(tmp_path, damage, message):
    import json
    model_zoos_folder(tmp_path / "src", models=2)
    d = sorted((tmp_path / "src").iterdir())[1]
    if damage == "type":
        p = json.loads((d / "params.json").read_text())
        (d / "params.json").write_text(json.dumps({**p, "model::type": "CNN3"}))
    elif damage == "shape":
        from tests.test_hostile import _bin
        w = np.zeros((6, 8, 3, 3), np.float32)
        t = {"module_list.0.weight": ("a", 200, 0, (8, 1, 5, 5), (25, 25, 5, 1)),
             "module_list.0.bias": ("b", 8, 0, (8,), (1,)),
             "module_list.3.weight": ("c", w.size, 0, w.shape, (72, 9, 3, 1)),
             "module_list.3.bias": ("d", 6, 0, (6,), (1,)),
             "module_list.6.weight": ("e", 96, 0, (4, 6, 2, 2), (24, 4, 2, 1)),
             "module_list.6.bias": ("f", 4, 0, (4,), (1,)),
             "module_list.9.weight": ("g", 720, 0, (20, 36), (36, 1)), "module_list.9.bias": ("h", 20, 0, (20,), (1,)),
             "module_list.11.weight": ("i", 200, 0, (10, 20), (20, 1)),
             "module_list.11.bias": ("j", 10, 0, (10,), (1,))}
        _bin(d / "checkpoint_000001" / "checkpoints", t,
             {k: np.zeros(n, np.float32).tobytes() for k, n, *_ in t.values()})
    elif damage == "json":
        (d / "result.json").write_text('{"training_iteration": 0, "test_acc": 0.1}\n{oops\n')
    elif damage == "zip":
        (d / "checkpoint_000002" / "checkpoints").write_bytes(b"PK not really")
    with pytest.raises(imports.ImportZooError, match=message):
        imports.run("model_zoos", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "zoo").exists() and not (tmp_path / "out" / "zoo.partial").exists()


def test_checkpoints_with_non_finite_weights_are_left_out_and_counted(tmp_path):
    weights, metrics = small_cnn_files(tmp_path / "src", runs=4, drop_final=0)
    bad = int(np.flatnonzero(metrics["step"].to_numpy() == 86)[0])
    weights[bad, 7] = np.nan
    np.save(tmp_path / "src" / "weights.npy", weights)
    zoo = imports.run("small_cnn_zoo", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    assert zoo.info["source"]["dropped_checkpoints"] == 1 and len(zoo.metadata) == len(weights) - 1
    assert bad not in set(zoo.metadata["source_row"]) and zoo.final()["epoch"].tolist().count(1) == 1
