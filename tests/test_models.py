import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.models import families

FAMILIES = [n for n in helpers.CONFIGS if n != "llama_micro"]


def _ids(vocab=96, shape=(2, 12), seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fmt", ["msgpack", "safetensors", "pt_safetensors"])
def test_load_and_forward_every_family(tmp_path, name, fmt):
    d, ref, ref_params = helpers.write_checkpoint(tmp_path, name, fmt)
    loaded = models.load(d)
    assert loaded.config.model_type == name
    got, want = helpers.flat(jax.device_get(loaded.params)), helpers.flat(ref_params)
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    ids = _ids()
    out = loaded.forward(loaded.params, ids)[0]
    expect = ref(ids, params=ref_params)[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(expect), rtol=1e-6, atol=1e-6)
    loss = loaded.loss(loaded.params, {"input_ids": jnp.asarray(ids)}, jax.random.key(1))
    assert np.isfinite(float(loss)) and float(loss) > 0


@pytest.mark.parametrize("name", ["gpt2", "llama", "opt"])
def test_causal_loss_is_next_token_cross_entropy(tmp_path, name):
    d, ref, params = helpers.write_checkpoint(tmp_path, name)
    loaded = models.load(d)
    ids = _ids(shape=(3, 10), seed=1)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding: positions 6.. neither predict nor are predicted
    total, count = loaded.token_nll(loaded.params, {"input_ids": ids, "attention_mask": mask})
    logits = np.asarray(ref(ids, attention_mask=mask, params=params)[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want, n = 0.0, 0
    for b in range(3):
        for t in range(9):
            if mask[b, t] and mask[b, t + 1]:
                want -= logp[b, t, ids[b, t + 1]]
                n += 1
    assert int(count) == n == 9 + 5 + 9
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_taxonomy_covers_every_parameter(name):
    model, params = helpers.reference(name)
    fam = families.for_model_type(name)
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") \
        else model.config.n_layer
    roles_per_layer = {}
    for p in helpers.flat(params):
        info = fam.classify(p)
        assert info.component in families.COMPONENTS, p
        if info.layer is not None:
            assert 0 <= info.layer < n_layers, p
            roles_per_layer.setdefault(info.layer, set()).add((info.component, info.role))
    assert len(roles_per_layer) == n_layers
    first = roles_per_layer[0]
    assert all(r == first for r in roles_per_layer.values())
    comps = {c for c, _ in first}
    assert {"attention", "mlp", "norm"} <= comps


def test_taxonomy_roles_llama():
    fam = families.for_model_type("llama")
    assert fam.classify("model/layers/3/self_attn/q_proj/kernel") == families.ParamInfo(3, "attention", "q")
    assert fam.classify("model/layers/0/mlp/gate_proj/kernel") == families.ParamInfo(0, "mlp", "gate")
    assert fam.classify("model/layers/12/mlp/down_proj/kernel") == families.ParamInfo(12, "mlp", "down")
    assert fam.classify("model/embed_tokens/embedding") == families.ParamInfo(None, "embedding", "token")
    assert fam.classify("lm_head/kernel") == families.ParamInfo(None, "head", "lm_head")
    assert fam.classify("model/norm/weight") == families.ParamInfo(None, "norm", "final_norm")


def test_bfloat16_load(tmp_path):
    d, _, params = helpers.write_checkpoint(tmp_path, "llama", "safetensors")
    loaded = models.load(d, dtype=jnp.bfloat16)
    leaf = loaded.params["model"]["embed_tokens"]["embedding"]
    assert leaf.dtype == jnp.bfloat16
    want = np.asarray(params["model"]["embed_tokens"]["embedding"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(leaf), want)


def test_encoder_loss_is_deterministic_given_rng(tmp_path):
    d, _, _ = helpers.write_checkpoint(tmp_path, "bert")
    loaded = models.load(d)
    batch = {"input_ids": _ids(shape=(4, 8))}
    a = loaded.loss(loaded.params, batch, jax.random.key(3))
    b = loaded.loss(loaded.params, batch, jax.random.key(3))
    c = loaded.loss(loaded.params, batch, jax.random.key(4))
    assert float(a) == float(b) and float(a) != float(c)
    # Four views can at worst be a uniform guess among four.
    assert 0 < float(a) < 2 * np.log(4)
