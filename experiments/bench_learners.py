r"""Training-step cost of the weight-space learners on a zoo's training networks; prints one JSON line.

  python experiments/bench_learners.py                                   # digits zoo (runs/zoo_digits)
  python experiments/bench_learners.py --zoo=/tmp/zoo/zoo --learners=nwpa --epochs=1   # any zoo

For each learner (a ``configs/probe.py`` variant, benchmark settings) and each batching path it has:
``bucketed`` (networks of one architecture stacked into dense tensors, one compile per architecture) and, where
the learner keeps it, ``packed`` (the path before bucketing: padded edge lists, one compile). Per path: the
mean milliseconds of a training step (forward, backward, AdamW update) and the seconds of one epoch over the
training split's networks (split by family tree 70/15/15, as the benchmark), compiles excluded (every batch
shape is run once first), views and batch assembly on the host included. Both paths of a learner run in one
process, one after the other, so their ratio is measured under the same load.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from configs import probe as probe_configs  # noqa: E402
from launch import common  # noqa: E402
from wa import learners  # noqa: E402
from wa.learners import data as data_lib  # noqa: E402
from wa.learners import probe  # noqa: E402
from wa.train import loop as loop_lib  # noqa: E402

flags.DEFINE_string("zoo", "runs/zoo_digits/zoo", "Zoo store.")
flags.DEFINE_list("learners", ["nwpa", "weightnet", "nfn"], "configs/probe.py variants.")
flags.DEFINE_bool("packed", True, "Also time the packed (pre-bucketing) path where the learner has one.")
flags.DEFINE_integer("epochs", 2, "Timed epochs per path (the mean is reported).")
flags.DEFINE_bool("wide", False, "Also time one bucketed step on 32 randomly initialized 784-32-32-10 MLPs (28x28 "
                  "inputs: 858 graph nodes) instead of a zoo.")
FLAGS = flags.FLAGS


def time_path(variant: str, dense: bool, ws, parts) -> dict:
    cfg = probe_configs.get_config(variant)
    if "dense" in cfg.model:
        cfg.model.dense = dense
    ws, parts, _ = probe.readable(ws, parts, learners.LEARNERS[cfg.learner].cls.families, variant)
    targets = data_lib.targets(ws.rows, dict(cfg.tasks), parts["train"])
    learner = learners.get(cfg.learner, cfg.model, targets)
    t0 = time.time()
    feats = learner.prepare(ws.params, ws.families, ws.activations, ws.forward)
    prep = time.time() - t0
    train = parts["train"]
    learner.setup(feats, train, cfg.train.batch_size)
    loop = loop_lib.Loop(learner, targets, cfg.train)
    params, opt = loop.init(feats, train)
    key = jax.random.key(0)

    def epoch(rng):
        nonlocal params, opt
        n, loss = 0, None
        for batch, rows in learner.batches(feats, train, cfg.train.batch_size, rng):
            b, y, m = loop._device(batch, rows)
            keys = jax.random.split(jax.random.fold_in(key, n), rows.shape[0])
            params, opt, loss = loop._step(params, opt, b, y, m, keys)
            n += 1
        jax.block_until_ready(loss)
        return n

    t0 = time.time()
    epoch(None)                     # every batch shape once: compiles
    compile_s = time.time() - t0
    secs, steps = [], 0
    for e in range(FLAGS.epochs):
        t0 = time.time()
        steps = epoch(np.random.default_rng(e))
        secs.append(time.time() - t0)
    return {"train_networks": int(len(train)), "epoch_s": round(float(np.mean(secs)), 3),
            "step_ms": round(1e3 * float(np.mean(secs)) / steps, 2),
            "steps": steps, "first_epoch_s": round(compile_s, 2), "prepare_s": round(prep, 2)}


def wide_step_ms(variant: str) -> float:
    """Milliseconds of one bucketed training step on 32 MLPs over 28x28 inputs (compile excluded)."""
    import pandas as pd

    from wa.zoo import archs
    arch = archs.Arch("mlp", 2, 32, "relu")
    params = [jax.tree.map(np.asarray, arch.module(10).init(jax.random.key(i), np.zeros((1, 28, 28, 1)))["params"])
              for i in range(32)]
    rows = pd.DataFrame([dict(model_id=i, family="mlp", activation="relu", arch_id=arch.id, test_acc=float(i))
                         for i in range(32)])
    ws, idx = data_lib.WeightSet(rows, params), np.arange(32)
    cfg = probe_configs.get_config(variant)
    targets = data_lib.targets(ws.rows, {"test_acc": 1.0}, idx)
    learner = learners.get(cfg.learner, cfg.model, targets)
    feats = learner.prepare(ws.params, ws.families, ws.activations)
    learner.setup(feats, idx, 32)
    loop = loop_lib.Loop(learner, targets, cfg.train)
    params, opt = loop.init(feats, idx)
    batch, r = next(learner.batches(feats, idx, 32, None))
    b, y, m = loop._device(batch, r)
    keys = jax.random.split(jax.random.key(0), 1)
    jax.block_until_ready(loop._step(params, opt, b, y, m, keys)[2])
    t0 = time.time()
    for _ in range(3):
        loss = loop._step(params, opt, b, y, m, keys)[2]
    jax.block_until_ready(loss)
    return round((time.time() - t0) / 3 * 1e3, 1)


def main(argv):
    del argv
    common.start()
    cfg = probe_configs.get_config("stats_gbt")
    cfg.zoo = FLAGS.zoo
    cfg.data.final_only = True
    ws = data_lib.load(FLAGS.zoo, **cfg.data.to_dict())
    parts = probe.split(ws.rows, cfg.split)
    line = {"zoo": FLAGS.zoo, "train_networks": int(len(parts["train"])), "devices": jax.device_count(),
            "backend": jax.default_backend()}
    for v in FLAGS.learners:
        has_packed = "dense" in probe_configs.get_config(v).model
        line[v] = {"bucketed": time_path(v, True, ws, parts)}
        if FLAGS.packed and has_packed:
            line[v]["packed"] = time_path(v, False, ws, parts)
            line[v]["speedup"] = round(line[v]["packed"]["epoch_s"] / line[v]["bucketed"]["epoch_s"], 2)
    if FLAGS.wide:
        line["mlp_784_32_32_10_step_ms"] = {v: wide_step_ms(v) for v in FLAGS.learners}
    print(json.dumps(line))


if __name__ == "__main__":
    app.run(main)
