"""GGUF (llama.cpp) checkpoints: a tiny Llama written here with the gguf writer, the way llama.cpp converts one
(q/k rows permuted, [out, in] matrices, a quantized tensor), reads back into the same Flax tree and logits."""

import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests import helpers
from wa import models
from wa.data import tokenizers
from wa.models import gguf_io, llama

B2U = bytes_to_unicode()
# Byte-level BPE: the end-of-text token, printable ASCII but '~', and one merge ('h' 'i' -> 'hi'): 96 = vocab_size.
TOKENS = ["<|endoftext|>"] + [B2U[b] for b in range(32, 126)] + ["hi"]
QUANTIZED = "blk.0.ffn_up.weight"   # stored Q8_0 (its rows are one block of 32)


def _gguf_tensors(params: dict, tie: bool) -> dict[str, np.ndarray]:
    """HF Flax Llama params -> GGUF tensors in llama.cpp's layout ([out, in], q/k permuted)."""
    cfg = helpers.CONFIGS["llama"]()
    p = helpers.flat(params)
    out = {"token_embd.weight": p["model/embed_tokens/embedding"], "output_norm.weight": p["model/norm/weight"]}
    if not tie:
        out["output.weight"] = p["lm_head/kernel"].T
    names = {"input_layernorm/weight": "attn_norm", "post_attention_layernorm/weight": "ffn_norm",
             "self_attn/q_proj/kernel": "attn_q", "self_attn/k_proj/kernel": "attn_k",
             "self_attn/v_proj/kernel": "attn_v", "self_attn/o_proj/kernel": "attn_output",
             "mlp/gate_proj/kernel": "ffn_gate", "mlp/up_proj/kernel": "ffn_up", "mlp/down_proj/kernel": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, g in names.items():
            a = np.asarray(p[f"model/layers/{i}/{hf}"], np.float32)
            a = a.T if a.ndim == 2 else a
            if g == "attn_q":
                a = gguf_io.permute(a, cfg.num_attention_heads)
            elif g == "attn_k":
                a = gguf_io.permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
            out[f"blk.{i}.{g}.weight"] = a
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_gguf(path, params, tie=False, arch="llama", extra=None, blocks=None):
    cfg = helpers.CONFIGS["llama"]()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers if blocks is None else blocks)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(llama.Spec.from_hf(cfg).rope_theta)   # 4.x: cfg.rope_theta; 5.x: in rope_parameters
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(TOKENS) - 1))
    w.add_token_merges(["h i"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for name, a in {**_gguf_tensors(params, tie), **(extra or {})}.items():
        if name == QUANTIZED:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, params = helpers.reference("llama")
    d = tmp_path_factory.mktemp("gguf")
    return model, params, write_gguf(d / "tiny.gguf", params), write_gguf(d / "tied.gguf", params, tie=True)


def _expected(params, tie=False):
    """What the file holds: the params, with the Q8_0 tensor as llama.cpp would compute with it."""
    want = {k: np.asarray(v, np.float32) for k, v in helpers.flat(params).items()}
    up = "model/layers/0/mlp/up_proj/kernel"
    q = gguf.quants.quantize(np.ascontiguousarray(want[up].T), gguf.GGMLQuantizationType.Q8_0)
    want[up] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).T
    if tie:
        want["lm_head/kernel"] = want["model/embed_tokens/embedding"].T
    return want


def test_gguf_reads_back_the_flax_tree_and_logits(tiny):
    model, params, path, _ = tiny
    loaded = models.load(path)
    got = {k: np.asarray(v) for k, v in helpers.flat(loaded.params).items()}
    want = _expected(params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert not np.array_equal(want["model/layers/0/mlp/up_proj/kernel"],
                              np.asarray(helpers.flat(params)["model/layers/0/mlp/up_proj/kernel"]))
    # 3 + 9 per layer tensors, every one stored (the classifier too); one of them Q8_0.
    n = sum(np.size(v) for v in want.values())
    assert loaded.quantization == {"F32": {"tensors": 20, "weights": n - 32 * 64},
                                   "Q8_0": {"tensors": 1, "weights": 32 * 64}}
    ids = jnp.asarray([[3, 17, 42, 5, 88, 60, 1, 9]])
    ref = model(ids, params=jax_tree(want))[0]
    np.testing.assert_allclose(np.asarray(loaded.forward(loaded.params, ids)[0]), np.asarray(ref), atol=1e-5)
    assert loaded.config.num_key_value_heads == 2 and loaded.config.head_dim == 8


def jax_tree(flat_params):
    from flax.traverse_util import unflatten_dict
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat_params.items()})


def test_tied_classifier_is_the_embedding(tiny):
    _, params, _, tied = tiny
    loaded = models.load(tied)
    got = helpers.flat(loaded.params)
    np.testing.assert_array_equal(np.asarray(got["lm_head/kernel"]),
                                  np.asarray(helpers.flat(params)["model/embed_tokens/embedding"]).T)
    # Written out as its own head (as for stories260K), so every weight in the tree is one the model uses.
    assert not loaded.config.tie_word_embeddings and "lm_head" in loaded.params


def test_tokenizer_from_the_metadata(tiny):
    tok = tokenizers.get(tiny[2])
    ids = tok.encode("hi there")
    assert ids == [TOKENS.index("hi"), TOKENS.index(B2U[32]), *(TOKENS.index(c) for c in "there")]
    assert tok.decode(ids) == "hi there" and tok.vocab_size == 96 and tok.bos_id == 0


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    for heads, kv in ((4, None), (4, 2)):
        np.testing.assert_array_equal(gguf_io.unpermute(gguf_io.permute(w, heads, kv), heads, kv), w)
    # One head of dimension 4 (rotary pairs (0, 2), (1, 3) in HF's half-split layout) interleaved by llama.cpp.
    assert gguf_io.permute(np.arange(4.0)[:, None], 1)[:, 0].tolist() == [0, 2, 1, 3]


def test_other_architectures_and_damaged_files_are_one_error(tiny, tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", tiny[1], arch="gpt2")
    with pytest.raises(models.CheckpointError, match=r"gpt2.gguf: general.architecture is 'gpt2'; wa reads the "
                                                     r"GGUF architectures gemma, gemma2, gemma3, gptneox, llama, phi3, "
                                                     r"qwen2, qwen3$"):
        models.load(path)
    data = open(tiny[2], "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(models.CheckpointError, match=r"cut.gguf: not a readable GGUF file"):
        models.load(str(cut))
    os.symlink("/dev/zero", tmp_path / "zero.gguf")
    with pytest.raises(models.CheckpointError, match=r"zero.gguf: resolves to /dev/zero"):
        models.load(str(tmp_path / "zero.gguf"))


def test_smollm2_logits_on_a_few_tokens():
    # Written down once (2026-11-22, jax 0.10.2 on CPU, float32) from models.load(paths.checkpoint("smollm2")) and
    # one forward pass over "Once upon a time": per position the 3 largest logits and the mean logit. Those
    # values come from wa's own reader and model; what makes them trustworthy is the round trip above (the
    # reader on a file written the way llama.cpp writes one), wa's Llama against transformers' PyTorch one
    # (tests/test_decoders.py) with the rotary base SmolLM2 asks for (100000; HF's Flax class always used 10000,
    # which gave the same first position and different later ones: 15.7169 / 16.518 / 18.6744 top logits), and
    # the model's behaviour: " time" is the top choice after "Once upon a", "," after "Once upon a time".
    # This test pins them so any change to the reader, the dequantization or the model shows.
    from wa.data import paths
    p = paths.checkpoint("smollm2")
    loaded = models.load(p)
    ids = tokenizers.get(p).encode("Once upon a time")
    assert ids == [6403, 1980, 253, 655]
    logits = np.asarray(loaded.forward(loaded.params, jnp.asarray([ids]))[0][0])
    want = [([29, 28, 198], [28.65, 27.0104, 26.2897], 13.4864),
            ([260, 253, 9245], [15.9163, 15.3226, 13.9114], 0.76089),
            ([655, 10528, 3163], [15.9884, 15.4211, 15.397], 0.38476),
            ([28, 281, 665], [18.142, 14.0825, 13.3673], -0.91585)]
    for t, (top, vals, mean) in enumerate(want):
        assert np.argsort(-logits[t])[:3].tolist() == top
        np.testing.assert_allclose(logits[t, top], vals, atol=2e-3)
        assert abs(float(logits[t].mean()) - mean) < 2e-3
    assert loaded.quantization["Q4_1"]["tensors"] == 210 and loaded.quantization["Q8_0"]["tensors"] == 1


def test_a_tensor_wa_does_not_know_is_an_error_not_skipped(tiny, tmp_path):
    # Skipping what it cannot place is how Llama-3.1 files once ran with unscaled rotary frequencies.
    path = write_gguf(tmp_path / "extra.gguf", tiny[1], extra={"blk.0.attn_sinks.weight": np.ones(4, np.float32)})
    with pytest.raises(models.CheckpointError, match=r"extra.gguf: 1 tensors are not parameters of wa's llama "
                                                     r"model and not configuration it knows, "
                                                     r"e.g. \['blk.0.attn_sinks.weight'\]"):
        models.load(path)


def test_a_layer_count_the_tensors_do_not_hold_is_refused_at_once(tiny, tmp_path):
    # 2**31 - 1 layers in the metadata of a file of a few KB: checked against the blk.<i> tensors before any loop.
    path = write_gguf(tmp_path / "huge.gguf", tiny[1], blocks=2**31 - 1)
    with pytest.raises(models.CheckpointError, match=r"huge.gguf: metadata gives block_count=2147483647, but the "
                                                     r"file holds tensors of 2 blocks \(blk.0 ... blk.1\)$"):
        models.load(path)


def test_a_tensor_at_an_unaligned_offset_is_refused(tiny, tmp_path):
    # The reader trusts the tensor infos: an offset moved to 3 points into another tensor's bytes.
    import shutil

    from gguf import GGUFReader
    path = tmp_path / "unaligned.gguf"
    shutil.copy(tiny[2], path)
    r = GGUFReader(str(path), "r+")
    r.tensors[1].field.parts[-1][0] = 3
    r.data.flush()
    name = r.tensors[1].name
    del r
    with pytest.raises(models.CheckpointError, match=rf"unaligned.gguf: tensor '{name}' starts at data offset 3, "
                                                     r"not a multiple of general.alignment=32$"):
        models.load(str(path))
