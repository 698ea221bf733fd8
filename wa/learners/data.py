"""What a learner reads and predicts: networks from a zoo (``WeightSet``) and the tasks about them (``Targets``).

A task is a metadata column read as a class (architecture, data characteristics, backdoored or not), a number
(accuracy, generalization gap, disparity, a backdoor's success), or a number cut into two classes (``vulnerable``:
PGD accuracy below the training split's median). Regression targets are standardized with the training split's
mean and standard deviation; predictions are reported back in the column's own units.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from absl import logging

from wa import errors
from wa.zoo import archs, store


class DataError(errors.DataError):
    pass


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str            # "class", "regression" or "below_median"
    column: str
    about: str


TASKS = {
    "architecture": Task("class", "arch_id", "which of the zoo's architectures"),
    "family": Task("class", "family", "MLP, CNN or transformer"),
    "test_acc": Task("regression", "test_acc", "test accuracy"),
    "gen_gap": Task("regression", "gen_gap", "train minus test accuracy"),
    "disparity": Task("regression", "disparity_std", "std of per-class test accuracy"),
    "vulnerable": Task("below_median", "pgd_acc_0.1", "PGD (eps 0.1) accuracy below the training median"),
    "train_fraction": Task("class", "train_fraction", "share of the training set used"),
    "label_noise": Task("class", "label_noise", "share of training labels flipped"),
    "imbalance": Task("class", "imbalance", "class-imbalance level"),
    "augment": Task("class", "augment", "shift augmentation on or off"),
    "backdoored": Task("class", "backdoored", "trained with a BadNets patch backdoor (a share of its training images "
                       "stamped with a trigger and relabelled to one class)"),
    "backdoor_success": Task("regression", "backdoor_success", "share of triggered test images sent to the "
                             "model's backdoor target class"),
}
DATA_TASKS = ("train_fraction", "label_noise", "imbalance", "augment")


@dataclasses.dataclass(frozen=True)
class Forward:
    """What running the networks needs (a probing learner does; weights-only learners ignore it): each network's
    architecture, the zoo's input shape [H, W, C], its number of classes and the range of its inputs."""
    archs: tuple
    shape: tuple
    n_classes: int
    input_range: tuple = (0.0, 1.0)

    def subset(self, idx) -> Forward:
        return dataclasses.replace(self, archs=tuple(self.archs[int(i)] for i in idx))


def forward_of(rows: pd.DataFrame, info: dict) -> Forward | None:
    """The zoo's ``Forward`` for these rows, or None where the zoo does not say what its networks read."""
    data = info.get("data", {})
    need = {"family", "arch_depth", "arch_width", "activation"}
    if "shape" not in data or "n_classes" not in data or not need <= set(rows):
        return None
    if not set(rows["family"]) <= set(archs.FAMILIES):
        return None
    knobs = {f: [k.name for k in archs.family(f).knobs if k.name in rows] for f in rows["family"].unique()}
    cols = sorted(need | {k for v in knobs.values() for k in v})
    sub = rows[cols].fillna(-1)   # a knob column other families leave empty: NaN would not equal itself below
    made = {}
    for r in sub.drop_duplicates().to_dict("records"):
        f = r["family"]
        made[tuple(r[c] for c in cols)] = archs.Arch(f, int(r["arch_depth"]), int(r["arch_width"]),
                                                     str(r["activation"]), tuple((k, int(r[k])) for k in knobs[f]))
    out = [made[k] for k in zip(*(sub[c] for c in cols), strict=True)]
    rng = (info.get("config") or {}).get("input_range") or info.get("input_range") or (0.0, 1.0)
    return Forward(tuple(out), tuple(int(v) for v in data["shape"]), int(data["n_classes"]),
                   (float(rng[0]), float(rng[1])))


@dataclasses.dataclass
class WeightSet:
    """Networks (parameter pytrees, numpy) with their metadata rows, one per (model, checkpoint); ``forward``:
    what running them needs, where the zoo records it."""
    rows: pd.DataFrame
    params: list
    forward: Forward | None = None

    def __len__(self):
        return len(self.rows)

    @property
    def families(self) -> np.ndarray:
        return self.rows["family"].to_numpy()

    @property
    def activations(self) -> np.ndarray:
        return self.rows["activation"].to_numpy()


def load(zoo_path: str, min_epoch: int = 1, final_only: bool = False, families=(), max_models: int = 0,
         seed: int = 0) -> WeightSet:
    """Every finished (model, checkpoint) of the zoo with ``epoch >= min_epoch`` (1 drops untrained roots and each
    child's epoch-0 copy of its parent), or only each model's last checkpoint; ``max_models`` keeps that many
    models (all their checkpoints), chosen at random by ``seed``."""
    zoo = store.Zoo.open(zoo_path)
    md = zoo.metadata
    if md.empty:
        raise DataError(f"zoo {zoo_path} has no finished models")
    if families:
        unknown = set(families) - set(md["family"])
        if unknown:
            raise DataError(f"families {sorted(unknown)} are not in zoo {zoo_path}; it has {sorted(set(md['family']))}")
        md = md[md["family"].isin(families)]
    md = zoo.final().loc[lambda d: d.index.isin(md.index)] if final_only else md[md["epoch"] >= min_epoch]
    if max_models:
        ids = np.sort(md["model_id"].unique())
        keep = np.random.default_rng(seed).choice(ids, size=min(max_models, len(ids)), replace=False)
        md = md[md["model_id"].isin(keep)]
    md = md.reset_index(drop=True)
    params = [None] * len(md)
    for (lid, ck), sub in md.groupby(["layout_id", "checkpoint"]):
        # One checkpoint of many models at a time: an imported zoo of 30,000 models x 9 checkpoints read for its
        # final checkpoints costs one ninth of the array in memory, not all of it.
        layout = zoo.info["arrays"][lid]["layout"]
        block = zoo.weights(lid, np.sort(sub["row"].to_numpy()), int(ck))   # [rows, P]
        pos = {r: j for j, r in enumerate(np.sort(sub["row"].to_numpy()))}
        for i, r in zip(sub.index, sub["row"], strict=True):
            params[i] = store.from_flat(np.asarray(block[pos[r]]), layout)
    logging.info("loaded %d networks (%d models) from %s", len(md), md["model_id"].nunique(), zoo_path)
    return WeightSet(md, params, forward_of(md, zoo.info))


@dataclasses.dataclass
class Targets:
    """``y[task]``: int class ids or standardized floats, one per row; ``spec[task]``: how to read them back."""
    y: dict[str, np.ndarray]
    spec: dict[str, dict]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def out_dims(self) -> dict[str, int]:
        """Classes per classification task; 0 for a regression task (one scalar output)."""
        return {t: (len(s["classes"]) if s["kind"] == "class" else 0) for t, s in self.spec.items()}

    def weights(self) -> dict[str, float]:
        return {t: s["weight"] for t, s in self.spec.items()}

    def unscale(self, task: str, pred: np.ndarray) -> np.ndarray:
        s = self.spec[task]
        return pred * s["std"] + s["mean"] if s["kind"] == "regression" else pred

    def truth(self, task: str, idx) -> np.ndarray:
        return self.unscale(task, self.y[task][idx])


def targets(rows: pd.DataFrame, tasks: dict[str, float], train_idx: np.ndarray) -> Targets:
    """``tasks``: task name → loss weight. Scales and thresholds come from the training rows only. A task whose
    column the zoo lacks, or a class task whose training rows hold a single class, is skipped (``Targets.skipped``
    says why)."""
    y, spec, skipped = {}, {}, {}
    for name, weight in tasks.items():
        if name not in TASKS:
            raise DataError(f"unknown task {name!r}; known: {sorted(TASKS)}")
        t = TASKS[name]
        if t.column not in rows:
            # An imported zoo records fewer properties (the Small CNN Zoo: accuracy and loss only).
            skipped[name] = f"the zoo has no metadata column {t.column!r}"
            logging.info("task %s skipped: %s", name, skipped[name])
            continue
        col = rows[t.column]
        if t.kind == "class" and col.iloc[train_idx].nunique() < 2:
            # Nothing to learn (e.g. the architecture in a single-architecture zoo), and scikit-learn's
            # classifiers cannot be fitted on one class.
            only = col.iloc[train_idx].iloc[0]
            skipped[name] = f"its training rows hold one class ({getattr(only, 'item', lambda: only)()!r})"
            logging.info("task %s skipped: %s", name, skipped[name])
            continue
        if t.kind == "class":
            classes = sorted(col.unique().tolist())
            y[name] = col.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int32)
            spec[name] = {"kind": "class", "classes": [str(c) for c in classes]}
        elif t.kind == "below_median":
            thr = float(np.median(col.to_numpy()[train_idx]))
            y[name] = (col.to_numpy() < thr).astype(np.int32)
            spec[name] = {"kind": "class", "classes": ["no", "yes"], "threshold": thr}
        else:
            v = col.to_numpy(np.float64)
            mean, std = float(v[train_idx].mean()), float(v[train_idx].std() or 1.0)
            y[name] = ((v - mean) / std).astype(np.float32)
            spec[name] = {"kind": "regression", "mean": mean, "std": std}
        spec[name].update(column=t.column, weight=float(weight), about=t.about)
    if not spec:
        raise DataError(f"every task was skipped: {skipped}")
    return Targets(y, spec, skipped)
