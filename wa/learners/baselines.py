"""Baselines that ignore the structure of a network: weight statistics (StatNN) and flattened weights.

``stats_gbt``: per-layer statistics → scikit-learn histogram gradient-boosted trees, one per task (the
published Small-CNN-Zoo baseline). ``spectral_gbt``: WeightWatcher's per-layer spectral metrics (power-law α, α̂,
stable rank, log spectral and Frobenius norms; no data needed) → the same trees; ``stats_spectral_gbt``: both.
``stats_mlp``: the statistics → an MLP with the shared multi-task heads.
``pca_linear``: flattened weights → PCA → ridge / logistic regression. ``flat_mlp``: flattened weights → MLP.
Inputs of the neural and linear baselines are scaled robustly (``base.RobustClip``, statistics of the training rows);
the trees need no scaling. Networks of different sizes are zero-padded to the largest one's length (flat) or
depth (statistics); the padding sizes are fixed by the first networks prepared (the whole set, before splitting).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from sklearn import decomposition, ensemble, linear_model, pipeline

from wa.learners import base, heads
from wa.weights import canonical, spectral, stats


def flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(params)])


class _Features:
    """Statistics or flat weights as one padded matrix [n, F]."""
    kind = "stats"
    width = None

    def _matrix(self, params, families):
        if self.kind in ("stats", "spectral", "stats_spectral"):
            parts = []
            if "stats" in self.kind:
                x, self.width = stats.matrix(params, families, self.width)
                parts.append(x)
            if "spectral" in self.kind:
                x, self.width = spectral.matrix(params, families, self.width)
                parts.append(x)
            return np.concatenate(parts, axis=1)
        vecs = [flat(p) for p in params]
        if self.width is None:
            self.width = max(len(v) for v in vecs)
        if max(len(v) for v in vecs) > self.width:
            raise base.LearnerError(f"a network has more than the {self.width} weights the baseline was sized for")
        return np.stack([np.pad(v, (0, self.width - len(v))) for v in vecs]).astype(np.float32)


class MLP(nn.Module):
    out_dims: tuple
    dim: int = 256
    n_layers: int = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x
        for i in range(self.n_layers):
            h = nn.gelu(nn.Dense(self.dim, name=f"hidden_{i}")(h))
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        z = nn.Dense(self.dim, name="embedding")(h)
        return {"embedding": z, **heads.Heads(self.out_dims, self.dim, name="heads")(nn.gelu(z))}


class _DenseMLP(_Features, base.Dense):
    scaler = sources = None

    def prepare(self, params, families, activations, forward=None):
        x = self._matrix(params, families)
        if self.kind == "flat" and self.cfg.get("permute_augment") and self.sources is None:
            # The networks the flat vectors came from, to draw hidden-neuron permutations of while training.
            self.sources = (list(params), list(families), x)
        return x

    def setup(self, feats, train_idx, batch_size):
        self.scaler = base.RobustClip(self.cfg.clip).fit(feats[train_idx])

    def gather(self, feats, rows, rng=None):
        x = feats[np.maximum(rows, 0)]
        if rng is not None and self.sources is not None:
            params, families, src = self.sources
            if src is not feats:
                raise base.LearnerError("permute_augment: training rows must come from the first prepare() call")
            x = np.stack([self._matrix([canonical.permute(params[i], families[i],
                                                          canonical.random_perms(params[i], families[i], rng))],
                                       [families[i]])[0] for i in np.maximum(rows, 0).ravel()]).reshape(x.shape)
        return self.scaler.transform(x.reshape(-1, x.shape[-1])).reshape(x.shape).astype(np.float32)

    def module(self):
        c = self.cfg
        return MLP(tuple(self.targets.out_dims().items()), dim=c.dim, n_layers=c.layers, dropout=c.dropout)


class StatsMLP(_DenseMLP):
    name, kind = "stats_mlp", "stats"


class FlatMLP(_DenseMLP):
    name, kind = "flat_mlp", "flat"


class _Fitted(_Features, base.Learner):
    """One scikit-learn estimator per task; ``predict`` gives class probabilities or standardized values."""
    neural = False

    def prepare(self, params, families, activations, forward=None):
        return self._matrix(params, families)

    def estimator(self, kind: str, seed: int):
        raise NotImplementedError

    pre = None

    def preprocessor(self, seed: int):
        return None

    keep = None

    def fit(self, feats, train_idx, val_idx, seed: int):
        # The validation rows are not needed: these estimators carry their own regularization.
        self.pre = self.preprocessor(seed)
        # A feature missing (NaN) on every training network says nothing, and scikit-learn's binning fails on it
        # (a layer slot only deeper networks have; an α no layer of that slot can fit).
        self.keep = ~np.isnan(feats[train_idx]).all(axis=0)
        x = feats[train_idx][:, self.keep]
        x = x if self.pre is None else self.pre.fit_transform(x)
        self.models = {task: self.estimator(spec["kind"], seed).fit(x, self.targets.y[task][train_idx])
                       for task, spec in self.targets.spec.items()}

    def predict(self, feats, idx):
        x = feats[idx][:, self.keep]
        x = x if self.pre is None else self.pre.transform(x)
        out = {"embedding": x if self.pre is not None else None}
        for task, m in self.models.items():
            if self.targets.spec[task]["kind"] == "class":
                p = np.zeros((len(idx), len(self.targets.spec[task]["classes"])))
                p[:, m.classes_] = m.predict_proba(x)   # a class absent from training gets probability 0
                out[task] = p
            else:
                out[task] = m.predict(x)
        return out


class StatsGBT(_Fitted):
    name, kind = "stats_gbt", "stats"

    def estimator(self, kind, seed):
        c = self.cfg
        cls = ensemble.HistGradientBoostingClassifier if kind == "class" else ensemble.HistGradientBoostingRegressor
        return cls(max_iter=c.iters, learning_rate=c.lr, min_samples_leaf=c.min_leaf, random_state=seed)


class SpectralGBT(StatsGBT):
    """WeightWatcher's data-free per-layer metrics (``wa.weights.spectral``) -> the same trees (NaN where a layer
    has no fitted power law: the trees route missing values themselves)."""
    name, kind = "spectral_gbt", "spectral"


class StatsSpectralGBT(StatsGBT):
    name, kind = "stats_spectral_gbt", "stats_spectral"


class PCALinear(_Fitted):
    name, kind = "pca_linear", "flat"

    def preprocessor(self, seed):
        return pipeline.make_pipeline(base.RobustClip(self.cfg.clip), decomposition.PCA(self.cfg.components,
                                                                                   random_state=seed))

    def estimator(self, kind, seed):
        c = self.cfg
        return (linear_model.LogisticRegression(C=c.c, max_iter=2000) if kind == "class"
                else linear_model.Ridge(alpha=c.alpha))


base.register(base.Entry("stats_gbt", StatsGBT, config=dict(iters=300, lr=0.05, min_leaf=20),
                         smoke=dict(iters=10, min_leaf=2)))
base.register(base.Entry("spectral_gbt", SpectralGBT, config=dict(iters=300, lr=0.05, min_leaf=20),
                         smoke=dict(iters=10, min_leaf=2)))
base.register(base.Entry("stats_spectral_gbt", StatsSpectralGBT, config=dict(iters=300, lr=0.05, min_leaf=20),
                         smoke=dict(iters=10, min_leaf=2)))
base.register(base.Entry("stats_mlp", StatsMLP, config=dict(dim=256, layers=2, dropout=0.1, clip=8.0,
                                                            permute_augment=False), smoke=dict(dim=16, layers=1)))
base.register(base.Entry("pca_linear", PCALinear, config=dict(components=64, alpha=1.0, c=1.0, clip=8.0),
                         smoke=dict(components=4)))
base.register(base.Entry("flat_mlp", FlatMLP, config=dict(dim=256, layers=2, dropout=0.1, clip=8.0,
                                                          permute_augment=False), smoke=dict(dim=16, layers=1)))
