"""Train one learner on a zoo and evaluate it: the body of ``launch.probe`` and of the benchmark.

Writes to ``workdir``: ``metrics.json`` (task → metric → value on the test split, plus per family, the
permutation gaps, timings and the run's facts), ``history.json`` and ``checkpoints/`` (neural learners),
``predictions.parquet`` (test rows: truth and prediction per task) and ``embeddings.npy`` (test rows);
``run.json`` (config and zoo identity: a resume with another config or zoo is refused) and ``DONE.json``
(written last, listing the finished files).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import pandas as pd
from absl import logging

from wa import errors, learners, report, runs
from wa.eval import metrics as metrics_lib
from wa.eval import permutation, reliability, splits
from wa.learners import data as data_lib
from wa.train import loop as loop_lib
from wa.zoo import store as store_lib


class ProbeError(errors.ConfigError):
    pass


def split(rows: pd.DataFrame, cfg) -> dict[str, np.ndarray]:
    if cfg.kind == "model":
        return splits.by_group(rows, tuple(cfg.fractions), cfg.seed, "model_id")
    if cfg.kind == "tree":
        return splits.by_group(rows, tuple(cfg.fractions), cfg.seed, "root_id")
    if cfg.kind == "cross_arch":
        return splits.cross_architecture(rows, cfg.held_out, "family", cfg.fractions[1], cfg.seed)
    if cfg.kind == "column":
        return splits.by_column(rows, cfg.get("column", "split"))
    raise ProbeError(f"--config.split.kind={cfg.kind!r}: expected model, tree, cross_arch or column")


def readable(ws: data_lib.WeightSet, parts: dict, families, learner: str):
    """The networks a learner can read: for one limited to some families, the zoo's split (made on every
    network, so that it equals the other learners' split) restricted to them. Returns the subset, its split and
    each kept row's number in the whole zoo."""
    keep = np.ones(len(ws), bool) if families is None else np.isin(ws.families, families)
    orig = np.flatnonzero(keep)
    if keep.all():
        return ws, parts, orig
    if not keep.any():
        raise ProbeError(f"{learner} reads the families {list(families)}; the zoo has none of them")
    logging.info("%s reads %s only: %d of %d networks kept (same split, other families dropped)", learner,
                 "/".join(families), len(orig), len(ws))
    new = np.full(len(ws), -1)
    new[orig] = np.arange(len(orig))
    sub = data_lib.WeightSet(ws.rows.iloc[orig].reset_index(drop=True), [ws.params[i] for i in orig],
                             ws.forward.subset(orig) if ws.forward else None)
    return sub, {k: new[v[keep[v]]] for k, v in parts.items()}, orig


def check(cfg) -> None:
    """Everything that can be wrong with the config, before any network is loaded."""
    if cfg.learner not in learners.LEARNERS:
        raise ProbeError(f"--config.learner={cfg.learner!r}; known: {sorted(learners.LEARNERS)}")
    unknown = set(cfg.tasks) - set(data_lib.TASKS)
    if unknown or not cfg.tasks:
        raise ProbeError(f"--config.tasks has unknown tasks {sorted(unknown)} (or none); "
                         f"known: {sorted(data_lib.TASKS)}")
    if cfg.split.kind not in ("model", "tree", "cross_arch", "column"):
        raise ProbeError(f"--config.split.kind={cfg.split.kind!r}: expected model, tree, cross_arch or column")
    if cfg.split.kind == "cross_arch" and not cfg.split.held_out:
        raise ProbeError("--config.split.kind=cross_arch needs --config.split.held_out=<family>")
    errors.check_values(cfg, {
        "train.epochs": errors.COUNT, "train.batch_size": errors.COUNT, "train.lr": errors.POSITIVE,
        "train.weight_decay": errors.NON_NEGATIVE, "train.warmup": errors.FRACTION, "train.clip": errors.POSITIVE,
        "train.patience": errors.COUNT, "train.devices": errors.COUNT, "train.halt_at": errors.NON_NEGATIVE,
        "permutation.networks": errors.NON_NEGATIVE, "data.min_epoch": errors.NON_NEGATIVE,
        "data.max_models": errors.NON_NEGATIVE,
        "split.fractions": (lambda f: len(f) == 3 and min(f) > 0 and abs(sum(f) - 1) < 1e-6,
                            "three positive fractions (train, validation, test) summing to 1"),
        "tasks": (lambda t: all(w >= 0 for w in t.values()), "task weights >= 0"),
        "train.select": (lambda v: v in loop_lib.SELECTS, f"one of {loop_lib.SELECTS}"),
        "train.curriculum": (lambda v: int(v) == v and v >= 0, "an integer >= 0 (epochs; 0: off)"),
    })
    # The filesystem last, so a bad value is reported the same with or without a zoo on this machine.
    if not os.path.exists(os.path.join(cfg.zoo, "zoo.json")):
        raise ProbeError(f"--config.zoo={cfg.zoo!r} is not a zoo (no zoo.json); build one with launch.make_zoo")


def scores(targets, pred: dict, idx: np.ndarray) -> dict:
    out = {}
    for task, s in targets.spec.items():
        y = targets.truth(task, idx)
        if s["kind"] == "class":
            p = np.asarray(pred[task])
            # Two classes: the margin of class 1 ranks the networks (logits or probabilities alike).
            score = p[:, 1] - p[:, 0] if p.shape[-1] == 2 else None
            out[task] = metrics_lib.classification(y, p.argmax(-1), score)
        else:
            out[task] = metrics_lib.regression(y, targets.unscale(task, np.asarray(pred[task])))
    return out


def zoo_identity(path: str) -> dict:
    """What a probe's results depend on besides its config: which zoo, which plan, how many units were done."""
    zoo = store_lib.Zoo.open(path)
    return {"path": os.path.abspath(path), "plan_hash": zoo.info["plan_hash"], "units_done": len(zoo.done_units())}


def fingerprint(cfg) -> dict:
    """The config (but ``train.halt_at``, a simulated preemption) and the zoo's identity."""
    c = cfg.to_dict()
    c["train"].pop("halt_at", None)
    return {"config": c, "zoo": zoo_identity(cfg.zoo)}


def run(cfg, workdir: str, progress: bool = True, ws: data_lib.WeightSet | None = None,
        overwrite: bool = False) -> dict:
    """Trains and evaluates ``cfg.learner``; with a ``workdir``, resumes only the run recorded there."""
    check(cfg)
    folder = None
    if workdir:
        folder = runs.Run.open(workdir, "probe", fingerprint(cfg), overwrite, jax.process_index())
        folder.started()
    ws = ws or data_lib.load(cfg.zoo, **cfg.data.to_dict())
    parts = split(ws.rows, cfg.split)
    for k, v in parts.items():
        if not len(v):
            raise ProbeError(f"the {k} split is empty ({len(ws)} networks, split {cfg.split.to_dict()})")
    ws, parts, orig = readable(ws, parts, learners.LEARNERS[cfg.learner].cls.families, cfg.learner)
    targets = data_lib.targets(ws.rows, dict(cfg.tasks), parts["train"])
    learner = learners.get(cfg.learner, cfg.model, targets, cfg.train.devices)
    t0 = time.time()
    feats = learner.prepare(ws.params, ws.families, ws.activations, ws.forward)
    prep_s = time.time() - t0
    learner.setup(feats, parts["train"], cfg.train.batch_size)
    t0 = time.time()
    if learner.neural:
        loop = loop_lib.Loop(learner, targets, cfg.train)
        # Network size is what the curriculum (train.curriculum epochs, simpler networks first) orders by.
        size = ws.rows["n_params"].to_numpy() if "n_params" in ws.rows else None
        fit = loop.fit(feats, parts["train"], parts["val"], workdir, progress, complexity=size)
        predict = lambda f, idx: loop.predict_fit(fit, f, idx)  # noqa: E731
        facts = {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "resumed_from": fit.resumed_from,
                 "task_log_vars": fit.log_vars, "task_best_epoch": fit.task_best_epoch}
    else:
        learner.fit(feats, parts["train"], parts["val"], cfg.train.seed)
        predict, facts = learner.predict, {}
    train_s = time.time() - t0

    test = parts["test"]
    t0 = time.time()
    pred = predict(feats, test)
    pred_s = time.time() - t0
    # A learner that runs the networks (probing) reads more than their weights: every report says so.
    result = {"learner": cfg.learner, "weights_only": learners.LEARNERS[cfg.learner].weights_only,
              "tasks": scores(targets, pred, test)}
    fam = ws.families[test]
    result["by_family"] = {f: scores(targets, {k: (v[fam == f] if v is not None else None) for k, v in pred.items()},
                                     test[fam == f]) for f in sorted(set(fam))}

    pick = np.random.default_rng(cfg.permutation.seed).permutation(test)[:cfg.permutation.networks]

    def predict_networks(params, families, activations):
        f = learner.prepare(params, families, activations, ws.forward.subset(pick) if ws.forward else None)
        out = predict(f, np.arange(len(params)))
        return {t: (targets.unscale(t, out[t]) if targets.spec[t]["kind"] == "regression" else out[t])
                for t in targets.spec}

    t0 = time.time()
    result["permutation"] = permutation.gaps(predict_networks, [ws.params[i] for i in pick], ws.families[pick],
                                             ws.activations[pick], cfg.permutation.seed)
    # The check predicts every picked network twice (as is and permuted), views included; permuting is cheap.
    one = (time.time() - t0) / max(2 * len(pick), 1)
    result["timing"] = {"prepare_s": round(prep_s, 2), "train_s": round(train_s, 2),
                        "predict_test_s": round(pred_s, 3), "predict_one_network_ms": round(1e3 * one, 3)}
    result["data"] = {"networks": len(ws), "models": int(ws.rows["model_id"].nunique()),
                      **{f"{k}_networks": int(len(v)) for k, v in parts.items()},
                      "split": cfg.split.to_dict(), "zoo": cfg.zoo, "families": sorted(set(ws.families))}
    result["targets"] = targets.spec
    result["skipped_tasks"] = targets.skipped
    # What each target's measurement allows (split-half reliability over every network read; see
    # wa.eval.reliability) and the range the test accuracy spans, printed beside every figure.
    result["ceilings"] = reliability.ceilings(ws.rows, {t: data_lib.TASKS[t] for t in targets.spec})
    if "test_acc" in ws.rows:
        acc = ws.rows["test_acc"]
        result["data"]["test_acc_range"] = {q: float(acc.quantile(v)) for q, v in
                                            (("min", 0.0), ("q05", 0.05), ("q50", 0.5), ("q95", 0.95), ("max", 1.0))}
    result.update(facts)
    if folder is not None and jax.process_index() == 0:
        # Every file atomically, metrics.json after the files it describes, and the completion marker last.
        cols = {"row": orig[test], "model_id": ws.rows["model_id"].to_numpy()[test], "family": fam}
        for t, s in targets.spec.items():
            cols[f"{t}/true"] = targets.truth(t, test)
            p = np.asarray(pred[t])
            cols[f"{t}/pred"] = p.argmax(-1) if s["kind"] == "class" else targets.unscale(t, p)
        with report.atomic(os.path.join(workdir, "predictions.parquet")) as tmp:
            pd.DataFrame(cols).to_parquet(tmp)
        written = ["predictions.parquet"]
        if pred.get("embedding") is not None:
            with report.atomic(os.path.join(workdir, "embeddings.npy")) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(pred["embedding"], np.float32))
            written.append("embeddings.npy")
        report.write_json(os.path.join(workdir, "metrics.json"), result)
        written.append("metrics.json")
        if os.path.exists(os.path.join(workdir, "history.json")):
            written.append("history.json")
        folder.finish(written)
    logging.info("%s: %s", cfg.learner, {t: {k: round(v, 4) for k, v in m.items() if k in ("accuracy", "r2",
                                                                                       "kendall_tau")}
                                          for t, m in result["tasks"].items()})
    return result
