"""What the zoo records about every model at every checkpoint.

The JAX half computes per-example outcomes for a whole population at once (vmapped over models, chunked over
examples); the numpy half (``summarize``) turns them into the recorded properties:

- ``train_acc``/``train_loss``: on the model's own training pool with its own (possibly noisy) labels, i.e.
  what it was asked to fit; ``test_acc``/``test_loss`` on the clean test set; ``gen_gap`` = train_acc −
  test_acc and ``loss_gap`` = test_loss − train_loss.
- ``ece``: expected calibration error of the top-class confidence, equal-width bins.
- ``class_acc`` (per-class test accuracy), ``disparity_range`` (max − min) and ``disparity_std``.
- ``noise_acc_<σ>``: test accuracy with N(0, σ²) pixel noise, clipped to [0, 1] (the same noise for every model).
- ``fgsm_acc_<ε>``, ``pgd_acc_<ε>``: accuracy under L∞ attacks on the images' [0, 1] scale (Goodfellow et al.
  2015; Madry et al. 2018: ``pgd_steps`` signed-gradient steps of ``pgd_step_factor`` · ε / steps from a
  uniform random start in the ε-ball, projected and clipped after every step), on the first
  ``robust_examples`` test images.
- ``backdoor_success`` (zoos with backdoors): the share of test images whose class is not the model's backdoor
  target that, with the BadNets trigger stamped on, the model assigns to the target (the attack success rate of
  Gu et al. 2017); measured on clean models too, against the target drawn for them (their rate is the control).
  ``backdoor_clean_rate``: the same share without the trigger (a model that sends everything to the target has
  learned a bias, not a trigger).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from wa import errors
from wa.zoo.population import Population, cross_entropy


class PropertyError(errors.ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    fgsm_eps: tuple[float, ...] = (0.05, 0.1)
    pgd_eps: tuple[float, ...] = (0.05, 0.1)
    pgd_steps: int = 7
    pgd_step_factor: float = 2.5
    pgd_random_start: bool = True
    noise_sigma: tuple[float, ...] = (0.1, 0.3)
    ece_bins: int = 15
    train_examples: int = 0       # 0 = the whole training set
    robust_examples: int = 512
    batch: int = 512

    @classmethod
    def from_config(cls, c) -> EvalSpec:
        d = dict(c)
        for k in ("fgsm_eps", "pgd_eps", "noise_sigma"):
            d[k] = tuple(float(v) for v in d.get(k, ()))
        spec = cls(**d)
        spec.check()
        return spec

    def check(self) -> None:
        for name in ("fgsm_eps", "pgd_eps", "noise_sigma"):
            bad = [v for v in getattr(self, name) if not v >= 0]
            if bad:
                raise PropertyError(f"eval.{name} = {bad[0]}: must be >= 0 (an L∞ radius / noise level on the "
                                    "[0, 1] pixel scale)")
        if self.pgd_steps < 1 or self.ece_bins < 1 or self.batch < 1:
            raise PropertyError("eval.pgd_steps, eval.ece_bins and eval.batch must be >= 1")


def _key(v: float) -> str:
    return f"{v:g}"


class Evaluator:
    """Per-example outcomes of a population on fixed images; one compile per population size."""

    def __init__(self, pop: Population, spec: EvalSpec):
        self.pop, self.spec = pop, spec
        apply = pop.apply

        def clean(p, x, y):
            logits = apply(p, x)
            prob = jax.nn.softmax(logits)
            return cross_entropy(logits, y), logits.argmax(-1), prob.max(-1)

        def grad_x(p, x, y):
            return jax.grad(lambda x: cross_entropy(apply(p, x), y).sum())(x)

        def pgd(p, x, y, eps, key):
            alpha = spec.pgd_step_factor * eps / spec.pgd_steps
            start = jax.random.uniform(key, x.shape, minval=-eps, maxval=eps) if spec.pgd_random_start else 0.0
            xa = jnp.clip(x + start, 0.0, 1.0)

            def step(xa, _):
                xa = xa + alpha * jnp.sign(grad_x(p, xa, y))
                return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0), None

            xa, _ = jax.lax.scan(step, xa, None, length=spec.pgd_steps)
            return apply(p, xa).argmax(-1) == y

        fgsm_eps = jnp.asarray(spec.fgsm_eps, jnp.float32)
        pgd_eps = jnp.asarray(spec.pgd_eps, jnp.float32)

        def robust(p, x, y, key):
            # FGSM's direction does not depend on ε: one gradient serves every radius.
            direction = jnp.sign(grad_x(p, x, y))
            f = jax.vmap(lambda e: apply(p, jnp.clip(x + e * direction, 0.0, 1.0)).argmax(-1) == y)(fgsm_eps)
            g = jax.vmap(lambda e, k: pgd(p, x, y, e, k))(pgd_eps, jax.random.split(key, len(spec.pgd_eps)))
            return f, g

        # Images are shared by the population; labels are per model (training labels may be noisy).
        self._clean = jax.jit(jax.vmap(clean, in_axes=(0, None, 0)))
        self._robust = jax.jit(jax.vmap(robust, in_axes=(0, None, None, 0)))

    def _chunks(self, n):
        b = self.spec.batch
        return [(s, min(s + b, n)) for s in range(0, n, b)]

    def _chunk(self, a: np.ndarray, s: int, e: int, axis: int = 0) -> np.ndarray:
        """Rows s:e of ``a`` along ``axis``, zero-padded to the batch size so one compile serves every chunk."""
        part = a[(slice(None),) * axis + (slice(s, e),)]
        pad = min(self.spec.batch, a.shape[axis]) - (e - s)
        if pad:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, pad)
            part = np.pad(part, widths)
        return part

    def clean(self, params, x: np.ndarray, y: np.ndarray) -> dict:
        """x [E, ...] shared, y [N, E] per model -> loss, pred, conf, each [N, E]."""
        outs = []
        for s, e in self._chunks(len(x)):
            xs, ys = self._chunk(x, s, e), self._chunk(y, s, e, axis=1)
            loss, pred, conf = self._clean(params, jnp.asarray(xs), jnp.asarray(ys))
            outs.append([np.asarray(a)[:, : e - s] for a in (loss, pred, conf)])
        loss, pred, conf = (np.concatenate([o[i] for o in outs], axis=1) for i in range(3))
        return {"loss": loss, "pred": pred, "conf": conf}

    def robust(self, params, x: np.ndarray, y: np.ndarray, keys) -> dict:
        """Correctness under FGSM and PGD: [N, len(eps), E] each."""
        fs, gs = [], []
        for i, (s, e) in enumerate(self._chunks(len(x))):
            xs, ys = self._chunk(x, s, e), self._chunk(y, s, e)
            k = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
            f, g = self._robust(params, jnp.asarray(xs), jnp.asarray(ys), k)
            fs.append(np.asarray(f)[..., : e - s])
            gs.append(np.asarray(g)[..., : e - s])
        return {"fgsm": np.concatenate(fs, axis=-1), "pgd": np.concatenate(gs, axis=-1)}


@dataclasses.dataclass(eq=False)
class EvalData:
    """The fixed images every checkpoint is evaluated on (shared by all models of a data set).

    ``halves``: for the training images evaluated, the test images and the robustness images, two disjoint
    halves (test and robustness halves stratified by class), drawn once with the zoo's seed: every property is
    also recorded on each half (``<property>_half_a`` / ``_half_b``), so the reliability of a target on this zoo
    (split-half agreement, Spearman–Brown corrected: ``wa.eval.reliability``) can be measured."""
    x_train: np.ndarray
    train_index: np.ndarray      # which training images (into the full training set)
    x_test: np.ndarray
    y_test: np.ndarray
    noisy: dict[float, np.ndarray]
    n_classes: int
    robust_n: int
    halves: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    x_trigger: np.ndarray | None = None   # the test images with the backdoor trigger stamped on

    @classmethod
    def build(cls, data, spec: EvalSpec, seed: int = 0, trigger=None) -> EvalData:
        rng = np.random.default_rng(seed)
        n = len(data.y_train)
        idx = np.arange(n) if not spec.train_examples or spec.train_examples >= n else np.sort(
            rng.choice(n, spec.train_examples, replace=False))
        noisy = {s: np.clip(data.x_test + s * rng.standard_normal(data.x_test.shape).astype(np.float32), 0, 1)
                 for s in spec.noise_sigma}
        robust_n = min(spec.robust_examples, len(data.y_test)) if spec.robust_examples else len(data.y_test)
        # Drawn from their own generator, so the images above stay what they were before halves existed.
        hr = np.random.default_rng([seed, 1])
        halves = {"train": halves_of(np.zeros(len(idx), np.int64), hr), "test": halves_of(data.y_test, hr),
                  "robust": halves_of(data.y_test[:robust_n], hr)}
        x_trigger = None if trigger is None else np.asarray(trigger.stamp(data.x_test), np.float32)
        return cls(data.x_train[idx], idx, data.x_test, data.y_test, noisy, data.n_classes, robust_n, halves,
                   x_trigger)


def halves_of(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of ``range(len(labels))``, each holding half of every class (rounded alternately)."""
    a, b = [], []
    flip = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = (len(members) + flip) // 2
        flip ^= len(members) % 2
        a.append(members[:cut])
        b.append(members[cut:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def evaluate(ev: Evaluator, params, ed: EvalData, mask: np.ndarray, labels: np.ndarray, keys,
             targets: np.ndarray | None = None) -> list[dict]:
    """Every property of every model of a population at one checkpoint (a list of N dicts); ``targets`` [N]: each
    model's backdoor target class, where the zoo has backdoors."""
    n = mask.shape[0]
    train_labels = labels[:, ed.train_index]
    tr = ev.clean(params, ed.x_train, train_labels)
    yt = np.broadcast_to(ed.y_test, (n, len(ed.y_test)))
    te = ev.clean(params, ed.x_test, yt)
    noise = {s: ev.clean(params, x, yt)["pred"] == yt for s, x in ed.noisy.items()}
    r = ed.robust_n
    rob = ev.robust(params, ed.x_test[:r], ed.y_test[:r], keys)
    trig = None
    if targets is not None and ed.x_trigger is not None:
        trig = {"pred": ev.clean(params, ed.x_trigger, yt)["pred"], "target": np.asarray(targets)}
    return summarize(tr, mask[:, ed.train_index], train_labels, te, ed.y_test, noise, rob, ev.spec,
                     ed.n_classes, ed.halves, trig)


def ece(conf: np.ndarray, correct: np.ndarray, bins: int) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


HALVES = ("a", "b")


def _measure(i, tr, m, train_labels, te, y_test, noise, rob, spec: EvalSpec, n_classes: int, t=slice(None),
             e=slice(None), r=slice(None), trig=None) -> dict:
    """Model ``i``'s properties on the training images ``t``, test images ``e`` and robustness images ``r``."""
    m = m[t]
    tr_correct = tr["pred"][i][t][m] == train_labels[i][t][m]
    y = y_test[e]
    correct = te["pred"][i][e] == y
    class_acc = np.array([correct[y == c].mean() if (y == c).any() else np.nan for c in range(n_classes)])
    row = {
        "train_acc": float(tr_correct.mean()) if m.any() else float("nan"),
        "train_loss": float(tr["loss"][i][t][m].mean()) if m.any() else float("nan"),
        "test_acc": float(correct.mean()),
        "test_loss": float(te["loss"][i][e].mean()),
        "ece": ece(te["conf"][i][e], correct, spec.ece_bins),
        "class_acc": class_acc.tolist(),
        "disparity_range": float(np.nanmax(class_acc) - np.nanmin(class_acc)),
        "disparity_std": float(np.nanstd(class_acc)),
    }
    row["gen_gap"] = row["train_acc"] - row["test_acc"]
    row["loss_gap"] = row["test_loss"] - row["train_loss"]
    for s, c in noise.items():
        row[f"noise_acc_{_key(s)}"] = float(c[i][e].mean())
    for j, eps in enumerate(spec.fgsm_eps):
        row[f"fgsm_acc_{_key(eps)}"] = float(rob["fgsm"][i, j][r].mean())
    for j, eps in enumerate(spec.pgd_eps):
        row[f"pgd_acc_{_key(eps)}"] = float(rob["pgd"][i, j][r].mean())
    if trig is not None:
        target = trig["target"][i]
        other = y != target
        hit = lambda pred: float((pred[other] == target).mean()) if other.any() else float("nan")  # noqa: E731
        row["backdoor_success"] = hit(trig["pred"][i][e])
        row["backdoor_clean_rate"] = hit(te["pred"][i][e])
    return row


def summarize(tr, train_mask, train_labels, te, y_test, noise, rob, spec: EvalSpec, n_classes: int,
              halves: dict | None = None, trig: dict | None = None) -> list[dict]:
    rows = []
    for i in range(train_mask.shape[0]):
        if not train_mask[i].any():
            raise PropertyError(f"model {i} has an empty training pool among the evaluated training images")
        row = _measure(i, tr, train_mask[i], train_labels, te, y_test, noise, rob, spec, n_classes, trig=trig)
        for h, name in enumerate(HALVES if halves else ()):
            part = _measure(i, tr, train_mask[i], train_labels, te, y_test, noise, rob, spec, n_classes,
                            halves["train"][h], halves["test"][h], halves["robust"][h], trig)
            row.update({f"{k}_half_{name}": v for k, v in part.items() if k != "class_acc"})
        rows.append(row)
    return rows


@functools.cache
def property_names(spec: EvalSpec, backdoor: bool = False) -> tuple[str, ...]:
    base = ["train_acc", "train_loss", "test_acc", "test_loss", "gen_gap", "loss_gap", "ece", "disparity_range",
            "disparity_std"]
    return tuple(base + [f"noise_acc_{_key(s)}" for s in spec.noise_sigma]
                 + [f"fgsm_acc_{_key(e)}" for e in spec.fgsm_eps] + [f"pgd_acc_{_key(e)}" for e in spec.pgd_eps]
                 + (["backdoor_success", "backdoor_clean_rate"] if backdoor else []))
