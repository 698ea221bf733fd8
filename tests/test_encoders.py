"""wa's own BERT and RoBERTa against transformers' PyTorch classes: last hidden states, pooled output and gradient
on tiny random models (tests/fixtures/encoders, written by ``make_decoder_fixtures.py``)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.models import bert

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "encoders")
TOL = dict(rtol=1e-5, atol=1e-5)


def encoder_loss(hidden, pooled, mask):
    """The fixture script's scalar: mean squared norm of the real tokens' states plus that of the pooled outputs."""
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.sum(hidden ** 2, -1) * m) / jnp.sum(m) + jnp.mean(jnp.sum(pooled ** 2, -1))


def test_every_encoder_family_has_a_fixture():
    assert sorted(os.listdir(HERE)) == sorted(bert.MODEL_TYPES)


@pytest.mark.parametrize("name", bert.MODEL_TYPES)
def test_hidden_states_pooled_output_and_gradient_equal_transformers(name):
    loaded = models.load(os.path.join(HERE, name))
    ref = dict(np.load(os.path.join(HERE, name, "reference.npz")))
    forward = jax.jit(lambda p, ids, mask: loaded.forward(p, ids, mask)[:2])
    for n in (12, 20):
        hidden, pooled = (np.asarray(a) for a in forward(loaded.params, ref[f"ids_{n}"], ref[f"mask_{n}"]))
        real = ref[f"mask_{n}"].astype(bool)
        np.testing.assert_allclose(hidden[real], ref[f"hidden_{n}"][real], err_msg=f"{n} tokens", **TOL)
        np.testing.assert_allclose(pooled, ref[f"pooled_{n}"], err_msg=f"{n} tokens", **TOL)

    def loss(p):
        return encoder_loss(*loaded.forward(p, ref["ids_12"], ref["mask_12"])[:2], jnp.asarray(ref["mask_12"]))
    value, grads = jax.jit(jax.value_and_grad(loss))(loaded.params)
    assert float(value) == pytest.approx(float(ref["loss_12"]), rel=1e-5)
    want = helpers.flat(jax.device_get(models.load(os.path.join(HERE, name, "grads")).params))
    got = helpers.flat(jax.device_get(grads))
    assert got.keys() == want.keys()
    # PyTorch's Embedding(padding_idx=...) holds the padding row's gradient at zero (a training convention, not
    # the function's derivative, which wa gives): that row is left out.
    pad = loaded.config.pad_token_id
    for p in [p for p in got if p.endswith("word_embeddings/embedding")]:
        assert not want[p][pad].any()
        got[p], want[p] = np.delete(got[p], pad, 0), np.delete(want[p], pad, 0)
    for p in got:
        np.testing.assert_allclose(got[p], want[p], err_msg=p, **TOL)
    for p in got:
        assert loaded.describe(p).component != "other", p


def test_dropout_draws_one_mask_per_rng_and_none_in_evaluation():
    loaded = models.load(os.path.join(HERE, "bert"))
    ref = dict(np.load(os.path.join(HERE, "bert", "reference.npz")))
    ids, mask = ref["ids_12"], ref["mask_12"]

    def run(**kw):
        return np.asarray(loaded.forward(loaded.params, ids, mask, **kw)[0])
    a, b = run(train=True, rng=jax.random.key(3)), run(train=True, rng=jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - run(train=True, rng=jax.random.key(4))).max() > 0.1
    np.testing.assert_allclose(run()[mask.astype(bool)], ref["hidden_12"][mask.astype(bool)], **TOL)
