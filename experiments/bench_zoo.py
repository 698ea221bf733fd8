r"""Zoo benchmark: a population of 64 trained at once vs the same 64 one after another, and store throughput.

  python experiments/bench_zoo.py                     # prints one JSON line
  python experiments/bench_zoo.py --arch=mlp --epochs=3

Both training paths run the same code (``wa.zoo.population``); the sequential one is a population of one,
compiled once, called 64 times. Compile time is excluded from both (one warm-up epoch each). ``pipeline_*``
times the builder's whole unit path (init, training, properties at every epoch, store writes) the same way:
one unit of 64 vs 64 units of one. The store part
writes and reads [models x checkpoints x parameters] float32 weights through ``wa.zoo.store`` and through one
``np.save`` file per model, on the same disk.
"""

import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
import pandas as pd
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ for the pipeline part

from wa.data import images  # noqa: E402
from wa.zoo import archs, store  # noqa: E402
from wa.zoo import population as pop_lib  # noqa: E402

flags.DEFINE_enum("arch", "cnn", ["cnn", "mlp", "transformer"], "Family (digits defaults: cnn d3 w16, mlp d1 w32, "
                  "transformer d1 w16).")
flags.DEFINE_integer("models", 64, "Population size.")
flags.DEFINE_integer("epochs", 2, "Timed epochs per model.")
flags.DEFINE_integer("store_models", 1024, "Models written and read in the store part.")
flags.DEFINE_integer("checkpoints", 6, "Checkpoints per model in the store part.")
FLAGS = flags.FLAGS

ARCHS = {"cnn": archs.Arch("cnn", 3, 16, "relu"), "mlp": archs.Arch("mlp", 1, 32, "relu"),
         "transformer": archs.Arch("transformer", 1, 16, "gelu")}


def _members(n, data, rng):
    hp = pop_lib.hparams_arrays([dict(optimizer=("sgd", "adam", "rmsprop")[i % 3], lr=(0.05, 3e-3, 1e-3)[i % 3],
                                      weight_decay=1e-4, dropout=0.1 * (i % 2), augment=i % 3) for i in range(n)])
    mask = rng.uniform(size=(n, len(data.y_train))) < 0.8
    labels = np.tile(data.y_train, (n, 1))
    keys = np.asarray(jax.vmap(jax.random.PRNGKey)(np.arange(n)))
    return hp, mask, labels, keys


def _run(pop, hp, mask, labels, keys, x, epochs):
    params = pop.init(keys, ["he_normal"] * len(keys), np.ones(len(keys)))
    opt = pop.opt_init(params)
    params, opt, k, h, m, y = pop.shard((params, opt, keys, hp, mask, labels))
    params, opt, k, loss = pop.epoch(params, opt, k, h, m, y, x)  # warm-up: compile
    loss.block_until_ready()
    t = time.perf_counter()
    for _ in range(epochs):
        params, opt, k, loss = pop.epoch(params, opt, k, h, m, y, x)
    loss.block_until_ready()
    return time.perf_counter() - t


def _training(n, epochs):
    data = images.load("digits")
    pop = pop_lib.Population(ARCHS[FLAGS.arch], data.n_classes, data.shape, len(data.y_train), 32)
    x = pop.replicate(data.x_train)
    hp, mask, labels, keys = _members(n, data, np.random.default_rng(0))
    t_pop = _run(pop, hp, mask, labels, keys, x, epochs)
    # One model at a time runs on one device: a single model's axis cannot be split.
    alone = pop_lib.Population(ARCHS[FLAGS.arch], data.n_classes, data.shape, len(data.y_train), 32,
                               mesh=jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("pop",)))
    x1 = alone.replicate(data.x_train)
    t_seq = 0.0
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in hp.items()}
        t_seq += _run(alone, one, mask[i:i + 1], labels[i:i + 1], keys[i:i + 1], x1, epochs)
    return {"arch": ARCHS[FLAGS.arch].id, "models": n, "epochs": epochs,
            "population_model_epochs_per_s": n * epochs / t_pop,
            "sequential_model_epochs_per_s": n * epochs / t_seq, "speedup": t_seq / t_pop,
            "population_seconds": t_pop, "sequential_seconds": t_seq}


def _pipeline(n, epochs):
    """The whole unit path of launch.make_zoo (init, training, properties at every checkpoint, store writes)
    for n models as one population and as n populations of one."""
    from configs import zoo as zoo_configs
    from wa.zoo import build
    a = ARCHS[FLAGS.arch]
    out = {}
    for size in (n, 1):
        cfg = zoo_configs.get_config("digits")
        cfg.groups = [dict(family=a.family, depth=a.depth, width=a.width, activation=a.activation, roots=n)]
        cfg.lineage.generations = 1
        cfg.epochs, cfg.checkpoints, cfg.population = epochs, tuple(range(epochs + 1)), size
        root = tempfile.mkdtemp(prefix="bench_zoo_")
        try:
            b = build.Builder(cfg, root)
            zoo = b.open_store()
            units = sorted(b.plan["unit"].unique())
            b.train_unit(zoo, units[0])  # warm-up: compiles
            t = time.perf_counter()
            for u in units:
                b.train_unit(zoo, u)
            out[size] = time.perf_counter() - t
        finally:
            shutil.rmtree(root)
    return {"pipeline_epochs": epochs, "pipeline_population_model_epochs_per_s": n * epochs / out[n],
            "pipeline_sequential_model_epochs_per_s": n * epochs / out[1], "pipeline_speedup": out[1] / out[n]}


def _store(n, n_ckpt):
    data = images.load("digits")
    module = ARCHS["cnn"].module(data.n_classes)
    layout = store.layout_of(jax.eval_shape(lambda k: module.init(k, np.zeros((1, *data.shape), np.float32)),
                                            jax.random.key(0))["params"])
    p = store.n_params(layout)
    w = np.random.default_rng(0).normal(size=(n, n_ckpt, p)).astype(np.float32)
    mb = w.nbytes / 2**20
    root = tempfile.mkdtemp(prefix="bench_zoo_")
    try:
        plan = pd.DataFrame({"model_id": np.arange(n), "layout_id": "cnn", "row": np.arange(n),
                             "unit": np.arange(n) // 64})
        t = time.perf_counter()
        zoo = store.Zoo.create(os.path.join(root, "zoo"), plan, {"cnn": layout}, n_ckpt, 8, {})
        for s in range(0, n, 64):  # as the builder does: one unit at a time, one checkpoint at a time
            for c in range(n_ckpt):
                zoo.write("cnn", s, c, w[s: s + 64, c])
        t_ts_w = time.perf_counter() - t
        zoo = store.Zoo.open(os.path.join(root, "zoo"))
        t = time.perf_counter()
        got = zoo.array("cnn")[:n].read().result()
        t_ts_r = time.perf_counter() - t
        assert np.array_equal(got, w)
        t = time.perf_counter()
        one = [zoo.array("cnn")[i, n_ckpt - 1].read().result() for i in range(0, n, max(n // 128, 1))]
        t_ts_one = (time.perf_counter() - t) / len(one)
        d = os.path.join(root, "npy")
        os.makedirs(d)
        t = time.perf_counter()
        for i in range(n):
            np.save(os.path.join(d, f"{i}.npy"), w[i])
        t_np_w = time.perf_counter() - t
        t = time.perf_counter()
        got = np.stack([np.load(os.path.join(d, f"{i}.npy")) for i in range(n)])
        t_np_r = time.perf_counter() - t
        assert np.array_equal(got, w)
        return {"store_models": n, "store_mb": mb, "tensorstore_write_mb_per_s": mb / t_ts_w,
                "tensorstore_read_mb_per_s": mb / t_ts_r, "npsave_write_mb_per_s": mb / t_np_w,
                "npload_read_mb_per_s": mb / t_np_r, "tensorstore_one_checkpoint_read_ms": 1e3 * t_ts_one}
    finally:
        shutil.rmtree(root)


def main(argv):
    del argv
    out = {"device": jax.devices()[0].platform, "n_devices": jax.device_count()}
    out.update(_training(FLAGS.models, FLAGS.epochs))
    out.update(_pipeline(FLAGS.models, FLAGS.epochs))
    out.update(_store(FLAGS.store_models, FLAGS.checkpoints))
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
