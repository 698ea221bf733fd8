"""SparseGPT against Optimal Brain Surgeon written out directly in NumPy: no Cholesky factor, no lazy updates."""

import jax.numpy as jnp
import numpy as np
import pytest

from wa.esa import saliency, sparsegpt


def obs_reference(w, gram, spec, block, damp=sparsegpt.DAMP):
    """Columns left to right; the masked weights of column i removed by OBS on the columns not yet visited, with
    that sub-Hessian inverted outright. The mask is chosen per block (a fraction) or per group of M columns
    (N:M) on the weights as the earlier columns left them, by w² / [H_F⁻¹]_00, H_F the sub-Hessian from i on."""
    w = np.array(w, np.float64)
    h = np.array(gram, np.float64)
    rows, cols = w.shape
    h = h + damp * np.mean(np.diag(h)) * np.eye(cols)
    inv_from = [np.linalg.inv(h[i:, i:]) for i in range(cols)]
    d2 = np.array([f[0, 0] for f in inv_from])
    mask = np.zeros((rows, cols), bool)
    for i in range(cols):
        if isinstance(spec, tuple) and i % spec[1] == 0:
            n, m = spec
            score = w[:, i:i + m] ** 2 / d2[i:i + m]
            for r in range(rows):
                mask[r, i + np.argsort(score[r], kind="stable")[:n]] = True
        if not isinstance(spec, tuple) and i % block == 0:
            j = min(i + block, cols)
            score = (w[:, i:j] ** 2 / d2[i:j]).ravel()
            k = int(round(spec * score.size))
            sel = np.zeros(score.size, bool)
            sel[np.argsort(score, kind="stable")[:k]] = True
            mask[:, i:j] = sel.reshape(rows, j - i)
        f = inv_from[i]
        for r in np.flatnonzero(mask[:, i]):
            w[r, i:] -= w[r, i] / f[0, 0] * f[0, :]
    return w, mask


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)) * rng.uniform(0.2, 3.0, size=12)   # tokens × inputs, uneven input scales
    x[:, 3] += 2.0 * x[:, 5]                                          # correlated inputs: OBS moves weight
    w = rng.normal(size=(5, 12))                                      # [outputs, inputs]
    return w, x.T @ x, x


@pytest.mark.parametrize("spec,block", [(0.5, 128), (0.5, 4), (0.75, 5), ((2, 4), 128), ((2, 4), 4), ((1, 3), 6)])
def test_sparsegpt_is_obs_column_by_column(problem, spec, block):
    w, gram, _ = problem
    got, loss = sparsegpt.prune_rows(jnp.asarray(w, jnp.float32), jnp.asarray(gram, jnp.float32), spec, block)
    want, mask = obs_reference(w, gram, spec, block)
    got = np.asarray(got)
    np.testing.assert_array_equal(got == 0, mask)                  # the removed weights are exactly zero ...
    # ... and the rest moved as OBS moves them (float32 against float64, inputs scaled 0.2-3 and correlated)
    np.testing.assert_allclose(got, want, atol=3e-3, rtol=3e-3)
    if isinstance(spec, tuple):
        n, m = spec
        assert ((got == 0).reshape(5, -1, m).sum(-1) == n).all()
    else:
        assert (got == 0).sum() == sum(round(spec * 5 * min(block, 12 - b)) for b in range(0, 12, block))
    assert loss > 0


def test_sparsegpt_reconstructs_better_than_magnitude(problem):
    w, gram, x = problem
    got, _ = sparsegpt.prune_rows(jnp.asarray(w, jnp.float32), jnp.asarray(gram, jnp.float32), 0.5)
    mag = dict(saliency.prune({"w": w}, {"w": np.abs(w)}, 0.5, "per_output", input_axes={"w": 1}))["w"]
    err = lambda v: np.linalg.norm(x @ (np.asarray(v, np.float64) - w).T)   # noqa: E731
    assert err(got) < 0.8 * err(mag)


def test_prune_kernel_reads_flax_and_conv1d_layouts(problem):
    w, gram, _ = problem
    rows, _ = sparsegpt.prune_rows(jnp.asarray(w, jnp.float32), jnp.asarray(gram, jnp.float32), (2, 4))
    flax, _ = sparsegpt.prune_kernel(w.T.astype(np.float32), gram, "2:4", input_axis=0)    # [in, out]
    conv, _ = sparsegpt.prune_kernel(w.astype(np.float32), gram, "2:4", input_axis=1)      # [out, in]
    np.testing.assert_array_equal(np.asarray(flax).T, np.asarray(rows))
    np.testing.assert_array_equal(np.asarray(conv), np.asarray(rows))
    with pytest.raises(ValueError, match="multiple of 8"):
        sparsegpt.prune_kernel(w.T, gram, "4:8")


def test_a_dead_input_loses_its_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 8))
    x[:, 2] = 0.0
    w = rng.normal(size=(3, 8))
    got, _ = sparsegpt.prune_rows(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), 0.25)
    assert np.isfinite(np.asarray(got)).all() and (np.asarray(got)[:, 2] == 0).all()
