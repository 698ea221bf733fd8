"""Each score against an independent computation on a tiny model."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from wa import models, parallel
from wa.esa import scores


def _data(vocab, n=6, t=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(n, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    if n > 4:
        mask[4, 3:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    d, _, _ = helpers.write_checkpoint(tmp_path_factory.mktemp("m"), "llama_micro")
    return models.load(d)


def _cal(loaded, ids, mask, batch_size, **kw):
    batches = list(parallel.iter_batches(loaded.mesh, {"input_ids": ids, "attention_mask": mask}, batch_size))
    return scores.Calibration(loaded, batches, jax.random.key(0), progress=False, **kw)


def _pooled_loss(loaded, ids, mask):
    @jax.jit
    def f(p):
        s, c = loaded.token_nll(p, {"input_ids": ids, "attention_mask": mask})
        return s / c
    return f


def test_magnitude(micro):
    s = scores.compute("magnitude", micro.params, None)
    w = helpers.flat(micro.params)
    for p in w:
        np.testing.assert_array_equal(np.asarray(s[p]), np.abs(np.asarray(w[p])))


def _window_grads(loaded, ids, mask):
    """A plain loop: the gradient of each window's own mean loss (windows with no loss term left out)."""
    out = []
    for i in range(len(ids)):
        if (mask[i, 1:] * mask[i, :-1]).sum() == 0:
            continue
        out.append(helpers.flat(jax.grad(_pooled_loss(loaded, ids[i:i + 1], mask[i:i + 1]))(loaded.params)))
    return out


@pytest.mark.parametrize("window_chunk", [1, 4])
def test_grad_x_weight_is_the_mean_over_windows_of_each_windows_taylor_term(micro, window_chunk):
    ids, mask = _data(12)
    mask[5] = 0                                   # a window without loss terms counts for nothing
    s = scores.compute("grad_x_weight", micro.params, _cal(micro, ids, mask, 4, window_chunk=window_chunk))
    gs = _window_grads(micro, ids, mask)
    assert len(gs) == 5
    w = helpers.flat(micro.params)
    for p in w:
        want = np.mean([np.abs(np.asarray(w[p], np.float64) * np.asarray(g[p], np.float64)) for g in gs], axis=0)
        np.testing.assert_allclose(np.asarray(s[p]), want, rtol=1e-4, atol=1e-8, err_msg=p)


def test_one_windows_taylor_term_matches_finite_differences(micro):
    ids, mask = (a[:1] for a in _data(12, n=2))
    s = scores.compute("grad_x_weight", micro.params, _cal(micro, ids, mask, 1))
    f = _pooled_loss(micro, ids, mask)
    w = helpers.flat(micro.params)
    path = "model/layers/0/mlp/down_proj/kernel"
    eps = 1e-2
    for idx in [(0, 0), (3, 5), (7, 2)]:
        def shifted(d):
            p = jax.tree_util.tree_map(lambda x: x, micro.params)
            k = p["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
            p["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"] = k.at[idx].add(d)
            return float(f(p))
        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        np.testing.assert_allclose(float(s[path][idx]), abs(float(w[path][idx]) * fd), rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("metric", ["grad_squared", "taylor_squared"])
def test_squared_scores_are_means_over_windows(micro, metric):
    ids, mask = _data(12)
    s = scores.compute(metric, micro.params, _cal(micro, ids, mask, 2))  # 3 batches of 2 windows
    gs = _window_grads(micro, ids, mask)
    w = helpers.flat(micro.params)
    for p in gs[0]:
        # grad_squared: g_w² (Fisher); taylor_squared: (g_w · w)² (the squared Taylor term).
        scale = 1.0 if metric == "grad_squared" else np.asarray(w[p], np.float64)
        want = np.mean([(np.asarray(g[p], np.float64) * scale) ** 2 for g in gs], axis=0)
        np.testing.assert_allclose(np.asarray(s[p]), want, rtol=1e-4, atol=1e-10, err_msg=p)


def test_one_gradient_pass_serves_every_per_window_score(micro):
    ids, mask = _data(12, n=12)
    cal = _cal(micro, ids, mask, 4)
    both = scores.prefix_means(("grad_x_weight", "taylor_squared"), micro.params, cal, [4, 12])
    alone = scores.compute("taylor_squared", micro.params, cal)
    for p, v in alone.items():
        np.testing.assert_allclose(np.asarray(both["taylor_squared"][12][p]), np.asarray(v), rtol=1e-6, err_msg=p)
    first4 = scores.compute("grad_x_weight", micro.params, _cal(micro, ids[:4], mask[:4], 4))
    for p, v in first4.items():
        np.testing.assert_allclose(np.asarray(both["grad_x_weight"][4][p]), np.asarray(v), rtol=1e-6, err_msg=p)
    # reduce stores what it returns in place of each point's scores.
    seen = []
    sizes = scores.prefix_means("grad_x_weight", micro.params, cal, [4, 12],
                                reduce=lambda n, w, means: seen.append((n, w)) or len(means))
    assert sizes == {"grad_x_weight": {4: len(first4), 12: len(first4)}}
    assert seen == [("grad_x_weight", 4), ("grad_x_weight", 12)]


@pytest.mark.slow
def test_hutchinson_runs_on_bfloat16_parameters(micro, tmp_path):
    d, _, _ = helpers.write_checkpoint(tmp_path, "llama_micro")
    half = models.load(d, dtype=jnp.bfloat16)
    ids, mask = _data(12)
    s = scores.compute("hutchinson_diag", half.params, _cal(half, ids, mask, 2, probes=2, probe_chunk=2))
    full = scores.compute("hutchinson_diag", micro.params, _cal(micro, ids, mask, 2, probes=2, probe_chunk=2))
    for p, v in full.items():   # the same probes; the Hessian of a bfloat16 model, so close, not equal
        assert s[p].shape == v.shape and np.all(np.isfinite(np.asarray(s[p], np.float32)))
    a = np.concatenate([np.ravel(np.asarray(s[p], np.float32)) for p in full])
    b = np.concatenate([np.ravel(np.asarray(full[p], np.float32)) for p in full])
    assert np.corrcoef(a, b)[0, 1] > 0.9


def _exact_hessian_diag(f, params):
    """diag(H) column by column: e_i -> (H e_i)_i, vmapped over one-hot tangents."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    g = jax.grad(lambda x: f(unravel(x)))
    n = flat.size

    def col(i):
        e = jnp.zeros(n).at[i].set(1.0)
        return jax.jvp(g, (flat,), (e,))[1][i]

    return np.asarray(jax.jit(jax.vmap(col))(jnp.arange(n))), unravel


def test_hutchinson_converges_to_exact_hessian_diagonal(micro):
    ids, mask = _data(12, n=2)
    exact, unravel = _exact_hessian_diag(_pooled_loss(micro, ids, mask), micro.params)
    assert exact.size == sum(np.asarray(v).size for v in helpers.flat(micro.params).values())
    errs = {}
    for probes in (4, 256):
        est = scores.compute("hutchinson_diag", micro.params, _cal(micro, ids, mask, 2, probes=probes,
                                                                       probe_chunk=4))
        flat_est = jax.flatten_util.ravel_pytree(jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(micro.params), list(est.values())))[0]
        errs[probes] = float(np.linalg.norm(np.asarray(flat_est) - exact) / np.linalg.norm(exact))
    # Error shrinks like 1/sqrt(P): 64x the probes, about 8x less error. Stated tolerance: 35%
    # relative L2 error at 256 probes on this model, and at least 4x less than at 4 probes.
    assert errs[256] < 0.35 and errs[256] < errs[4] / 4, errs


def test_hutchinson_is_exact_in_expectation_on_a_quadratic():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)))
    h = a @ a.T
    params = {"w": jnp.ones(5)}
    f = lambda p: 0.5 * p["w"] @ h @ p["w"]  # noqa: E731
    est = scores.hvp_diag_chunk(f, params, jax.random.key(0), 4096, jnp.full(4096, 1 / 4096))
    np.testing.assert_allclose(np.asarray(est["w"]), np.diag(h), rtol=0.1)


def test_hutchinson_is_reproducible_from_its_seed_with_a_padded_probe_chunk(micro):
    # 6 probes in chunks of 4: the second chunk carries 2 zero-weight padding probes. Other chunk sizes draw
    # other probes (one key per chunk), so they agree only in expectation (see the exact-diagonal test above).
    ids, mask = _data(12, n=2)
    a = scores.compute("hutchinson_diag", micro.params, _cal(micro, ids, mask, 2, probes=6, probe_chunk=4))
    b = scores.compute("hutchinson_diag", micro.params, _cal(micro, ids, mask, 2, probes=6, probe_chunk=4))
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))


def test_act_mag_rides_on_the_per_window_pass(micro):
    # Wanda's input norms read from the gradient pass's forward passes equal act_mag's own pass, the untied
    # head's input (the final hidden states, which the chunked loss reads without a layer call) included.
    ids, mask = _data(12, n=8)
    cal = _cal(micro, ids, mask, 4)
    alone = scores.compute("act_mag", micro.params, cal)
    assert "lm_head/kernel" in alone
    ridden = scores.window_means("grad_x_weight", micro.params, cal, acts=True)["act_mag"]
    curve = scores.prefix_means("grad_x_weight", micro.params, cal, [4, 8], acts=True)["act_mag"]
    assert set(ridden) == set(alone) and set(curve) == {8}
    for p, v in alone.items():
        np.testing.assert_allclose(np.asarray(ridden[p]), np.asarray(v), rtol=1e-5, err_msg=p)
        np.testing.assert_allclose(np.asarray(curve[8][p]), np.asarray(v), rtol=1e-5, err_msg=p)


def test_act_mag_against_hand_computed_activation_norms(micro):
    ids, mask = _data(12)
    s = scores.compute("act_mag", micro.params, _cal(micro, ids, mask, 2))
    p = helpers.flat(micro.params)
    # q_proj of layer 0 sees RMSNorm(embedding(ids)) * input_layernorm weight.
    x = np.asarray(p["model/embed_tokens/embedding"], np.float64)[ids]
    x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(p["model/layers/0/input_layernorm/weight"])
    norm = np.sqrt(((x * mask[..., None]) ** 2).sum((0, 1)))
    for role in ("q_proj", "k_proj", "v_proj"):
        path = f"model/layers/0/self_attn/{role}/kernel"
        want = np.abs(np.asarray(p[path])) * norm[:, None]
        np.testing.assert_allclose(np.asarray(s[path]), want, rtol=1e-4, err_msg=path)
    # Every linear kernel is scored; embeddings and norms are not.
    assert set(s) == {k for k in p if k.endswith("/kernel")}


def test_unknown_metric_and_missing_data(micro):
    with pytest.raises(scores.ScoreError, match="unknown metric 'fisher'; known: magnitude"):
        scores.compute("fisher", micro.params, None)
    with pytest.raises(scores.ScoreError, match="metric 'grad_squared' needs calibration batches"):
        scores.compute("grad_squared", micro.params, None)


def test_seeds_draw_disjoint_calibration_windows():
    from wa.esa import pipeline
    w = pipeline.seed_windows(100, 30, [1337, 123, 999])
    sets = [set(v.tolist()) for v in w.values()]
    assert [len(x) for x in sets] == [30, 30, 30] and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    again = pipeline.seed_windows(100, 30, [1337, 123, 999])   # the same draw every run
    assert all(np.array_equal(w[k], again[k]) for k in w)
    with pytest.raises(pipeline.ConfigError, match=r"max_samples=40 × 3 seeds = 120 disjoint calibration windows, "
                                                   r"but the calibration part holds 100"):
        pipeline.seed_windows(100, 40, [1, 2, 3])
