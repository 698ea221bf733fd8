"""Public model zoos into wa's zoo store, so that every learner and benchmark reads them as it reads wa's own.

A format is one ``register(Format(...))``: a reader that checks the source folder and returns an ``Imported``
(the plan table, the parameter layout, the metadata rows, and the weights row by row); ``write`` stores it.
Everything is checked before anything is written, and the store is written into ``<workdir>/zoo.partial`` and
renamed to ``<workdir>/zoo`` only once complete: a bad file gives one error naming it, and a failed import leaves
no zoo behind.

``small_cnn_zoo`` — the Small CNN Zoo of Unterthiner et al. 2020 ("Predicting Neural Network Accuracy from
Weights"; files as released with ``google-research/dnn_predict_accuracy``, CC-BY 4.0): ``weights.npy`` (one row
of 4,970 weights per checkpoint), ``metrics.csv.gz`` (row i describes row i of the weights: the run's
``config.*`` hyperparameters, its ``modeldir``, the ``step`` (epoch) and train/test accuracy and loss) and
``layout.csv`` (``varname, start_idx, end_idx, shape`` per Keras variable, kernels in Keras' [kh, kw, in, out] /
[in, out] order, as wa's Flax modules hold them). A run (``modeldir``) is one model, its steps its checkpoints.
Given NFN's split file (``predict_gen_data_splits/<dataset>_split.csv`` of ``AllanYangZhou/nfn``: one row index
per line, a permutation of the rows read without a header), every model gets the split NFN's ``ZooDataset`` puts
its final checkpoint (step 86) in — the rows in that order, the final ones kept, the second half test, the first
half shuffled by Python's ``random.Random(0)`` and cut 80/20 into train and val — as metadata column
``nfn_split``, which ``configs/probe.py:nfn_protocol`` splits by.

``model_zoos`` — the Model Zoos of Schürholt et al. 2022 (their small CNN: ``read_model_zoos``), stored as wa's
``cnn_pool`` family.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from collections.abc import Callable

import numpy as np
import pandas as pd
from absl import logging

from wa import errors, report
from wa.zoo import archs
from wa.zoo import store as store_lib


class ImportZooError(errors.DataError):
    pass


@dataclasses.dataclass
class Imported:
    """A zoo read from public files, ready to store. ``weights(rows)`` yields, for a block of plan rows, the
    float32 array [len(rows), n_checkpoints, P] in the layout's order (NaN where a checkpoint is missing)."""
    plan: pd.DataFrame           # one row per model (model_id, layout_id, row, unit, architecture, hyperparameters)
    layouts: dict[str, list[dict]]
    n_checkpoints: int
    metadata: pd.DataFrame       # one row per stored (model, checkpoint): model_id, checkpoint, epoch, properties
    weights: Callable[[np.ndarray], np.ndarray]
    info: dict


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    read: Callable[..., Imported]
    about: str


FORMATS: dict[str, Format] = {}


def register(f: Format) -> Format:
    FORMATS[f.name] = f
    return f


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise ImportZooError(f"{path} does not exist: {what}")
    return path


# ---- the Small CNN Zoo --------------------------------------------------------------------------------------
SMALL_CNN_COLUMNS = ("config.activation", "config.w_init", "config.optimizer", "config.learning_rate",
                     "config.l2reg", "config.dropout", "config.init_std", "config.train_fraction", "modeldir", "step",
                     "test_accuracy", "test_loss", "train_accuracy", "train_loss")
# Keras initializer and optimizer names -> wa's (``wa.zoo.archs.INIT_SCHEMES``, ``wa.zoo.population.OPTIMIZERS``).
KERAS_INITS = {"he_normal": "he_normal", "orthogonal": "orthogonal", "glorot_normal": "glorot_normal",
               "glorot_uniform": "glorot_uniform", "he_uniform": "he_uniform", "randomnormal": "random_normal",
               "truncatednormal": "truncated_normal", "lecun_normal": "lecun_normal"}
KERAS_OPTIMIZERS = {"sgd": "sgd_plain", "adam": "adam", "rmsprop": "rmsprop"}
_VAR = re.compile(r"(?:.*/)?(conv2d|dense)(?:_(\d+))?/(kernel|bias):0$")


def _small_cnn_layout(path: str, n_params: int) -> tuple[list[dict], np.ndarray, int, int, int]:
    """(wa layout, column order that turns a released row into wa's flat vector, depth, width, classes)."""
    lay = pd.read_csv(path)
    missing = [c for c in ("varname", "start_idx", "end_idx", "shape") if c not in lay]
    if missing:
        raise ImportZooError(f"{path}: lacks column {missing[0]!r}; expected varname, start_idx, end_idx, shape")
    layers: dict[tuple[str, int], dict[str, tuple]] = {}
    covered = np.zeros(n_params, np.int64)
    for _, r in lay.iterrows():
        m = _VAR.match(str(r["varname"]))
        if not m:
            raise ImportZooError(f"{path}: variable {r['varname']!r} is not a Conv2D or Dense kernel or bias")
        try:
            shape = tuple(int(v) for v in re.findall(r"\d+", str(r["shape"])))
        except ValueError:
            shape = ()
        s, e = int(r["start_idx"]), int(r["end_idx"])
        if not 0 <= s < e <= n_params or int(np.prod(shape)) != e - s:
            raise ImportZooError(f"{path}: {r['varname']} spans columns {s}:{e} with shape {r['shape']}, which does "
                                 f"not fit rows of {n_params} weights")
        covered[s:e] += 1
        layers.setdefault((m.group(1), int(m.group(2) or 0)), {})[m.group(3)] = (s, e, shape)
    if (covered != 1).any():
        raise ImportZooError(f"{path}: its variables leave {int((covered == 0).sum())} of the {n_params} columns of a "
                             f"weight row uncovered and cover {int((covered > 1).sum())} twice")
    convs = sorted(k for k in layers if k[0] == "conv2d")
    dense = sorted(k for k in layers if k[0] == "dense")
    if len(dense) != 1 or not convs:
        raise ImportZooError(f"{path}: expected Conv2D layers then one Dense layer (the Small CNN Zoo CNN); found "
                             f"{len(convs)} Conv2D and {len(dense)} Dense")
    names = {k: f"conv_{i}" for i, k in enumerate(convs)} | {dense[0]: "head"}
    entries = []
    width, prev = None, 1
    for k in [*convs, dense[0]]:
        parts = layers[k]
        if set(parts) != {"kernel", "bias"}:
            raise ImportZooError(f"{path}: layer {k[0]}{'_' + str(k[1]) if k[1] else ''} lacks its "
                                 f"{({'kernel', 'bias'} - set(parts)).pop()}")
        ks = parts["kernel"][2]
        conv = k[0] == "conv2d"
        if (len(ks) != 4 if conv else len(ks) != 2) or parts["bias"][2] != ks[-1:]:
            raise ImportZooError(f"{path}: {names[k]} has kernel shape {ks} and bias shape {parts['bias'][2]}")
        if conv and (ks[0], ks[1]) != (3, 3):
            raise ImportZooError(f"{path}: {names[k]} has a {ks[0]}x{ks[1]} kernel; wa's CNN reads 3x3 kernels")
        if ks[-2] != prev and not (conv and k == convs[0]):
            raise ImportZooError(f"{path}: {names[k]} reads {ks[-2]} channels but the layer before gives {prev}")
        if conv:
            width = width or ks[-1]
            if ks[-1] != width:
                raise ImportZooError(f"{path}: convolutions of {width} and {ks[-1]} channels; wa's CNN has one width")
        prev = ks[-1]
        for part in ("bias", "kernel"):
            s, e, shape = parts[part]
            entries.append((f"{names[k]}/{part}", s, e, list(shape)))
    in_ch = layers[convs[0]]["kernel"][2][2]
    if in_ch != 1:
        raise ImportZooError(f"{path}: the first convolution reads {in_ch} channels; the Small CNN Zoo's are grayscale")
    layout = _layout_of({name: shape for name, _, _, shape in entries})
    span = {name: (s, e) for name, s, e, _ in entries}
    order = np.concatenate([np.arange(*span[e["path"]]) for e in layout])
    return layout, order, len(convs), int(width), int(prev)


def _layout_of(shapes: dict[str, list]) -> list[dict]:
    """wa's store layout (``store.layout_of``) of parameters given as {"layer/part": shape}."""
    tree: dict = {}
    for path, shape in shapes.items():
        layer, part = path.split("/")
        tree.setdefault(layer, {})[part] = np.empty(shape, np.float32)
    return store_lib.layout_of(tree)


def _nfn_splits(split_file: str, metrics: pd.DataFrame) -> dict[int, str]:
    """Row (of the released files) -> "train" / "val" / "test", as NFN's ZooDataset assigns its final rows."""
    try:
        order = pd.read_csv(split_file, header=None).to_numpy().ravel()
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ImportZooError(f"{split_file}: not a split file (one row index per line): {e}") from None
    if not np.issubdtype(order.dtype, np.integer) or order.min() < 0 or order.max() >= len(metrics):
        raise ImportZooError(f"{split_file}: expected row indices in [0, {len(metrics)}), found values "
                             f"{order.min() if len(order) else 'none'}..{order.max() if len(order) else ''}")
    if len(set(order.tolist())) != len(metrics):
        raise ImportZooError(f"{split_file}: lists {len(set(order.tolist()))} distinct rows; metrics.csv.gz has "
                             f"{len(metrics)} (a split file belongs to one data set's zoo)")
    final = order[metrics["step"].to_numpy()[order] == metrics["step"].max()]
    half = int(0.5 * len(final))
    trainval = list(range(half))
    cut = int(0.8 * len(trainval))
    random.Random(0).shuffle(trainval)
    which = {}
    for pos, part in [(p, "train") for p in trainval[:cut]] + [(p, "val") for p in trainval[cut:]] + [
            (p, "test") for p in range(half, len(final))]:
        # NFN's files list row 0 twice (a header line read as data); the first place it takes counts.
        which.setdefault(int(final[pos]), part)
    return which


def read_small_cnn_zoo(src: str, split_file: str = "") -> Imported:
    wpath = _need(os.path.join(src, "weights.npy"), "the Small CNN Zoo's weight matrix")
    mpath = _need(os.path.join(src, "metrics.csv.gz"), "the Small CNN Zoo's per-row metrics")
    lpath = _need(os.path.join(src, "layout.csv"), "the Small CNN Zoo's column layout")
    try:
        weights = np.load(wpath, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ImportZooError(f"{wpath}: not a NumPy .npy file: {e}") from None
    if weights.ndim != 2 or not np.issubdtype(weights.dtype, np.floating):
        raise ImportZooError(f"{wpath}: expected a 2-D float matrix (checkpoints x weights), found {weights.dtype} "
                             f"{weights.shape}")
    try:
        metrics = pd.read_csv(mpath)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as e:
        raise ImportZooError(f"{mpath}: cannot be read as a gzipped CSV: {e}") from None
    missing = [c for c in SMALL_CNN_COLUMNS if c not in metrics]
    if missing:
        raise ImportZooError(f"{mpath}: lacks column {missing[0]!r} (the Small CNN Zoo's metrics hold "
                             f"{', '.join(SMALL_CNN_COLUMNS)})")
    if len(metrics) != len(weights):
        raise ImportZooError(f"{mpath} has {len(metrics)} rows but {wpath} has {len(weights)}: row i of one "
                             "describes row i of the other, so the files are from different zoos or truncated")
    layout, order, depth, width, n_classes = _small_cnn_layout(lpath, weights.shape[1])
    for col, known in (("config.w_init", KERAS_INITS), ("config.optimizer", KERAS_OPTIMIZERS)):
        bad = sorted(set(metrics[col].astype(str).str.lower()) - set(known))
        if bad:
            raise ImportZooError(f"{mpath}: {col} {bad[0]!r} is not one wa knows ({sorted(known)})")
    bad_act = sorted(set(metrics["config.activation"]) - set(archs.ACTIVATIONS))
    if bad_act:
        raise ImportZooError(f"{mpath}: config.activation {bad_act[0]!r} is not one wa knows "
                             f"({sorted(archs.ACTIVATIONS)})")
    splits = _nfn_splits(split_file, metrics) if split_file else {}
    steps = sorted(int(s) for s in metrics["step"].unique())
    ck_of = {s: i for i, s in enumerate(steps)}

    runs = metrics.groupby("modeldir", sort=True)
    plan_rows, md_rows, sources = [], [], []
    lid = archs.Arch("cnn", depth, width, "relu", (("valid", 1),)).layout_id
    for model_id, (modeldir, g) in enumerate(runs):
        first = g.iloc[0]
        hp_cols = [c for c in SMALL_CNN_COLUMNS if c.startswith("config.")]
        if (g[hp_cols].nunique(dropna=False) > 1).any():
            raise ImportZooError(f"{mpath}: run {modeldir!r} has rows with different hyperparameters")
        if g["step"].duplicated().any():
            dup = int(g["step"][g["step"].duplicated()].iloc[0])
            raise ImportZooError(f"{mpath}: run {modeldir!r} lists step {dup} "
                                 "twice")
        arch = archs.Arch("cnn", depth, width, str(first["config.activation"]), (("valid", 1),))
        final_row = int(g.index[g["step"] == steps[-1]][0]) if (g["step"] == steps[-1]).any() else -1
        l2 = float(first["config.l2reg"])
        plan_rows.append({
            "model_id": model_id, "modeldir": str(modeldir), "family": "cnn", "arch_id": arch.id, "layout_id": lid,
            "activation": arch.activation, "arch_depth": depth, "arch_width": width, "valid": 1,
            **{k.name: 0 for f in archs.FAMILIES.values() for k in f.knobs if k.name != "valid"},
            "optimizer": KERAS_OPTIMIZERS[str(first["config.optimizer"]).lower()],
            "lr": float(first["config.learning_rate"]), "l2reg": l2, "weight_decay": 2 * l2,
            "dropout": float(first["config.dropout"]),
            "init_scheme": KERAS_INITS[str(first["config.w_init"]).lower()],
            "init_std": float(first["config.init_std"]),
            "train_fraction": float(first["config.train_fraction"]), "label_noise": 0.0, "imbalance": 0.0,
            "augment": 0, "dataset": str(first.get("config.dataset", "")), "generation": 0, "parent_id": -1,
            "root_id": model_id, "mutation": "", "epochs": int(first.get("config.epochs", steps[-1])),
            "n_params": int(weights.shape[1]), "final_source_row": final_row,
            "nfn_split": splits.get(final_row, "none") if splits else "none"})
        for idx, r in g.iterrows():
            md_rows.append({"model_id": model_id, "checkpoint": ck_of[int(r["step"])], "epoch": int(r["step"]),
                            "source_row": int(idx), "test_acc": float(r["test_accuracy"]),
                            "test_loss": float(r["test_loss"]), "train_acc": float(r["train_accuracy"]),
                            "train_loss": float(r["train_loss"])})
        sources.append(g.index.to_numpy())
    plan = pd.DataFrame(plan_rows)
    md = pd.DataFrame(md_rows)
    md["gen_gap"] = md["train_acc"] - md["test_acc"]
    md["loss_gap"] = md["test_loss"] - md["train_loss"]
    src_of = {(int(m), int(c)): int(s) for m, c, s in zip(md["model_id"], md["checkpoint"], md["source_row"],
                                                        strict=True)}

    def read(models: np.ndarray) -> np.ndarray:
        out = np.full((len(models), len(steps), len(order)), np.nan, np.float32)
        for i, m in enumerate(models):
            for c in range(len(steps)):
                s = src_of.get((int(m), c))
                if s is not None:
                    out[i, c] = np.asarray(weights[s], np.float32)[order]
        return out

    dataset = str(metrics.get("config.dataset", pd.Series([""])).iloc[0])
    info = {"source": {"format": "small_cnn_zoo", "path": os.path.abspath(src), "split_file": split_file or None,
                       "rows": int(len(weights)), "steps": steps},
            "data": {"name": dataset, "n_classes": n_classes, **({"shape": SMALL_CNN_SHAPES[dataset]}
                                                                  if dataset in SMALL_CNN_SHAPES else {})},
            # Their train_network.py scales every image to [-1, 1].
            "input_range": [-1.0, 1.0]}
    return Imported(plan, {lid: layout}, len(steps), md, read, info)


# The image each released zoo's networks read (the CIFAR-10 and SVHN zoos are grayscale).
SMALL_CNN_SHAPES = {"mnist": [28, 28, 1], "fashion_mnist": [28, 28, 1], "cifar10": [32, 32, 1],
                    "svhn_cropped": [32, 32, 1]}


register(Format("small_cnn_zoo", read_small_cnn_zoo, "Unterthiner et al. 2020's Small CNN Zoo (weights.npy, "
                "metrics.csv.gz, layout.csv; optional NFN split file)"))


# ---- the Model Zoos of Schürholt et al. 2022 -----------------------------------------------------------------------
MZ_ACTIVATIONS = {"tanh": "tanh", "relu": "relu", "sigmoid": "sigmoid", "gelu": "gelu", "leakyrelu": "leaky_relu",
                  "silu": "silu"}
# Their small CNN's tensors in forward order (PyTorch shapes; c = input channels), as wa's PoolCNN names them.
MZ_CNN = (("conv_0", (8, None, 5, 5)), ("conv_1", (6, 8, 5, 5)), ("conv_2", (4, 6, 2, 2)), ("hidden_0", (20, 36)),
          ("head", (10, 20)))
_CKPT = re.compile(r"checkpoint_(\d+)$")


def _mz_tensors(path: str) -> list[tuple[str, object, object]]:
    """(wa name, weight, bias) lazy tensors of one Model Zoos checkpoint, checked against their small CNN."""
    from wa.models import torch_bin
    try:
        t = torch_bin.TorchBin(path).tensors
    except torch_bin.TorchBinError as e:
        raise ImportZooError(str(e)) from None
    idx = {}
    for k in t:
        m = re.fullmatch(r"module_list\.(\d+)\.(weight|bias)", k)
        if not m:
            raise ImportZooError(f"{path}: tensor {k!r} is not module_list.<i>.weight/bias (the Model Zoos' CNN)")
        idx.setdefault(int(m.group(1)), {})[m.group(2)] = t[k]
    mods = [idx[i] for i in sorted(idx)]
    if len(mods) != len(MZ_CNN) or any(set(m) != {"weight", "bias"} for m in mods):
        raise ImportZooError(f"{path}: {len(mods)} layers with weights; the Model Zoos' small CNN has {len(MZ_CNN)} "
                             "(3 convolutions, 2 linear), each with weight and bias")
    out = []
    for (name, shape), m in zip(MZ_CNN, mods, strict=True):
        got = tuple(m["weight"].shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got, strict=True)) or \
                tuple(m["bias"].shape) != (got[0],):
            raise ImportZooError(f"{path}: {name} has weight {got} and bias {tuple(m['bias'].shape)}; the small CNN's "
                                 f"is {tuple('c' if s is None else s for s in shape)}")
        out.append((name, m["weight"], m["bias"]))
    return out


def read_model_zoos(src: str, split_file: str = "") -> Imported:
    """A zoo of Schürholt et al. 2022 (``ModelZoos/ModelZooDataset``; the MNIST, Fashion-MNIST, SVHN seed and
    hyperparameter zoos of their small CNN): one folder per model holding ``params.json`` (its config:
    ``model::type``, ``model::nlin``, ``model::init_type``, ``model::dropout``, ``optim::optimizer``,
    ``optim::lr``, ``optim::wd``, ``seed``, ...), ``result.json`` (one JSON object per line and epoch:
    ``training_iteration``, ``train_acc``, ``test_acc``, ``train_loss``, ``test_loss``, perhaps ``val_acc``) and
    ``checkpoint_<epoch>/checkpoints`` (``torch.save`` of the state dict, read without torch). A checkpoint's
    properties are the result line with ``training_iteration`` equal to its epoch, else the epoch-th line, as the
    dataset's own loader reads them; a checkpoint with no such line is left out."""
    if split_file:
        raise ImportZooError("--split is for small_cnn_zoo; the Model Zoos carry no fixed split file (split by model "
                             "or by seed with configs/probe.py)")
    folders = sorted(d for d in os.listdir(src) if os.path.isfile(os.path.join(src, d, "params.json")))
    if not folders:
        raise ImportZooError(f"{src}: no model folders (a folder holding params.json) in it; point --src at an "
                             "unzipped Model Zoos zoo")
    plan_rows, md_rows, files, epochs_all = [], [], {}, set()
    for model_id, d in enumerate(folders):
        folder = os.path.join(src, d)
        ppath = os.path.join(folder, "params.json")
        try:
            params = json.load(open(ppath))
        except (OSError, ValueError) as e:
            raise ImportZooError(f"{ppath}: not JSON ({e})") from None
        mtype = params.get("model::type")
        if mtype != "CNN":
            raise ImportZooError(f"{ppath}: model::type {mtype!r}; wa reads the Model Zoos' small CNN ('CNN')")
        act = MZ_ACTIVATIONS.get(str(params.get("model::nlin", "")).lower())
        if act is None:
            raise ImportZooError(f"{ppath}: model::nlin {params.get('model::nlin')!r} is not one of "
                                 f"{sorted(MZ_ACTIVATIONS)}")
        rpath = _need(os.path.join(folder, "result.json"), "the model's per-epoch results")
        lines = []
        with open(rpath) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        lines.append(json.loads(line))
                    except ValueError as e:
                        raise ImportZooError(f"{rpath}: line {n} is not JSON ({e})") from None
        by_iter = {int(r["training_iteration"]): r for r in lines if "training_iteration" in r}
        ckpts = {}
        for c in os.listdir(folder):
            m = _CKPT.match(c)
            if m and os.path.isfile(os.path.join(folder, c, "checkpoints")):
                ckpts[int(m.group(1))] = os.path.join(folder, c, "checkpoints")
        if not ckpts:
            raise ImportZooError(f"{folder}: no checkpoint_<epoch>/checkpoints file")
        tensors = {e: _mz_tensors(p) for e, p in ckpts.items()}   # every file checked before anything is written
        c_in = {int(t[0][1].shape[1]) for t in tensors.values()}
        if len(c_in) != 1:
            raise ImportZooError(f"{folder}: checkpoints with different input channels {sorted(c_in)}")
        arch = archs.Arch("cnn_pool", 3, 8, act)
        for e in sorted(ckpts):
            r = by_iter.get(e) or (lines[e] if e < len(lines) else None)
            if r is None or "test_acc" not in r:
                continue
            row = {"model_id": model_id, "epoch": e, "test_acc": float(r["test_acc"])}
            for k in ("train_acc", "test_loss", "train_loss", "val_acc", "val_loss"):
                if k in r:
                    row[k] = float(r[k])
            md_rows.append(row)
            files[(model_id, e)] = ckpts[e]
            epochs_all.add(e)
        plan_rows.append({
            "model_id": model_id, "folder": d, "family": "cnn_pool", "arch_id": arch.id, "layout_id": arch.layout_id,
            "activation": act, "arch_depth": 3, "arch_width": 8, "channels_in": c_in.pop(),
            **{k.name: 0 for f in archs.FAMILIES.values() for k in f.knobs},
            "optimizer": str(params.get("optim::optimizer", "")), "lr": float(params.get("optim::lr", np.nan)),
            "weight_decay": float(params.get("optim::wd", np.nan)), "dropout": float(params.get("model::dropout", 0)),
            "init_scheme": str(params.get("model::init_type", "")), "seed": int(params.get("seed", -1)),
            "batch_size": int(params.get("training::batchsize", -1)), "generation": 0, "parent_id": -1,
            "root_id": model_id, "mutation": "", "label_noise": 0.0, "imbalance": 0.0, "augment": 0})
    if not md_rows:
        raise ImportZooError(f"{src}: no checkpoint has a result line with test_acc")
    plan = pd.DataFrame(plan_rows)
    if plan["channels_in"].nunique() > 1:
        raise ImportZooError(f"{src}: models read {sorted(set(plan['channels_in']))} input channels; one zoo has one")
    epochs = sorted(epochs_all)
    ck_of = {e: i for i, e in enumerate(epochs)}
    md = pd.DataFrame(md_rows)
    md.insert(1, "checkpoint", md["epoch"].map(ck_of))
    if {"train_acc", "test_acc"} <= set(md):
        md["gen_gap"] = md["train_acc"] - md["test_acc"]
    lid = plan["layout_id"].iloc[0]
    c = int(plan["channels_in"].iloc[0])
    shapes = {"conv_0": (5, 5, c, 8), "conv_1": (5, 5, 8, 6), "conv_2": (2, 2, 6, 4), "hidden_0": (36, 20),
              "head": (20, 10)}
    layout = _layout_of({f"{n}/{part}": (list(s) if part == "kernel" else [s[-1]]) for n, s in shapes.items()
                         for part in ("bias", "kernel")})
    off = store_lib.n_params(layout)
    plan["n_params"] = off

    def read(models: np.ndarray) -> np.ndarray:
        out = np.full((len(models), len(epochs), off), np.nan, np.float32)
        for i, m in enumerate(models):
            for e, ci in ck_of.items():
                f = files.get((int(m), e))
                if f is None:
                    continue
                vals = {}
                for name, w, b in _mz_tensors(f):
                    w = w.numpy().astype(np.float32)
                    vals[f"{name}/kernel"] = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
                    vals[f"{name}/bias"] = b.numpy().astype(np.float32)
                out[i, ci] = np.concatenate([vals[e_["path"]].ravel() for e_ in layout])
        return out

    info = {"source": {"format": "model_zoos", "path": os.path.abspath(src), "models": len(plan), "epochs": epochs},
            # The dense layer's 36 inputs are a 3x3x4 map: 28x28 images (their MNIST zoos); other inputs unrecorded.
            "data": {"name": "", "n_classes": 10, "channels": c, **({"shape": [28, 28, 1]} if c == 1 else {})}}
    return Imported(plan, {lid: layout}, len(epochs), md, read, info)


register(Format("model_zoos", read_model_zoos, "Schürholt et al. 2022's Model Zoos, small CNN (a folder per model: "
                "params.json, result.json, checkpoint_<epoch>/checkpoints)"))


# ---- writing ---------------------------------------------------------------------------------------------------
def write(imp: Imported, workdir: str, chunk_models: int = 256, progress: bool = True) -> store_lib.Zoo:
    """Stores ``imp`` as ``<workdir>/zoo``. Checkpoints whose weights are not all finite are left out of the
    metadata (counted in ``zoo.json``'s ``source.dropped_checkpoints``); a model left with none is dropped."""
    final = os.path.join(workdir, "zoo")
    if os.path.exists(final):
        raise ImportZooError(f"{final} exists; import into another --workdir, or delete it to import again")
    tmp = os.path.join(workdir, "zoo.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plan = imp.plan.copy()
    plan["unit"] = np.arange(len(plan)) // chunk_models
    plan["row"] = np.arange(len(plan))
    if "seed" not in plan:
        plan["seed"] = 0
    plan = plan.set_index("model_id", drop=False)
    info = dict(imp.info, config={"imported": imp.info["source"]["format"]}, properties=[
        c for c in imp.metadata.columns if c not in ("model_id", "checkpoint", "epoch", "source_row")])
    zoo = store_lib.Zoo.create(tmp, plan, imp.layouts, imp.n_checkpoints, chunk_models, info)
    dropped = 0
    md = imp.metadata.set_index(["model_id", "checkpoint"], drop=False)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), unit="model", desc="import", disable=None)
    for unit, rows in plan.groupby("unit", sort=True):
        lid = rows["layout_id"].iloc[0]
        w = imp.weights(rows["model_id"].to_numpy())
        for c in range(imp.n_checkpoints):
            zoo.write(lid, int(rows["row"].iloc[0]), c, w[:, c])
        ok = np.isfinite(w).all(axis=2)            # [models, checkpoints]
        keep = []
        for i, m in enumerate(rows["model_id"]):
            for c in range(imp.n_checkpoints):
                if (int(m), c) in md.index:
                    if ok[i, c]:
                        keep.append((int(m), c))
                    else:
                        dropped += 1
        zoo.commit(int(unit), md.loc[keep].reset_index(drop=True).to_dict("records") if keep else [])
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    zinfo = dict(zoo.info)
    zinfo["source"] = dict(zinfo["source"], dropped_checkpoints=dropped)
    report.write_json(os.path.join(tmp, "zoo.json"), zinfo)
    os.replace(tmp, final)
    logging.info("imported %d models (%d checkpoints left out for non-finite weights) into %s", len(plan), dropped,
                 final)
    return store_lib.Zoo.open(final)


def run(fmt: str, src: str, workdir: str, split_file: str = "", progress: bool = True) -> store_lib.Zoo:
    if fmt not in FORMATS:
        raise ImportZooError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    if not os.path.isdir(src):
        raise ImportZooError(f"--src {src}: not a folder")
    imp = FORMATS[fmt].read(src, split_file) if split_file else FORMATS[fmt].read(src)
    return write(imp, workdir, progress=progress)
