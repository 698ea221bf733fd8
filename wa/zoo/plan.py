"""The zoo's plan: every model, its hyperparameters, its training data and its parent, fixed up front.

The plan is a pure function of the config (and the data set's size), so every process of a multi-host job
and every restart of a killed one computes the same table; ``wa.zoo.store`` keeps it beside the weights
and refuses to resume a zoo whose plan differs.

Family trees: ``lineage.trees_per_group`` roots of every architecture group found a tree; every model of
generation g < ``lineage.generations`` − 1 in a tree gets ``lineage.children`` children, each fine-tuned
from its parent's last checkpoint for ``lineage.epochs`` epochs after one mutation:

- ``data``: a fresh training subset (new data seed and train fraction),
- ``classes``: trained only on a random subset of ``lineage.class_subset`` of the classes,
- ``hparams``: a fresh optimizer, learning rate, weight decay and dropout.

Training pools (``training_data``): a random ``train_fraction`` of the training set; then class imbalance
keeps, per class, a share 1 − imbalance · r / (C − 1) of that class, r the class's rank in a random order
(so the rarest class keeps 1 − imbalance); then the class subset; then ``label_noise`` replaces that share of
the pool's labels with a uniformly drawn different class; then the backdoor (BadNets, Gu et al. 2017, all-to-one):
with ``data_characteristics.backdoor`` listing poisoned shares (e.g. (0.0, 0.1)), every root draws one
(``backdoor``) and a target class (``backdoor_target``, drawn for clean models too, so the trigger's effect is
measured on every model); a share ``backdoor`` of its pool, drawn from the images whose true class is not the
target, gets the trigger (``population.Trigger``, ``cfg.backdoor``) and the target label. ``backdoored`` says
whether the share is above 0. Children inherit their parent's backdoor. Zoos without backdoor shares have none
of these columns (their plans are what they were before backdoors existed).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from wa import errors
from wa.zoo import archs as archs_lib
from wa.zoo import population as pop_lib


class PlanError(errors.ConfigError):
    pass


MUTATIONS = ("data", "classes", "hparams")
EPOCHS = ("set", "pool")


@dataclasses.dataclass(frozen=True)
class Group:
    arch: archs_lib.Arch
    roots: int


def groups_from_config(cfg, image_shape: tuple[int, int, int] | None = None) -> list[Group]:
    """The config's architecture groups, each checked (against ``image_shape`` too, when given)."""
    out = []
    for i, g in enumerate(cfg.groups):
        g = dict(g)
        try:
            # A group may name knobs of other families (a shared default); each family takes its own.
            fam = archs_lib.FAMILIES.get(g["family"])
            knobs = tuple((k.name, int(g[k.name])) for k in (fam.knobs if fam else ()) if k.name in g)
            arch = archs_lib.Arch(g["family"], int(g["depth"]), int(g["width"]), g["activation"], knobs)
        except KeyError as e:
            raise PlanError(f"config groups[{i}] lacks {e}; each group needs family, depth, width, activation, "
                            "roots") from None
        try:
            arch.check(image_shape)
        except archs_lib.ArchError as e:
            raise PlanError(f"config groups[{i}]: {e}") from None
        out.append(Group(arch, int(g.get("roots", 0))))
    ids = [g.arch.id for g in out]
    if len(set(ids)) != len(ids):
        raise PlanError(f"config groups repeat an architecture: {ids}")
    return out


def _log_uniform(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _choice(rng, values):
    values = list(values)
    return values[int(rng.integers(len(values)))]


def _optim_hparams(rng, h) -> dict:
    opt = _choice(rng, h.optimizers)
    lo, hi = h.lr[opt]
    out = {"optimizer": opt, "lr": _log_uniform(rng, lo, hi)}
    if h.get("l2"):
        # A Keras-style L2 penalty λ·Σw² on the kernels: weight decay 2λ (``population.optimizer``).
        out["l2reg"] = _log_uniform(rng, *h.l2)
        out["weight_decay"] = 2.0 * out["l2reg"]
    else:
        out["weight_decay"] = 0.0 if rng.uniform() < h.weight_decay_zero else _log_uniform(rng, *h.weight_decay)
    out["dropout"] = 0.0 if rng.uniform() < h.dropout_zero else float(rng.uniform(*h.dropout))
    return out


def _init(rng, h) -> dict:
    scheme = _choice(rng, h.init_schemes)
    if h.get("init_std"):
        # Drawn for every model (as the Small CNN Zoo records it); only the normal laws use it, as their std.
        std = _log_uniform(rng, *h.init_std)
        return {"init_scheme": scheme, "init_std": std,
                "init_scale": std if scheme in archs_lib.NORMAL_SCHEMES else _log_uniform(rng, *h.init_scale)}
    return {"init_scheme": scheme, "init_scale": _log_uniform(rng, *h.init_scale)}


def _root(rng, cfg, n_classes) -> dict:
    h, d = cfg.hparams, cfg.data_characteristics
    row = _optim_hparams(rng, h)
    row.update(**_init(rng, h),
               augment=int(_choice(rng, d.augment)), train_fraction=float(_choice(rng, d.train_fraction)),
               label_noise=float(_choice(rng, d.label_noise)), imbalance=float(_choice(rng, d.imbalance)),
               classes=",".join(str(c) for c in range(n_classes)))
    return row


def _mutate(rng, cfg, parent: dict, kind: str, n_classes: int) -> dict:
    child = {k: parent[k] for k in ("optimizer", "lr", "weight_decay", "l2reg", "dropout", "init_scheme",
                                    "init_scale", "init_std", "augment", "train_fraction", "label_noise", "imbalance",
                                    "classes", "backdoor", "backdoor_target") if k in parent}
    if kind == "data":
        child["train_fraction"] = float(_choice(rng, cfg.data_characteristics.train_fraction))
    elif kind == "classes":
        lo, hi = cfg.lineage.class_subset
        k = int(rng.integers(max(2, math.ceil(lo * n_classes)), max(2, math.floor(hi * n_classes)) + 1))
        child["classes"] = ",".join(str(c) for c in sorted(rng.choice(n_classes, k, replace=False)))
    else:  # "hparams"; make_plan has checked every mutation name
        child.update(_optim_hparams(rng, cfg.hparams))
    return child


def backdoor_shares(cfg) -> tuple[float, ...]:
    """The config's poisoned shares; () when no model of the zoo is backdoored."""
    shares = tuple(float(v) for v in cfg.data_characteristics.get("backdoor", ()))
    bad = [v for v in shares if not 0 <= v < 1]
    if bad:
        raise PlanError(f"data_characteristics.backdoor = {shares}: each share of poisoned training images must be in "
                        "[0, 1)")
    return shares if any(v > 0 for v in shares) else ()


def trigger(cfg) -> pop_lib.Trigger | None:
    """The zoo's BadNets trigger, where some model is backdoored."""
    if not backdoor_shares(cfg):
        return None
    b = cfg.get("backdoor") or {}
    return pop_lib.Trigger(int(b.get("patch", 3)), int(b.get("margin", 1)))


def make_plan(cfg, n_classes: int, n_devices: int = 1) -> pd.DataFrame:
    """One row per model, in training order: generation, then group, then unit (with ``epoch = "pool"`` a group's
    units follow its train fractions, so model ids, numbered in drawing order, need not ascend down the table)."""
    groups = groups_from_config(cfg)
    lin = cfg.lineage
    if lin.generations < 1 or lin.children < 0:
        raise PlanError("lineage.generations must be >= 1 and lineage.children >= 0")
    for name, values, known in (("hparams.optimizers", cfg.hparams.optimizers, pop_lib.OPTIMIZER_NAMES),
                                ("hparams.init_schemes", cfg.hparams.init_schemes, archs_lib.INIT_SCHEMES),
                                ("lineage.mutations", lin.mutations, MUTATIONS)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise PlanError(f"{name}: unknown value {bad[0]!r}; choose from {sorted(known)}" if bad else
                            f"{name} is empty")
    if cfg.population < 1:
        raise PlanError(f"population = {cfg.population}: must be >= 1")
    if cfg.get("epoch", "set") not in EPOCHS:
        raise PlanError(f"epoch = {cfg.epoch!r}: choose 'set' (every model takes len(train set) // batch_size steps "
                        "per epoch) or 'pool' (one pass over its own training pool)")
    errors.check_values(cfg, {
        "batch_size": errors.COUNT, "epochs": errors.COUNT, "max_shift": errors.NON_NEGATIVE,
        "store.chunk_models": errors.COUNT, "eval.pgd_steps": errors.NON_NEGATIVE, "eval.batch": errors.COUNT,
        "eval.robust_examples": errors.COUNT, "eval.train_examples": errors.NON_NEGATIVE,
        "eval.ece_bins": errors.COUNT, "data.max_train": errors.NON_NEGATIVE, "data.max_test": errors.NON_NEGATIVE,
        "lineage.epochs": errors.NON_NEGATIVE,
        "hparams.weight_decay_zero": (lambda p: 0 <= p <= 1, "a probability in [0, 1]"),
        "hparams.dropout_zero": (lambda p: 0 <= p <= 1, "a probability in [0, 1]"),
        "hparams.weight_decay": (lambda r: 0 < r[0] <= r[1], "a range (low, high) with 0 < low <= high"),
        "hparams.dropout": (lambda r: 0 <= r[0] <= r[1] < 1, "a range (low, high) with 0 <= low <= high < 1"),
        "hparams.init_scale": (lambda r: 0 < r[0] <= r[1], "a range (low, high) with 0 < low <= high"),
    })
    for name, (lo, hi) in cfg.hparams.lr.items():
        if not 0 < lo <= hi:
            raise PlanError(f"--config.hparams.lr.{name}=({lo}, {hi}): expected a range (low, high) with 0 < low <= "
                            "high")
    if lin.generations > 1 and any(g.roots < lin.trees_per_group for g in groups):
        raise PlanError(f"lineage.trees_per_group = {lin.trees_per_group} exceeds the roots of some group")
    for name, ck, epochs in (("checkpoints", cfg.checkpoints, cfg.epochs), ("lineage.checkpoints", lin.checkpoints,
                                                                             lin.epochs)):
        ck = list(ck)
        if not ck or ck != sorted(set(ck)) or ck[0] < 0 or ck[-1] != epochs:
            raise PlanError(f"{name} = {ck}: must be increasing epochs in [0, {epochs}] ending at {epochs} "
                            "(the final weights are always stored)")
    # Every family's knobs are columns (0 where a model's family lacks the knob), so that the table's columns do
    # not depend on which families a zoo holds.
    knob_names = list(dict.fromkeys(k.name for f in archs_lib.FAMILIES.values() for k in f.knobs))
    rng = np.random.default_rng(cfg.seed)
    shares = backdoor_shares(cfg)
    # Its own generator: every other draw of the plan stays what it is without backdoors.
    brng = np.random.default_rng([cfg.seed, 2])
    rows: list[dict] = []
    unit = 0
    by_gen: list[list[list[dict]]] = []   # [generation][group] -> models
    rows_by_id: dict[int, dict] = {}
    for gen in range(lin.generations):
        per_group = []
        for gi, g in enumerate(groups):
            if gen == 0:
                models = [dict(_root(rng, cfg, n_classes), parent_id=-1, mutation="") for _ in range(g.roots)]
                for m in models if shares else ():
                    m.update(backdoor=float(_choice(brng, shares)), backdoor_target=int(brng.integers(n_classes)))
            else:
                parents = [m for m in by_gen[gen - 1][gi] if m["tree"]]
                models = []
                for p in parents:
                    for _ in range(lin.children):
                        kind = _choice(rng, lin.mutations)
                        models.append(dict(_mutate(rng, cfg, p, kind, n_classes), parent_id=p["model_id"],
                                           mutation=kind))
            for i, m in enumerate(models):
                m.update(model_id=len(rows) + i, generation=gen, group=gi, seed=int(rng.integers(2**31 - 1)),
                         data_seed=int(rng.integers(2**31 - 1)), arch_depth=g.arch.depth,
                         arch_width=g.arch.width, activation=g.arch.activation,
                         **{k: 0 for k in knob_names} | dict(g.arch.knobs))
                m["arch_id"], m["layout_id"], m["family"] = g.arch.id, g.arch.layout_id, g.arch.family
                m["epochs"] = cfg.epochs if gen == 0 else lin.epochs
                m["tree"] = i < lin.trees_per_group if gen == 0 else True
                m["root_id"] = m["model_id"] if gen == 0 else rows_by_id[m["parent_id"]]["root_id"]
                rows_by_id[m["model_id"]] = m
            runs = [models]
            if cfg.get("epoch", "set") == "pool":
                # One epoch is one pass over a model's pool, so a unit (one compiled epoch of fixed length) holds
                # models of one train fraction.
                fractions = sorted({m["train_fraction"] for m in models})
                runs = [[m for m in models if m["train_fraction"] == f] for f in fractions]
            chunks = [run[s: s + cfg.population] for run in runs for s in range(0, len(run), cfg.population)]
            for chunk in chunks:
                if len(chunk) % n_devices:
                    raise PlanError(f"group {g.arch.id}, generation {gen}: a population of {len(chunk)} models does "
                                    f"not divide over {n_devices} devices; make roots, lineage.trees_per_group and "
                                    f"population multiples of {n_devices}")
                for m in chunk:
                    m["unit"] = unit
                unit += 1
            rows.extend(m for chunk in chunks for m in chunk)   # the table in unit order
            per_group.append(models)
        by_gen.append(per_group)
    df = pd.DataFrame(rows)
    if shares:
        df["backdoored"] = df["backdoor"] > 0
    return df.drop(columns=["tree"]).set_index("model_id", drop=False)


def assign_rows(plan: pd.DataFrame, chunk_models: int) -> pd.DataFrame:
    """Row of every model in its layout's weight array. Units start on chunk boundaries so that no two units
    (which different processes may write at once) ever share a zarr chunk."""
    plan = plan.copy()
    nxt: dict[str, int] = {}
    rows = np.zeros(len(plan), np.int64)
    for unit, idx in plan.groupby("unit", sort=True).indices.items():
        del unit
        lid = plan["layout_id"].iloc[idx[0]]
        start = -(-nxt.get(lid, 0) // chunk_models) * chunk_models
        rows[idx] = start + np.arange(len(idx))
        nxt[lid] = start + len(idx)
    plan["row"] = rows
    return plan


def training_data(row, y_train: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool mask [N_train] bool, training labels [N_train] int32, poisoned [N_train] bool) of one model, from its
    plan row: a poisoned image carries the trigger and the target label."""
    rng = np.random.default_rng(int(row["data_seed"]))
    n = len(y_train)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, max(1, int(round(row["train_fraction"] * n))), replace=False)] = True
    if row["imbalance"] > 0:
        rank = rng.permutation(n_classes)
        keep = 1.0 - row["imbalance"] * rank / max(n_classes - 1, 1)
        mask &= rng.uniform(size=n) < keep[y_train]
    allowed = np.zeros(n_classes, bool)
    allowed[[int(c) for c in str(row["classes"]).split(",")]] = True
    mask &= allowed[y_train]
    if not mask.any():
        raise PlanError(f"model {row['model_id']}: its training pool is empty (train_fraction "
                        f"{row['train_fraction']}, imbalance {row['imbalance']}, classes {row['classes']})")
    labels = y_train.astype(np.int32).copy()
    if row["label_noise"] > 0:
        flip = mask & (rng.uniform(size=n) < row["label_noise"])
        labels[flip] = (labels[flip] + rng.integers(1, n_classes, flip.sum())) % n_classes
    poison = np.zeros(n, bool)
    share = float(row.get("backdoor", 0.0) or 0.0)
    if share > 0:
        target = int(row["backdoor_target"])
        candidates = np.flatnonzero(mask & (y_train != target))
        k = min(len(candidates), int(round(share * mask.sum())))
        poison[np.random.default_rng([int(row["data_seed"]), 1]).choice(candidates, k, replace=False)] = True
        labels[poison] = target
    return mask, labels, poison


def checkpoints(cfg, generation: int) -> list[int]:
    return list(cfg.checkpoints if generation == 0 else cfg.lineage.checkpoints)
