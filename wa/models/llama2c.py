"""Convert a llama2.c checkpoint (legacy export) to an HF ``LlamaConfig`` + Flax checkpoint.

llama2.c's legacy file is a header of seven int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, max_seq_len; a negative vocab_size means an unshared classifier)
followed by float32 arrays in a fixed order. Matrices are [out, in] (PyTorch Linear), and
q/k rows are in the interleaved rotary layout (pairs 2i, 2i+1) that HF Llama replaces with the
half-split layout (i, i + d/2); ``_permute_rotary`` maps one onto the other.

A shared classifier is written out as ``lm_head/kernel = embed_tokens.T`` with ``tie_word_embeddings=False`` (as
the Flax Llama checkpoints wa wrote before it had its own module, which always owned ``lm_head``): every loader, Flax
or PyTorch, then reads the same two tensors.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np

from wa import errors

HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")


class Llama2cError(errors.CheckpointError):
    pass


@dataclasses.dataclass(frozen=True)
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def read(path: str) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Reads a legacy llama2.c checkpoint into named [out, in] float32 arrays."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 28:
        raise Llama2cError(f"{path}: {raw.size} bytes, too short for a llama2.c header")
    h = raw[:28].view(np.int32)
    vals = dict(zip(HEADER, (int(x) for x in h), strict=True))
    shared = vals["vocab_size"] > 0
    vals["vocab_size"] = abs(vals["vocab_size"])
    if min(vals.values()) <= 0 or vals["dim"] % vals["n_heads"] or vals["n_heads"] % vals["n_kv_heads"]:
        raise Llama2cError(f"{path}: implausible header {vals}; is this a legacy llama2.c export?")
    cfg = Llama2cConfig(**vals, shared_classifier=shared)
    d, hd, L, V = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size
    kv = cfg.n_kv_heads * cfg.head_dim
    layout = [
        ("tok_embeddings", (V, d)), ("attention_norm", (L, d)),
        ("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)),
        ("ffn_norm", (L, d)), ("w1", (L, hd, d)), ("w2", (L, d, hd)), ("w3", (L, hd, d)),
        ("norm", (d,)),
        ("freq_cis_real", (cfg.max_seq_len, cfg.head_dim // 2)),
        ("freq_cis_imag", (cfg.max_seq_len, cfg.head_dim // 2)),
    ]
    if not shared:
        layout.append(("output", (V, d)))
    floats = raw[28:]
    need = 4 * sum(int(np.prod(s)) for _, s in layout)
    if floats.size != need:
        raise Llama2cError(f"{path}: {floats.size} bytes of weights after the header, the header "
                           f"{vals} implies {need}")
    floats = floats.view(np.float32)
    out, at = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        out[name] = floats[at:at + n].reshape(shape).copy()
        at += n
    if shared:
        out["output"] = out["tok_embeddings"]
    return cfg, out


def _permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved rotary rows (2i, 2i+1) of each head -> half-split rows (i, i + d/2)."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def hf_config(cfg: Llama2cConfig):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.02,
        attention_bias=False, mlp_bias=False)


def to_flax_params(cfg: Llama2cConfig, w: dict[str, np.ndarray]) -> dict:
    """The Flax Llama parameter tree (HF's names); Dense kernels are [in, out]."""
    layers = {}
    for i in range(cfg.n_layers):
        layers[str(i)] = {
            "self_attn": {
                "q_proj": {"kernel": _permute_rotary(w["wq"][i], cfg.n_heads).T},
                "k_proj": {"kernel": _permute_rotary(w["wk"][i], cfg.n_kv_heads).T},
                "v_proj": {"kernel": w["wv"][i].T},
                "o_proj": {"kernel": w["wo"][i].T},
            },
            "mlp": {
                "gate_proj": {"kernel": w["w1"][i].T},
                "up_proj": {"kernel": w["w3"][i].T},
                "down_proj": {"kernel": w["w2"][i].T},
            },
            "input_layernorm": {"weight": w["attention_norm"][i]},
            "post_attention_layernorm": {"weight": w["ffn_norm"][i]},
        }
    params = {
        "model": {"embed_tokens": {"embedding": w["tok_embeddings"]}, "layers": layers,
                  "norm": {"weight": w["norm"]}},
        "lm_head": {"kernel": w["output"].T},
    }
    import jax
    return jax.tree_util.tree_map(lambda a: np.ascontiguousarray(a, np.float32), params)


def convert(bin_path: str, tokenizer_model: str | None, out_dir: str) -> str:
    """Writes ``out_dir`` with config.json, flax_model.msgpack and the tokenizer."""
    from transformers import LlamaTokenizer

    from wa.models import llama

    cfg, w = read(bin_path)
    os.makedirs(out_dir, exist_ok=True)
    llama.Model(hf_config(cfg)).save_pretrained(out_dir, to_flax_params(cfg, w))
    if tokenizer_model:
        tok = LlamaTokenizer(vocab_file=tokenizer_model, legacy=True, add_bos_token=True,
                             add_eos_token=False)
        tok.save_pretrained(out_dir)
        shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    return out_dir
