"""wa's own Flax Llama / Mistral: its scanned, rematerialized and chunked paths against its plain one, its sliding
window and rotary frequencies (against transformers' PyTorch classes: tests/test_decoders.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from wa.models import llama


def _tiny_mistral(**kw):
    # GQA (4 query heads over 2 K/V heads); the sliding window is wider than the test sequences (windows that
    # bite: test_sliding_window_attends_to_the_last_w_positions).
    return transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      sliding_window=64, rms_norm_eps=1e-6, tie_word_embeddings=False, **kw)


def _batch(vocab, b=3, t=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0                    # a right-padded row
    return jnp.asarray(ids), jnp.asarray(mask)


def test_sliding_window_bites_only_past_w_positions():
    # Against transformers' PyTorch Mistral: tests/test_decoders.py (a window of 4 on 12 and 20 tokens). Here: a
    # window of 5 changes nothing before position 5 and everything that sees further back after it.
    config = _tiny_mistral()
    params = llama.Model(config).init_weights(jax.random.key(2), (1, 8))
    ids, mask = _batch(config.vocab_size)
    ours = np.asarray(llama.Model(_tiny_mistral_window(5))(ids, attention_mask=mask, params=params)[0])
    wide = np.asarray(llama.Model(config)(ids, attention_mask=mask, params=params)[0])
    np.testing.assert_allclose(ours[:, :5], wide[:, :5], rtol=1e-6, atol=1e-6)
    assert np.abs(wide[:, 5:] - ours[:, 5:]).min(axis=-1).max() > 0


def _tiny_mistral_window(w):
    c = _tiny_mistral()
    c.sliding_window = w
    return c


@pytest.mark.parametrize("remat", llama.REMAT)
def test_scanned_rematerialized_chunked_equals_plain(remat):
    config = _tiny_mistral()
    plain = llama.Model(config, loss_chunk=1000)
    scanned = llama.Model(config, scan=True, remat=remat, loss_chunk=5)   # 23 targets: chunks of 5, one padded
    params = plain.init_weights(jax.random.key(1), (1, 8))
    ids, mask = _batch(config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": mask}
    np.testing.assert_allclose(np.asarray(scanned(ids, attention_mask=mask, params=params)[0]),
                               np.asarray(plain(ids, attention_mask=mask, params=params)[0]), atol=1e-5)
    (s1, c1), (s2, c2) = plain.token_nll(params, batch), scanned.token_nll(params, batch)
    assert float(c1) == float(c2) == 3 * 23 - 7
    assert float(s1) == pytest.approx(float(s2), rel=1e-6)
    g1 = jax.grad(lambda p: plain.token_nll(p, batch)[0])(params)
    g2 = jax.grad(lambda p: scanned.token_nll(p, batch)[0])(params)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_rotary_base_comes_from_the_config():
    # transformers' Flax classes use base 10000 whatever rope_theta says; the frequencies must follow it.
    spec = llama.Spec.from_hf(_tiny_mistral(rope_theta=100000.0))
    d = spec.head_dim
    np.testing.assert_allclose(llama.inverse_frequencies(spec)[0], 100000.0 ** (-np.arange(0, d, 2) / d))
    # Llama-3.1's scaling: long wavelengths (beyond 8192 / 1 positions) divided by 8, short ones (below
    # 8192 / 4) kept.
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    s = llama.Spec.from_hf(cfg)
    base = 500000.0 ** (-np.arange(0, 128, 2) / 128)
    got = llama.inverse_frequencies(s)[0]
    wavelen = 2 * np.pi / base
    np.testing.assert_allclose(got[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
    np.testing.assert_allclose(got[wavelen > 8192], base[wavelen > 8192] / 8)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and np.all((got[mid] <= base[mid]) & (got[mid] >= base[mid] / 8))
