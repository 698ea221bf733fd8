"""Every decoder family wa builds (its llama-like decoder, GPT-2, GPT-Neo, OPT) against transformers' own PyTorch
class: logits, loss and gradient, scanned and unscanned where the module scans, from the safetensors checkpoint and
from llama.cpp's GGUF conversion of it where wa reads the family from GGUF.

The fixtures (tests/fixtures/decoders/, written by ``make_decoder_fixtures.py`` with torch and llama.cpp's
``convert_hf_to_gguf.py``) hold each tiny model, its reference outputs and its gradient; torch is not needed here.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.models import gpt, layers, llama

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "decoders")
NAMES = sorted(os.listdir(HERE))
GGUF = [n for n in NAMES if os.path.exists(os.path.join(HERE, n, "model.gguf"))]
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _load(name, fmt="safetensors"):
    return models.load(os.path.join(HERE, name, "model.gguf") if fmt == "gguf" else os.path.join(HERE, name))


def _ref(name):
    return dict(np.load(os.path.join(HERE, name, "reference.npz")))


def _check_logits(loaded, ref):
    # Jitted: one compile of the whole model is 2-3x faster here than dispatching its operations one by one.
    forward = jax.jit(lambda p, ids, mask: loaded.model(ids, attention_mask=mask, params=p)[0])
    for n in (12, 20):
        ids, mask = jnp.asarray(ref[f"ids_{n}"]), jnp.asarray(ref[f"mask_{n}"])
        got = np.asarray(forward(loaded.params, ids, mask))
        real = ref[f"mask_{n}"].astype(bool)
        np.testing.assert_allclose(got[real], ref[f"logits_{n}"][real], err_msg=f"{n} tokens", **TOL)


def test_every_family_has_a_fixture():
    import json
    types = {json.load(open(os.path.join(HERE, n, "config.json")))["model_type"] for n in NAMES}
    assert types == set(llama.MODEL_TYPES) | set(gpt.MODEL_TYPES)
    assert set(GGUF) == set(llama.MODEL_TYPES) - {"mistral"}


@pytest.mark.parametrize("name", NAMES)
def test_logits_loss_and_gradient_equal_transformers(name):
    loaded, ref = _load(name), _ref(name)
    assert isinstance(loaded.model, layers.Model)
    want_grads = helpers.flat(jax.device_get(_load_grads(name)))
    batch = {"input_ids": jnp.asarray(ref["ids_12"]), "attention_mask": jnp.asarray(ref["mask_12"])}
    _check_logits(loaded, ref)
    # With the loss in chunks of 5 (11 targets: a padded chunk), and scanned and rematerialized where the module
    # scans (the llama-like decoder), the same loss and gradient: they pass through every layer, so the logits need
    # no second check.
    # An MoE model's scanned copy takes the grouped-matmul expert path.
    chunked = models.build_model(loaded.config, scan=True, remat="full", loss_chunk=5,
                                 moe="grouped" if name == "mixtral" else "dense")[0]
    for model in (loaded.model, chunked):
        loss, grads = jax.jit(jax.value_and_grad(lambda p: loaded.family.loss(model, p, batch)))(loaded.params)
        assert float(loss) == pytest.approx(float(ref["loss_12"]), rel=1e-6)
        got = helpers.flat(jax.device_get(grads))
        assert got.keys() == want_grads.keys()
        for p in got:
            np.testing.assert_allclose(got[p], want_grads[p], err_msg=p, **TOL)


def _load_grads(name):
    """The reference gradient, stored under PyTorch names, read by wa's loader into the Flax tree."""
    return models.load(os.path.join(HERE, name, "grads")).params


@pytest.mark.parametrize("name", GGUF)
def test_gguf_from_llama_cpp_gives_the_same_model(name):
    from_gguf, ref = _load(name, "gguf"), _ref(name)
    _check_logits(from_gguf, ref)
    if name != "llama":   # llama GGUFs keep wa's untied head (the embedding written out as lm_head)
        want = helpers.flat(jax.device_get(_load(name).params))
        got = helpers.flat(jax.device_get(from_gguf.params))
        assert got.keys() == want.keys()
        for p in want:
            np.testing.assert_allclose(got[p], want[p], err_msg=p, rtol=1e-6, atol=1e-7)


def test_mixtral_router_balance_loss_equals_transformers():
    # transformers' load_balancing_loss_func over the real tokens (the padded row's tail left out), scanned (the
    # grouped-matmul experts, the router's values leaving the scan as its outputs) and not; a dense model's is 0.
    loaded, ref = _load("mixtral"), _ref("mixtral")
    scanned = models.build_model(loaded.config, scan=True, remat="full", moe="grouped")[0]
    for model in (loaded.model, scanned):
        for n in (12, 20):
            batch = {"input_ids": jnp.asarray(ref[f"ids_{n}"]), "attention_mask": jnp.asarray(ref[f"mask_{n}"])}
            (nll, count), balance = jax.jit(model.nll_and_balance)(loaded.params, batch)
            assert float(balance) == pytest.approx(float(ref[f"aux_{n}"]), rel=1e-6)
            assert float(nll / count) == pytest.approx(float(ref[f"loss_{n}"]), rel=1e-6)
    dense = _load("llama")
    batch = {"input_ids": jnp.asarray(ref["ids_12"]), "attention_mask": jnp.asarray(ref["mask_12"])}
    assert float(dense.model.nll_and_balance(dense.params, batch)[1]) == 0.0
    # Per layer: each layer's E · Σ_e f_e · P_e from its own routing counts and probabilities, averaged.
    pairs, probs, tokens = (np.asarray(x, np.float64) for x in loaded.model.routing(loaded.params, batch))
    want = np.mean(4 * np.sum((pairs / tokens) * (probs / tokens), axis=1))
    got = float(loaded.model.nll_and_balance(loaded.params, batch, per_layer=True)[1])
    assert got == pytest.approx(want, rel=1e-5)


def test_mixtral_experts_are_named_in_the_taxonomy_and_split_like_a_dense_mlp():
    from jax.sharding import PartitionSpec as P

    from wa.models import families
    from wa.parallel import rules
    m = _load("mixtral")
    layer = "model/layers/1/block_sparse_moe/"
    assert m.describe(layer + "experts/3/w1/kernel") == families.ParamInfo(1, "mlp", "gate", 3)
    assert m.describe(layer + "experts/0/w3/kernel") == families.ParamInfo(1, "mlp", "up", 0)
    assert m.describe(layer + "experts/2/w2/kernel") == families.ParamInfo(1, "mlp", "down", 2)
    assert m.describe(layer + "gate/kernel") == families.ParamInfo(1, "router", "router")
    assert m.describe("model/layers/1/self_attn/q_proj/kernel").expert is None
    specs = {p: rules.match(m.family.partition_rules, p)[2] for p in
             (layer + "experts/3/w1/kernel", layer + "experts/3/w2/kernel", layer + "gate/kernel")}
    assert list(specs.values()) == [P("fsdp", "model"), P("model", "fsdp"), P()]


def test_a_gguf_whose_expert_count_disagrees_with_its_stacks_is_refused():
    from wa.models import gguf_io
    f = gguf_io.GGUFFile(os.path.join(HERE, "mixtral", "model.gguf"))
    assert (f.config().num_local_experts, f.config().num_experts_per_tok) == (4, 2)
    f.fields["llama.expert_count"] = 3
    model = models.build_model(f.config())[0]
    paths = helpers.flat(model.params_shape_tree)
    with pytest.raises(gguf_io.GGUFError, match=r"blk\.0\.ffn_gate_exps\.weight has shape \[4, 64, 32\], a "
                       r"stack of \[out, in\] matrices, one per expert; the metadata says llama.expert_count=3$"):
        f.mapping(paths)


SENTENCE = "To be, or not to be: that is the question. Whether 'tis nobler in the mind to suffer"


@pytest.mark.parametrize("name", [n for n in GGUF if n != "gpt_neox"])
def test_sentencepiece_vocabulary_read_back_from_gguf(name):
    from wa.data import tokenizers
    tok = tokenizers.get(os.path.join(HERE, name, "model.gguf"))
    want = np.load(os.path.join(HERE, name, "spm_ids.npy")).tolist()
    assert isinstance(tok, tokenizers.SentencePiece)
    assert tok.encode(SENTENCE) == want and tok.decode(want) == SENTENCE
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 128)


def test_a_vocabulary_read_from_gguf_saves_as_a_tokenizer_model(tmp_path):
    # launch.train_lm puts the tokenizer beside the weights it writes; one rebuilt from GGUF has no file to copy.
    from wa.data import tokenizers
    from wa.train import lm
    tok = tokenizers.get(os.path.join(HERE, "gemma3_text", "model.gguf"))
    lm.save_tokenizer(tok, "gemma3", str(tmp_path))
    again = tokenizers.get(str(tmp_path))
    assert isinstance(again, tokenizers.SentencePiece) and again.path == str(tmp_path / "tokenizer.model")
    assert again.encode(SENTENCE) == tok.encode(SENTENCE) == np.load(os.path.join(HERE, "gemma3_text",
                                                                                   "spm_ids.npy")).tolist()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_has_a_layer_component_and_role(name):
    from wa.models import summary
    loaded = _load(name)
    n = loaded.config.num_hidden_layers
    for p in helpers.flat(loaded.params):
        info = loaded.describe(p)
        assert info.component != "other", p
        assert (info.layer is not None) == bool(re.search(r"/(layers|h)/\d+/", p)), p
        assert info.layer is None or 0 <= info.layer < n
    rows = summary.param_rows(loaded)   # what launch.inspect prints
    assert sum(r["numel"] for r in rows) == sum(np.size(v) for v in helpers.flat(loaded.params).values())


@pytest.mark.parametrize("scaling,message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling .*'dynamic'.*: wa's decoder supports the rope types "
                                              "default, linear, llama3, yarn, longrope"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0], "long_factor": [1.0]},
     "rope_scaling: 1 longrope factors for 4 rotary frequencies"),
])
def test_rope_scalings_wa_cannot_compute_are_one_error(scaling, message):
    import transformers
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                      intermediate_size=8, vocab_size=16)
    config.rope_scaling = scaling
    with pytest.raises(models.CheckpointError, match=message):
        llama.inverse_frequencies(llama.Spec.from_hf(config))


def test_fused_matrices_split_into_the_roles_the_module_computes():
    phi3 = _load("phi3")   # 4 q heads and 2 kv heads of 8; intermediate 64
    axis, roles = phi3.parts("model/layers/0/self_attn/qkv_proj/kernel", (32, 64))
    assert axis == 1 and roles.tolist() == ["q"] * 32 + ["k"] * 16 + ["v"] * 16
    axis, roles = phi3.parts("model/layers/0/mlp/gate_up_proj/kernel", (32, 128))
    assert axis == 1 and roles.tolist() == ["gate"] * 64 + ["up"] * 64
    assert phi3.parts("model/layers/0/self_attn/o_proj/kernel", (32, 32)) is None
    neox = _load("gpt_neox")  # 4 heads of 8, each head's q, k, v side by side
    axis, roles = neox.parts("gpt_neox/layers/1/attention/query_key_value/bias", (96,))
    assert axis == 0 and roles.tolist() == (["q"] * 8 + ["k"] * 8 + ["v"] * 8) * 4


@pytest.mark.slow   # 268M weights dequantized from Q4_K_M and a 262,144-piece vocabulary: about 30 s
def test_gemma3_270m_logits_on_a_few_tokens():
    # Written down once (2026-12-06, jax 0.10.2 on CPU, float32) from models.load(paths.checkpoint("gemma3")) and
    # one forward pass over BOS + "Once upon a time": per position the 3 largest logits and the mean logit. What
    # makes them trustworthy is the fixtures above (every Gemma-3 convention against transformers and llama.cpp's
    # converter) and the model's behaviour: " a" after "Once upon", " time" after "a", "," after "time". This test
    # pins them so any change to the reader, the dequantization (Q4_K, Q5_0, Q6_K, Q8_0) or the model shows.
    from wa.data import paths, tokenizers
    p = paths.checkpoint("gemma3")
    loaded = models.load(p)
    tok = tokenizers.get(p)
    ids = [tok.bos_id] + tok.encode("Once upon a time")
    assert ids == [2, 14946, 3324, 496, 990]
    logits = np.asarray(loaded.forward(loaded.params, jnp.asarray([ids]))[0][0])
    want = [([184, 198, 255999], [14.5218, 14.3658, 14.2035], -4.26185),
            ([611, 506, 1570], [22.9896, 22.3318, 22.2903], 0.07477),
            ([496, 990, 506], [23.8409, 19.0226, 18.3041], -2.41603),
            ([990, 38735, 107], [23.5047, 17.8349, 16.8846], -2.64355),
            ([236764, 528, 993], [22.9009, 21.1926, 20.6977], -2.79304)]
    for t, (top, vals, mean) in enumerate(want):
        assert np.argsort(-logits[t])[:3].tolist() == top
        np.testing.assert_allclose(logits[t, top], vals, atol=2e-3)
        assert abs(float(logits[t].mean()) - mean) < 2e-3
    assert {k: v["tensors"] for k, v in loaded.quantization.items()} == {"F32": 109, "Q8_0": 10, "Q5_0": 81,
                                                                          "Q4_K": 27, "Q6_K": 9}
    assert loaded.config.layer_types[5] == loaded.config.layer_types[17] == "full_attention"
    assert loaded.config.layer_types.count("sliding_attention") == 15 and loaded.config.sliding_window == 512
    assert "Gemma Terms of Use" in loaded.licence


def _fields(**kw):
    import types
    base = dict(model_type="gemma3_text", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, hidden_activation="gelu",
                sliding_window=4, query_pre_attn_scalar=8, max_position_embeddings=64,
                layer_types=["sliding_attention"] * 5 + ["full_attention"])
    return types.SimpleNamespace(**base, **kw)


def test_rope_settings_read_alike_from_both_transformers_lines():
    # transformers 4.x keeps rope_theta, rope_scaling, rope_local_base_freq, partial_rotary_factor as config fields;
    # 5.x moves them into rope_parameters, per layer type where the types differ. Both give one Spec.
    v4 = _fields(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    v5 = _fields(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                  "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    a, b = llama.Spec.from_hf(v4), llama.Spec.from_hf(v5)
    assert a == b and (a.rope_theta, a.rope_local_theta, a.rope_scaling) == (
        1e6, 1e4, (("factor", 8.0), ("rope_type", "linear")))
    neox4 = dict(model_type="gpt_neox", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, hidden_act="gelu", use_parallel_residual=True,
                 layer_norm_eps=1e-5)
    import types
    a = llama.Spec.from_hf(types.SimpleNamespace(**neox4, rotary_pct=0.25, rotary_emb_base=500.0))
    b = llama.Spec.from_hf(types.SimpleNamespace(**neox4, rope_parameters={
        "rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}))
    assert a == b and (a.rotary_dim, a.rope_theta) == (2, 500.0)
    phi4 = dict(model_type="phi3", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, hidden_act="silu", rms_norm_eps=1e-5)
    long = {"long_factor": [1.0, 2.0, 4.0, 8.0], "short_factor": [1.0, 1.1, 1.3, 1.7]}
    a = llama.Spec.from_hf(types.SimpleNamespace(**phi4, rope_theta=1e4, original_max_position_embeddings=16,
                                                 rope_scaling={"type": "longrope", **long}))
    b = llama.Spec.from_hf(types.SimpleNamespace(**phi4, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 16, **long}))
    (inv_a, fa), (inv_b, fb) = llama.inverse_frequencies(a, 20), llama.inverse_frequencies(b, 20)
    np.testing.assert_array_equal(inv_a, inv_b)
    assert fa == fb and a.original_max_position_embeddings == b.original_max_position_embeddings == 16


def test_routing_counts_agree_scanned_and_not():
    # Each real token sends experts_per_token (token, slot) pairs through each layer; the grouped (here scanned)
    # and per-expert (unscanned) paths route alike.
    loaded, ref = _load("mixtral"), _ref("mixtral")
    batch = {"input_ids": jnp.asarray(ref["ids_12"]), "attention_mask": jnp.asarray(ref["mask_12"])}
    pairs, probs, tokens = jax.jit(loaded.model.routing)(loaded.params, batch)
    scanned = models.build_model(loaded.config, scan=True, moe="grouped")[0]
    again = jax.jit(scanned.routing)(loaded.params, batch)
    assert int(tokens) == int(ref["mask_12"].sum()) == 21
    assert np.asarray(pairs).sum(axis=1).tolist() == [42.0, 42.0]
    np.testing.assert_allclose(np.asarray(probs).sum(axis=1), [21.0, 21.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(pairs))
    np.testing.assert_allclose(np.asarray(again[1]), np.asarray(probs), rtol=1e-6)
