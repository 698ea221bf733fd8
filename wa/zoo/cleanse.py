"""Neural Cleanse (Wang et al. 2019, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P): the published reference detector of patch backdoors, for the zoo's classifiers.

For every class c, the smallest trigger that sends clean images to c is reverse-engineered: a mask m in [0, 1]^(H×W)
and a pattern p in [0, 1]^(H×W×C), applied as (1 − m)·x + m·p, minimise the cross-entropy towards c plus
λ·‖m‖₁ (m and p through sigmoids, Adam). A backdoored class needs a far smaller mask than the others; the anomaly
index of the smallest mask, (median − min) / (1.4826 · MAD) over the classes' L1 norms, flags a model above 2 (the
paper's threshold). It reads the model on clean images, never the trigger or the training data.

Differences from the paper, for a population of small models on a CPU: λ is fixed (the paper tunes it per class
until the reversed trigger reaches 99% success; ``success`` records the share each reversed trigger reaches, so a
failed reversal is visible), and every (model, class) problem runs at once, vmapped, for a fixed number of steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wa import errors


class CleanseError(errors.ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class Spec:
    steps: int = 300           # Adam steps per (model, class)
    batch: int = 32            # clean images per step (cycled through ``images``)
    lr: float = 0.1
    lam: float = 0.01          # weight of the mask's L1 norm (pixels) against the cross-entropy
    threshold: float = 2.0     # anomaly index above which a model is flagged (the paper's)

    def check(self) -> None:
        if self.steps < 1 or self.batch < 1 or not self.lr > 0 or not self.lam >= 0:
            raise CleanseError(f"Neural Cleanse settings {self}: steps and batch >= 1, lr > 0, lam >= 0")


def reverse(apply, params, x: np.ndarray, n_classes: int, spec: Spec, seed: int = 0) -> dict:
    """``apply(params, images in [0, 1]) -> logits`` of one model; ``params`` stacked over N models of one
    architecture; ``x`` [E, H, W, C] clean images. Returns ``norm`` [N, classes] (the reversed masks' L1 norms) and
    ``success`` [N, classes] (the share of ``x`` each reversed trigger sends to its class)."""
    spec.check()
    h, w, c = x.shape[1:]
    xs = jnp.asarray(x, jnp.float32)
    n_img = len(x)
    idx = (np.arange(spec.steps * spec.batch) % n_img).reshape(spec.steps, spec.batch)
    tx = optax.adam(spec.lr)

    def stamped(v, imgs):
        m = jax.nn.sigmoid(v["mask"])[..., None]
        return (1.0 - m) * imgs + m * jax.nn.sigmoid(v["pattern"])

    def one(p, label, key):
        v = {"mask": jnp.zeros((h, w)), "pattern": jax.random.normal(key, (h, w, c))}

        def loss(v, imgs):
            logits = apply(p, stamped(v, imgs))
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(len(imgs), label)).mean()
            return ce + spec.lam * jax.nn.sigmoid(v["mask"]).sum()

        def step(carry, ib):
            v, s = carry
            g = jax.grad(loss)(v, xs[ib])
            u, s = tx.update(g, s, v)
            return (optax.apply_updates(v, u), s), None

        (v, _), _ = jax.lax.scan(step, (v, tx.init(v)), idx)
        hit = (apply(p, stamped(v, xs)).argmax(-1) == label).mean()
        return jax.nn.sigmoid(v["mask"]).sum(), hit

    labels = jnp.arange(n_classes)
    n = len(jax.tree.leaves(params)[0])
    keys = jax.random.split(jax.random.PRNGKey(seed), n * n_classes).reshape(n, n_classes, -1)
    per_model = jax.vmap(one, in_axes=(None, 0, 0))
    norm, hit = jax.jit(jax.vmap(per_model, in_axes=(0, None, 0)))(params, labels, keys)
    return {"norm": np.asarray(norm), "success": np.asarray(hit)}


def anomaly(norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per model (rows of ``norm`` [N, classes]): the anomaly index of its smallest mask, (median − min) /
    (1.4826 · MAD), and that class."""
    norm = np.asarray(norm, np.float64)
    med = np.median(norm, axis=1)
    mad = 1.4826 * np.median(np.abs(norm - med[:, None]), axis=1)
    low = norm.min(axis=1)
    return (med - low) / np.maximum(mad, 1e-12), norm.argmin(axis=1)
