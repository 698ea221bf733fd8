"""One training loop for every neural learner: optax AdamW with warmup + cosine decay, a weighted multi-task
loss, per-epoch validation metrics, early stopping on the validation loss (the best parameters are kept; with
``select="per_task"`` each task's own best epoch, and training runs while any task still improves),
orbax checkpoints after every epoch with exact resume, data parallelism over local devices.

Determinism: the data order of epoch e comes from ``numpy.random.default_rng([seed, e])`` and the dropout key
of step s from ``fold_in(fold_in(key(seed), e), s)``, so a run resumed after epoch e computes the same
parameters as one that never stopped. Data parallelism: a batch has a leading device axis (one sub-batch per
device, ``NamedSharding(mesh, P('data'))``), the model is vmapped over it and the parameters are replicated;
the mean over all sub-batches makes the gradient the all-device one.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from wa import errors
from wa.eval import metrics as metrics_lib
from wa.train import core


class LoopError(errors.ConfigError):
    pass


@dataclasses.dataclass
class Fit:
    params: dict
    history: list
    best_epoch: int
    epochs_run: int
    seconds: float
    resumed_from: int
    log_vars: dict = dataclasses.field(default_factory=dict)   # learned task uncertainties (balance)
    # select="per_task": each task's own best parameters and epoch (``params`` stays the criterion's best).
    task_params: dict = dataclasses.field(default_factory=dict)
    task_best_epoch: dict = dataclasses.field(default_factory=dict)


def mesh(n_devices: int) -> Mesh:
    devs = jax.local_devices()
    if n_devices < 1 or n_devices > len(devs):
        raise LoopError(f"--config.train.devices={n_devices}: this process has {len(devs)} local devices")
    return Mesh(np.array(devs[:n_devices]), ("data",))


def _i(x):
    return np.asarray(x, np.int32)   # 0-d arrays: orbax saves arrays, not numpy scalars


def _f(x):
    return np.asarray(x, np.float32)


BALANCES = ("none", "uncertainty")
CRITERIA = ("weighted", "relative")
SELECTS = ("joint", "per_task")


def _loss(out, y, mask, spec, weights, log_vars=None):
    """Σ_t weight_t · L_t; with ``log_vars`` (learned task uncertainty, Kendall, Gal & Cipolla 2018)
    Σ_t weight_t · (exp(−s_t) · L_t + s_t): a task whose loss is small or easy cannot take over the gradient."""
    total = 0.0
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    for task, s in spec.items():
        if s == "class":
            lt = optax.softmax_cross_entropy_with_integer_labels(out[task], y[task])
        else:
            lt = (out[task] - y[task]) ** 2
        lt = (lt * m).sum() / n
        if log_vars is not None:
            lt = jnp.exp(-log_vars[task]) * lt + log_vars[task]
        total = total + weights[task] * lt
    return total


def _merge(a: dict, b: dict) -> dict:
    """Union of two parameter trees; where both hold a leaf, ``a``'s is kept."""
    out = dict(b)
    for k, v in a.items():
        out[k] = _merge(v, b[k]) if isinstance(v, dict) and isinstance(b.get(k), dict) else v
    return out


def _apply(module, params, batch, train, keys):
    """The module on a batch with a leading device axis (one sub-batch per data-parallel shard)."""
    return jax.vmap(lambda b, k: module.apply({"params": params}, b, train=train, rngs={"dropout": k}))(batch, keys)


@functools.lru_cache(maxsize=64)
def _compiled_init(module):
    # Compiled: run op by op, a graph learner's initialization costs tens of seconds per architecture.
    return jax.jit(lambda rngs, x: module.init(rngs, x, train=False)["params"])


@functools.lru_cache(maxsize=64)
def _compiled_eval(module, n_devices: int):
    """The jitted evaluation of ``module``: Loops of one learner configuration (a benchmark's seeds, a resumed
    run) share it, so it compiles once per process."""
    # No dropout in evaluation; the keys only fill apply's signature.
    return jax.jit(lambda params, batch: _apply(module, params, batch, False,
                                                jax.random.split(jax.random.key(0), n_devices)))


@functools.lru_cache(maxsize=64)
def _compiled_step(module, spec: tuple, weights: tuple, balance: bool, n_devices: int, opt: tuple):
    """(optimizer, jitted training step) of one configuration, shared like ``_compiled_eval``. ``opt``: (peak lr,
    warmup steps, steps, gradient clip, weight decay); AdamW with warmup and cosine decay to 1% of the peak."""
    lr, warmup, steps, clip, weight_decay = opt
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.01)
    # The task uncertainties are not decayed towards 0.
    decay = (lambda p: {"net": jax.tree.map(lambda _: True, p["net"]),  # noqa: E731
                        "log_var": jax.tree.map(lambda _: False, p["log_var"])}) if balance else None
    tx = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay, mask=decay))
    spec, weights = dict(spec), dict(weights)

    def loss_fn(params, batch, y, mask, keys):
        # Trained parameters: {"net": module parameters, "log_var": {task: s}} when tasks are balanced.
        net, log_vars = (params["net"], params["log_var"]) if balance else (params, None)
        return _loss(_apply(module, net, batch, True, keys), y, mask, spec, weights, log_vars)

    def step(params, opt_state, batch, y, mask, keys):
        loss, g = jax.value_and_grad(loss_fn)(params, batch, y, mask, keys)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Outputs replicated like the inputs from init: otherwise the second call sees another sharding and compiles
    # the step again.
    return tx, jax.jit(step, out_shardings=NamedSharding(mesh(n_devices), P()))


class Loop:
    def __init__(self, learner, targets, cfg):
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise LoopError("--config.train.epochs and batch_size must be >= 1")
        if not 0 <= cfg.warmup < 1:
            raise LoopError(f"--config.train.warmup={cfg.warmup}: expected a fraction of the steps in [0, 1)")
        crit = cfg.get("criterion", "weighted")
        self.tau_task = crit[4:] if crit.startswith("tau:") else None
        if cfg.get("balance", "none") not in BALANCES or (crit not in CRITERIA and self.tau_task is None):
            raise LoopError(f"--config.train.balance={cfg.get('balance')!r} / criterion={crit!r}: "
                            f"expected one of {BALANCES} / {CRITERIA} or tau:<task>")
        if self.tau_task is not None and targets.spec.get(self.tau_task, {}).get("kind") != "regression":
            raise LoopError(f"--config.train.criterion={crit!r}: {self.tau_task!r} is not a regression task of this "
                            f"run (its tasks: {sorted(targets.spec)})")
        if cfg.get("select", "joint") not in SELECTS:
            raise LoopError(f"--config.train.select={cfg.get('select')!r}: expected one of {SELECTS}")
        self.per_task = cfg.get("select", "joint") == "per_task"
        self.balance = cfg.get("balance", "none") == "uncertainty"
        self.relative = crit == "relative"
        self.learner, self.targets, self.cfg = learner, targets, cfg
        self.module = learner.module()
        self.mesh = mesh(learner.n_devices)
        self.data = NamedSharding(self.mesh, P("data"))
        self.repl = NamedSharding(self.mesh, P())
        self._spec = tuple((t, s["kind"]) for t, s in targets.spec.items())
        self._weights = tuple(targets.weights().items())
        self._eval = _compiled_eval(self.module, learner.n_devices)

    def _device(self, batch, rows):
        y = {t: v[np.maximum(rows, 0)] for t, v in self.targets.y.items()}
        put = lambda x: jax.device_put(x, self.data)  # noqa: E731
        return jax.tree.map(put, batch), jax.tree.map(put, y), put(rows >= 0)

    def init(self, feats, train_idx):
        params = {}
        init = _compiled_init(self.module)
        for batch in self.learner.init_batches(feats, train_idx, self.cfg.batch_size):
            sample = jax.tree.map(lambda x: x[0], batch)
            params = _merge(params, init({"params": jax.random.key(self.cfg.seed), "dropout": jax.random.key(1)},
                                         sample))
        steps = self.cfg.epochs * max(1, -(-len(train_idx) // self.cfg.batch_size))
        self.opt, self._step = _compiled_step(
            self.module, self._spec, self._weights, self.balance, self.learner.n_devices,
            (float(self.cfg.lr), int(self.cfg.warmup * steps), steps, float(self.cfg.clip),
             float(self.cfg.weight_decay)))
        if self.balance:
            params = {"net": params, "log_var": {t: jnp.zeros((), jnp.float32) for t in self.targets.spec}}
        params = jax.device_put(params, self.repl)
        return params, jax.device_put(jax.jit(self.opt.init)(params), self.repl)

    def net(self, params):
        """The module's parameters out of the trained ones."""
        return params["net"] if self.balance else params

    def predict(self, params, feats, idx) -> dict:
        """Outputs for rows ``idx`` in that order: class probabilities, regression values (standardized),
        embeddings."""
        outs, rows_all = [], []
        for batch, rows in self.learner.batches(feats, np.asarray(idx), self.cfg.batch_size, None):
            out = self._eval(self.net(params), jax.device_put(batch, self.data))
            outs.append(jax.device_get(out))
            rows_all.append(rows.reshape(-1))
        rows = np.concatenate(rows_all)
        pos = {r: i for i, r in enumerate(rows) if r >= 0}
        order = np.array([pos[int(r)] for r in idx])
        res = {}
        for k in outs[0]:
            v = np.concatenate([o[k].reshape(-1, *o[k].shape[2:]) for o in outs])
            v = v[order]
            if k != "embedding" and self.targets.spec[k]["kind"] == "class":
                v = np.asarray(jax.nn.softmax(v, -1))
            res[k] = v
        return res

    def predict_fit(self, fit: Fit, feats, idx) -> dict:
        """``predict`` with what ``fit`` selected: with per-task selection each task's output comes from its own
        best epoch's parameters (one pass per distinct epoch), the embedding from the criterion's best."""
        out = self.predict(fit.params, feats, idx)
        by_epoch: dict[int, list] = {}
        for task, epoch in fit.task_best_epoch.items():
            if epoch != fit.best_epoch:
                by_epoch.setdefault(epoch, []).append(task)
        for tasks in by_epoch.values():
            other = self.predict(fit.task_params[tasks[0]], feats, idx)
            out.update({t: other[t] for t in tasks})
        return out

    def _task_score(self, task: str, metrics: dict) -> float:
        """What per-task selection minimises for one task: its validation loss, or −τ for the criterion's τ task."""
        return -metrics["kendall_tau"] if task == self.tau_task else metrics["loss"]

    def _val_metrics(self, params, feats, val_idx, reference=None) -> dict:
        """Per-task validation metrics and the stopping criterion: Σ weight · loss, or with ``criterion =
        relative`` Σ weight · loss / (the task's loss at initialization, ``reference``), so that every task's
        progress counts alike whatever its loss's scale."""
        pred = self.predict(params, feats, val_idx)
        out, total = {}, 0.0
        for task, s in self.targets.spec.items():
            y = self.targets.y[task][val_idx]
            if s["kind"] == "class":
                p = np.clip(pred[task][np.arange(len(y)), y], 1e-12, 1)
                loss = float(-np.log(p).mean())
                out[task] = {"loss": loss, **metrics_lib.classification(y, pred[task].argmax(-1))}
            else:
                loss = float(((pred[task] - y) ** 2).mean())
                out[task] = {"loss": loss, **metrics_lib.regression(y, pred[task])}
            total += s["weight"] * loss / (max(reference[task]["loss"], 1e-8) if reference else 1.0)
        if self.tau_task is not None:
            # Model selection on one task's validation Kendall τ (NFN's protocol): the criterion is −τ.
            total = -out[self.tau_task]["kendall_tau"]
        return {"loss": total, "tasks": out}

    def curriculum(self, train_idx, complexity, epoch: int) -> np.ndarray:
        """The training rows of ``epoch``: with ``train.curriculum = K`` epochs and a per-row ``complexity`` (e.g.
        parameter count), the simplest networks first — those at or below the ((epoch + 1) / K) quantile of the
        training rows' complexity — growing to every row from epoch K − 1 on."""
        k = int(self.cfg.get("curriculum", 0))
        if not k or complexity is None or epoch >= k - 1:
            return train_idx
        c = np.asarray(complexity)[train_idx]
        return train_idx[c <= np.quantile(c, (epoch + 1) / k)]

    def fit(self, feats, train_idx, val_idx, workdir: str | None = None, progress: bool = True,
            complexity=None) -> Fit:
        cfg = self.cfg
        params, opt_state = self.init(feats, train_idx)
        # Recomputed on resume: the initial parameters are a function of the seed.
        reference = self._val_metrics(params, feats, val_idx)["tasks"] if self.relative else None
        state = {"params": params, "opt_state": opt_state, "best_params": params,
                 "epoch": _i(0), "best_epoch": _i(0), "best_val": _f(np.inf), "bad_epochs": _i(0)}
        if self.per_task:
            tasks = list(self.targets.spec)
            state["task"] = {t: {"params": params, "epoch": _i(0), "val": _f(np.inf)} for t in tasks}
        ckpts = core.Checkpoints(workdir, "epoch")
        state, start, history = ckpts.resume(state, [])
        t0 = time.time()
        bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, desc=self.learner.name,
                   disable=not progress)
        for epoch in bar:
            if int(state["bad_epochs"]) >= cfg.patience:
                break
            rng = np.random.default_rng([cfg.seed, epoch])
            key = jax.random.fold_in(jax.random.key(cfg.seed), epoch)
            params, opt_state = state["params"], state["opt_state"]
            losses, te = [], time.time()
            rows_e = self.curriculum(train_idx, complexity, epoch)
            for s, (batch, rows) in enumerate(self.learner.batches(feats, rows_e, cfg.batch_size, rng)):
                b, y, m = self._device(batch, rows)
                keys = jax.device_put(jax.random.split(jax.random.fold_in(key, s), rows.shape[0]), self.data)
                params, opt_state, loss = self._step(params, opt_state, b, y, m, keys)
                losses.append(loss)
            train_loss = float(np.mean(jax.device_get(losses)))
            val = self._val_metrics(params, feats, val_idx, reference)
            better = val["loss"] < float(state["best_val"])
            new = {"params": params, "opt_state": opt_state,
                   "best_params": params if better else state["best_params"],
                   "epoch": _i(epoch + 1), "best_epoch": _i(epoch + 1 if better else state["best_epoch"]),
                   "best_val": _f(val["loss"] if better else state["best_val"])}
            if self.per_task:
                # Each task keeps the epoch that was best for it; training stops only when no task improves.
                new["task"], improved = {}, better
                for t, best in state["task"].items():
                    score = self._task_score(t, val["tasks"][t])
                    up = score < float(best["val"])
                    improved |= up
                    new["task"][t] = {"params": params, "epoch": _i(epoch + 1), "val": _f(score)} if up else best
                better = improved
            new["bad_epochs"] = _i(0 if better else int(state["bad_epochs"]) + 1)
            state = new
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                            "val": val["tasks"], "seconds": round(time.time() - te, 2)})
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val['loss']:.3f}")
            logging.info("%s epoch %d: train %.4f val %.4f (%.1fs)", self.learner.name, epoch + 1, train_loss,
                         val["loss"], time.time() - te)
            ckpts.save(epoch + 1, state, history)
            if core.halt(epoch + 1, cfg.halt_at, "--config.train.halt_at"):
                break
        log_vars = {t: float(v) for t, v in state["best_params"]["log_var"].items()} if self.balance else {}
        fit = Fit(state["best_params"], history, int(state["best_epoch"]), int(state["epoch"]),
                  time.time() - t0, start, log_vars)
        if self.per_task:
            fit.task_params = {t: b["params"] for t, b in state["task"].items()}
            fit.task_best_epoch = {t: int(b["epoch"]) for t, b in state["task"].items()}
        return fit
