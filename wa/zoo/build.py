"""Build (or resume) a zoo: check everything, plan, then train unit after unit into the store.

A *unit* is one vmapped population: up to ``population`` models of one architecture and one generation.
Processes of a multi-host job take the units of a generation round-robin and wait for each other between
generations (children start from their parents' stored weights). See ``wa.zoo.store`` for why a killed
build restarts cleanly.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import pandas as pd
from absl import logging

from wa.data import images
from wa.zoo import archs as archs_lib
from wa.zoo import plan as plan_lib
from wa.zoo import population as pop_lib
from wa.zoo import properties as props_lib
from wa.zoo import store as store_lib


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _keys(seeds: np.ndarray, purpose: int) -> np.ndarray:
    """Raw uint32[2] keys, one per model: purpose 0 init, 1 training, 2 evaluation."""
    return np.asarray(jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), purpose))(
        np.asarray(seeds, np.uint32)))


def _devices(cfg) -> list:
    local = jax.local_devices()
    n = cfg.get("devices", -1)
    if n == -1:
        return local
    if not 1 <= n <= len(local):
        raise pop_lib.PopulationError(f"devices = {n}: this process has {len(local)} local devices")
    return local[:n]


def fingerprint(cfg) -> dict:
    """What a zoo's contents depend on: the whole config but where it runs (devices) and test hooks (debug)."""
    c = cfg.to_dict()
    c.pop("devices", None)
    c.pop("debug", None)
    return {"config": c}


class Builder:
    """Everything checked and planned in the constructor, before any training starts."""

    def __init__(self, cfg, workdir: str):
        self.cfg, self.workdir = cfg, workdir
        self.spec = props_lib.EvalSpec.from_config(cfg.eval)
        self.data = images.load(cfg.data.name, cfg.data.get("max_train", 0), cfg.data.get("max_test", 0))
        self.groups = plan_lib.groups_from_config(cfg, self.data.shape)
        self.archs = {g.arch.id: g.arch for g in self.groups}
        self.mesh = jax.sharding.Mesh(np.array(_devices(cfg)), ("pop",))
        self.n_devices = self.mesh.devices.size
        if cfg.population % self.n_devices:
            raise pop_lib.PopulationError(f"population = {cfg.population} does not divide over the {self.n_devices} "
                                          "devices the population axis is sharded on")
        plan = plan_lib.make_plan(cfg, self.data.n_classes, self.n_devices)
        self.trigger = plan_lib.trigger(cfg)
        if self.trigger is not None:
            self.trigger.check(self.data.shape)
        if cfg.get("epoch", "set") == "pool":
            n = len(self.data.y_train)
            small = [f for f in sorted(set(plan["train_fraction"])) if round(f * n) < cfg.batch_size]
            if small:
                raise pop_lib.PopulationError(
                    f"epoch = 'pool': train fraction {small[0]} of {n} images is {round(small[0] * n)} images, less "
                    f"than one batch of batch_size = {cfg.batch_size}; lower --config.batch_size")
        self.plan = plan_lib.assign_rows(plan, cfg.store.chunk_models)
        self._pops: dict[str, pop_lib.Population] = {}
        self._evals: dict[str, props_lib.Evaluator] = {}
        self.layouts = {}
        n_params = {}
        for g in self.groups:
            pop = self.population(g.arch)
            shapes = jax.eval_shape(lambda k, pop=pop: pop.module.init(k, np.zeros((1, *self.data.shape), np.float32)),
                                    jax.random.key(0))["params"]
            self.layouts[g.arch.layout_id] = store_lib.layout_of(shapes)
            n_params[g.arch.id] = store_lib.n_params(self.layouts[g.arch.layout_id])
        self.plan["n_params"] = self.plan["arch_id"].map(n_params)
        self.plan["dataset"] = self.data.name
        self.n_checkpoints = max(len(cfg.checkpoints), len(cfg.lineage.checkpoints))
        self.eval_data = props_lib.EvalData.build(self.data, self.spec, cfg.seed, self.trigger)
        self.images = None

    def population(self, arch: archs_lib.Arch) -> pop_lib.Population:
        if arch.id not in self._pops:
            self._pops[arch.id] = pop_lib.Population(arch, self.data.n_classes, self.data.shape,
                                                     len(self.data.y_train), self.cfg.batch_size,
                                                     self.cfg.max_shift, self.mesh,
                                                     tuple(self.cfg.get("input_range", (0.0, 1.0))),
                                                     self.cfg.hparams.get("decay", "all"), self.trigger)
            self._evals[arch.id] = props_lib.Evaluator(self._pops[arch.id], self.spec)
        return self._pops[arch.id]

    def open_store(self) -> store_lib.Zoo:
        info = {"config": self.cfg.to_dict(), "data": self.data.describe(), "eval": self.spec.__dict__,
                "properties": list(props_lib.property_names(self.spec, self.trigger is not None)),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = os.path.join(self.workdir, "zoo")
        zoo = None
        if jax.process_index() == 0:
            zoo = store_lib.Zoo.create(path, self.plan, self.layouts, self.n_checkpoints, self.cfg.store.chunk_models,
                                       info)
        _barrier("zoo-created")
        return zoo or store_lib.Zoo.open(path)

    def _parent_weights(self, zoo: store_lib.Zoo, rows) -> np.ndarray:
        """Last stored checkpoint of every row's parent, located through the plan (another process may have
        written it; the metadata this process has cached need not list it yet)."""
        parents = self.plan.loc[rows["parent_id"].to_numpy()]
        missing = set(parents["unit"]) - zoo.done_units()
        if missing:
            raise store_lib.StoreError(f"{zoo.path}: parents' units {sorted(missing)} are not finished")
        ck = [len(plan_lib.checkpoints(self.cfg, int(g))) - 1 for g in parents["generation"]]
        return np.stack([zoo.array(lid)[int(r), c, :].read().result()
                         for lid, r, c in zip(parents["layout_id"], parents["row"], ck, strict=True)])

    # ---- one unit --------------------------------------------------------------------------------------
    def train_unit(self, zoo: store_lib.Zoo, unit: int) -> list[dict]:
        cfg = self.cfg
        rows = self.plan[self.plan["unit"] == unit]
        first = rows.iloc[0]
        arch = self.archs[first["arch_id"]]
        pop, ev = self.population(arch), self._evals[arch.id]
        n, gen = len(rows), int(first["generation"])
        layout = self.layouts[arch.layout_id]
        k_init, k_train, k_eval = (_keys(rows["seed"].to_numpy(), purpose) for purpose in range(3))
        if gen == 0:
            params = pop.init(k_init, list(rows["init_scheme"]), rows["init_scale"].to_numpy())
        else:
            params = store_lib.from_flat(self._parent_weights(zoo, rows), layout)
        pools = [plan_lib.training_data(r, self.data.y_train, self.data.n_classes) for _, r in rows.iterrows()]
        mask = np.stack([p[0] for p in pools])
        labels = np.stack([p[1] for p in pools])
        poison = np.stack([p[2] for p in pools])
        targets = rows["backdoor_target"].to_numpy() if self.trigger is not None else None
        hp = pop_lib.hparams_arrays(rows.to_dict("records"))
        if self.images is None:  # every population shares the builder's mesh
            self.images = pop.replicate(self.data.x_train)
        params = pop.shard(params)
        opt = pop.shard(pop.opt_init(params))
        keys, d_hp, d_mask, d_labels, d_poison = pop.shard((k_train, hp, mask, labels, poison))
        ckpts = plan_lib.checkpoints(cfg, gen)
        steps = None
        if cfg.get("epoch", "set") == "pool":
            steps = int(mask.sum(1).max()) // cfg.batch_size
            if steps < 1:
                raise pop_lib.PopulationError(f"unit {unit}: training pools of {int(mask.sum(1).max())} images hold "
                                              f"no full batch of {cfg.batch_size}; lower batch_size")
        records: list[dict] = []
        epoch_loss = np.full(n, np.nan)
        crash = cfg.get("debug", {}).get("crash_unit", -1) == unit
        for epoch in range(ckpts[-1] + 1):
            if epoch in ckpts:
                ci = ckpts.index(epoch)
                zoo.write(arch.layout_id, int(rows["row"].iloc[0]), ci, store_lib.to_flat(params, layout))
                ek = jax.vmap(jax.random.fold_in, in_axes=(0, None))(k_eval, epoch)
                # Training accuracy on the clean part of the pool: the poisoned images are read with the trigger.
                props = props_lib.evaluate(ev, params, self.eval_data, mask & ~poison, labels, ek, targets)
                for (mid, _), p, el, m in zip(rows.iterrows(), props, epoch_loss, mask, strict=True):
                    records.append({"model_id": int(mid), "checkpoint": ci, "epoch": epoch,
                                    "epoch_train_loss": float(el), "n_train": int(m.sum()), **p})
                if crash and ci == cfg.debug.crash_checkpoint:
                    logging.warning("debug.crash_unit: killing the process after unit %d checkpoint %d", unit, ci)
                    os._exit(17)
            if epoch < ckpts[-1]:
                params, opt, keys, loss = pop.epoch(params, opt, keys, d_hp, d_mask, d_labels, self.images, steps,
                                                      d_poison)
                epoch_loss = np.asarray(loss)
        zoo.commit(unit, records)
        return records

    # ---- the whole build ---------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        zoo = self.open_store()
        done = zoo.done_units()
        pid, nproc = jax.process_index(), jax.process_count()
        units = self.plan.groupby("unit", sort=True).agg(generation=("generation", "first"), n=("model_id", "size"),
                                                         arch=("arch_id", "first"))
        gens = {int(gen): [u for i, u in enumerate(g.index) if i % nproc == pid]
                for gen, g in units.groupby("generation", sort=True)}
        mine = [u for us in gens.values() for u in us]
        todo = [u for u in mine if u not in done]
        logging.info("zoo %s: %d models in %d units; this process (%d of %d) has %d units, %d already done",
                     zoo.path, len(self.plan), len(units), pid, nproc, len(mine), len(mine) - len(todo))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=int(units.loc[todo, "n"].sum()), unit="model", desc="zoo", disable=None)
        t0, trained, per_arch = time.time(), 0, {}
        for gen, us in gens.items():
            for u in us:
                if u in done:
                    continue
                t = time.time()
                recs = self.train_unit(zoo, u)
                dt = time.time() - t
                n = int(units.loc[u, "n"])
                trained += n
                a = per_arch.setdefault(units.loc[u, "arch"], {"models": 0, "seconds": 0.0, "model_epochs": 0})
                a["models"] += n
                a["seconds"] += dt
                last = max(r["epoch"] for r in recs)
                a["model_epochs"] += n * last
                logging.info("unit %d (%s, generation %d): %d models in %.1f s; final test acc median %.3f", u,
                             units.loc[u, "arch"], gen, n, dt,
                             float(np.median([r["test_acc"] for r in recs if r["epoch"] == last])))
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix(models_per_s=f"{trained / (time.time() - t0):.2f}")
            # Children of the next generation start from this one's stored weights, whoever trained them.
            _barrier(f"zoo-generation-{gen}")
        _barrier("zoo-done")
        if bar is not None:
            bar.close()
        seconds = time.time() - t0
        return {"zoo": zoo.path, "trained_this_run": trained, "seconds_this_run": seconds,
                "models_per_second": trained / seconds if trained else float("nan"), "per_arch": per_arch}


def summary(zoo: store_lib.Zoo, run: dict) -> dict:
    md = zoo.metadata
    final = zoo.final()
    q = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]

    def quant(s: pd.Series) -> dict:
        return {f"q{int(100 * x):02d}": float(s.quantile(x)) for x in q} | {"mean": float(s.mean()),
                                                                              "std": float(s.std())}

    plan = zoo.plan
    depth = plan.groupby("root_id")["generation"].max()
    backdoor = {}
    if "backdoored" in final:
        # Per family and side: how many models, how often the trigger sends a test image to the target, and what
        # the backdoor costs on clean images.
        for (fam, bd), g in final.groupby(["family", "backdoored"]):
            backdoor.setdefault(fam, {})["backdoored" if bd else "clean"] = {
                "models": int(len(g)), "backdoor_success": quant(g["backdoor_success"]),
                "backdoor_clean_rate": quant(g["backdoor_clean_rate"]),
                "test_acc": quant(g["test_acc"])}
    trees = depth[depth >= 1]
    return {
        "n_models": int(final["model_id"].nunique()),
        "n_planned": len(plan),
        "n_checkpoints": int(len(md)),
        "checkpoints_per_model": {str(k): int(v) for k, v in md.groupby("model_id").size().value_counts().items()},
        "architectures": {k: int(v) for k, v in final["arch_id"].value_counts().sort_index().items()},
        "families": {k: int(v) for k, v in final["family"].value_counts().sort_index().items()},
        "generations": {str(k): int(v) for k, v in final["generation"].value_counts().sort_index().items()},
        "family_trees": int(len(trees)),
        "family_trees_3_generations": int((trees >= 2).sum()),
        "models_per_second": run.get("models_per_second"),
        "seconds_this_run": run.get("seconds_this_run"),
        "trained_this_run": run.get("trained_this_run"),
        "cost_per_arch": {k: {"seconds_per_model": v["seconds"] / v["models"],
                              "seconds_per_model_epoch": v["seconds"] / max(v["model_epochs"], 1),
                              "models": v["models"]}
                          for k, v in run.get("per_arch", {}).items()},
        "test_acc": quant(final["test_acc"]),
        "gen_gap": quant(final["gen_gap"]),
        "test_acc_by_family": {f: quant(g["test_acc"]) for f, g in final.groupby("family")},
        "gen_gap_by_family": {f: quant(g["gen_gap"]) for f, g in final.groupby("family")},
        **({"backdoor": backdoor} if backdoor else {}),
    }
