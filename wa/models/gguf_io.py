"""llama.cpp GGUF checkpoints (the ``llama`` architecture) read into wa's HF Flax Llama tree.

Everything format-specific comes from libraries: the ``gguf`` package reads the file and dequantizes every
quantization type (``gguf.quants.dequantize``), and ``transformers``' own GGUF tables map the metadata onto a
``LlamaConfig`` and convert the byte-level BPE vocabulary into a fast tokenizer. What is left here is the
layout llama.cpp chooses when it converts an HF checkpoint:

* ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj`` and ``k_proj`` (each head's two rotary halves
  interleaved, for its rope kernel); ``unpermute`` undoes that, so the weights multiply HF's rotary layout;
* tensor names (``blk.3.attn_q.weight``) map to HF Flax paths (``model/layers/3/self_attn/q_proj/kernel``),
  and a GGUF matrix is stored ``[out, in]`` like a PyTorch ``Linear``, so Flax kernels are its transpose;
* a file without ``output.weight`` ties the classifier to the embedding; FlaxLlamaForCausalLM cannot tie,
  so ``lm_head/kernel`` is the embedding transposed (as for stories260K).

Quantized weights are dequantized to float32 exactly as llama.cpp would compute with them; the per-type
counts stay with the loaded model (``Loaded.quantization``) so reports can say the weights were quantized.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np
import transformers

from wa import errors

SUFFIX = ".gguf"

# GGUF tensor name -> HF Flax path (``{i}`` the layer) and whether the Flax tensor is the stored one transposed.
_NAMES = {
    "token_embd.weight": ("model/embed_tokens/embedding", False),
    "output_norm.weight": ("model/norm/weight", False),
    "output.weight": ("lm_head/kernel", True),
    "blk.{i}.attn_norm.weight": ("model/layers/{i}/input_layernorm/weight", False),
    "blk.{i}.ffn_norm.weight": ("model/layers/{i}/post_attention_layernorm/weight", False),
    "blk.{i}.attn_q.weight": ("model/layers/{i}/self_attn/q_proj/kernel", True),
    "blk.{i}.attn_k.weight": ("model/layers/{i}/self_attn/k_proj/kernel", True),
    "blk.{i}.attn_v.weight": ("model/layers/{i}/self_attn/v_proj/kernel", True),
    "blk.{i}.attn_output.weight": ("model/layers/{i}/self_attn/o_proj/kernel", True),
    "blk.{i}.ffn_gate.weight": ("model/layers/{i}/mlp/gate_proj/kernel", True),
    "blk.{i}.ffn_up.weight": ("model/layers/{i}/mlp/up_proj/kernel", True),
    "blk.{i}.ffn_down.weight": ("model/layers/{i}/mlp/down_proj/kernel", True),
}
_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in _NAMES.items()]


class GGUFError(errors.CheckpointError):
    pass


def is_gguf(path: str) -> bool:
    return str(path).endswith(SUFFIX)


def _reader(path: str):
    from gguf import GGUFReader
    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, KeyError, struct errors on damage
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field this gguf version cannot decode is one wa does not need
            continue
    return out


class GGUFFile:
    """One GGUF file: metadata, config, tokenizer and lazily dequantized tensors."""

    def __init__(self, path: str):
        self.path = path
        self.reader = _reader(path)
        self.fields = _fields(self.reader)
        arch = self.fields.get("general.architecture")
        if arch != "llama":
            raise GGUFError(f"{path}: general.architecture is {arch!r}; wa reads the llama architecture from GGUF")
        self.tensors = {t.name: t for t in self.reader.tensors}

    # ---- metadata -------------------------------------------------------------------------------------
    def config(self) -> transformers.LlamaConfig:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
        kw = {}
        for key, name in GGUF_CONFIG_MAPPING["llama"].items():
            v = self.fields.get(f"llama.{key}")
            if name is not None and v is not None:
                kw[name] = v
        if "vocab_size" not in kw and "tokenizer.ggml.tokens" in self.fields:
            kw["vocab_size"] = len(self.fields["tokenizer.ggml.tokens"])
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            v = kw.get(key)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise GGUFError(f"{self.path}: metadata gives {key}={v!r}; expected an integer >= 1")
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = self.fields.get(f"tokenizer.ggml.{k}")
            if v is not None:
                kw[k] = int(v)
        # A file without output.weight shares the embedding as classifier; wa writes that out as its own
        # lm_head/kernel (the embedding transposed) with tie_word_embeddings=False, as for stories260K, so every
        # weight in the tree is one the forward pass uses.
        return transformers.LlamaConfig(**kw, tie_word_embeddings=False)

    def tokenizer(self) -> transformers.PreTrainedTokenizerFast:
        """The vocabulary in the file as a ``transformers`` fast tokenizer (transformers' GGUF converter)."""
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        tok, cfg = {}, {}
        for out, table in (("tokenizer", tok), ("tokenizer_config", cfg)):
            for key, name in GGUF_TOKENIZER_MAPPING[out].items():
                v = self.fields.get(f"tokenizer.{key}")
                if v is not None and name is not None:
                    table[name] = v
        if "tokens" not in tok:
            raise GGUFError(f"{self.path}: no tokenizer.ggml.tokens in the metadata; the file carries no vocabulary")
        backend, extra = convert_gguf_tokenizer("llama", tok)
        special = {}
        for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                          ("pad_token", "pad_token_id")):
            if key in tok and 0 <= int(tok[key]) < len(tok["tokens"]):
                special[role] = tok["tokens"][int(tok[key])]
        kwargs = {k: v for k, v in extra.items() if k not in special}
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special, **kwargs,
                                                    chat_template=cfg.get("chat_template"))

    def quantization(self) -> dict:
        """Tensor type -> number of tensors and of weights stored in it (e.g. Q4_1, Q8_0, F32)."""
        out: dict = collections.defaultdict(lambda: {"tensors": 0, "weights": 0})
        for t in self.reader.tensors:
            e = out[t.tensor_type.name]
            e["tensors"] += 1
            e["weights"] += int(np.prod(t.shape))
        return dict(out)

    # ---- tensors --------------------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32, in the HF (PyTorch) layout: [out, in] for matrices."""
        from gguf import GGMLQuantizationType, quants
        t = self.tensors[name]
        try:
            a = quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001 - unsupported type or damaged block
            raise GGUFError(f"{self.path}: tensor {name!r} ({t.tensor_type.name}) cannot be dequantized "
                            f"({type(e).__name__}: {e})") from e
        a = np.asarray(a, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if t.tensor_type == GGMLQuantizationType.F32:
            a = a.copy()  # the reader's arrays are views of a memory map
        q = self.fields.get("llama.attention.head_count")
        if name.endswith("attn_q.weight"):
            a = unpermute(a, q)
        elif name.endswith("attn_k.weight"):
            a = unpermute(a, q, self.fields.get("llama.attention.head_count_kv", q))
        return a

    def stored_shape(self, name: str) -> tuple:
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def mapping(self) -> tuple[dict, list]:
        """Flax path -> (GGUF tensor name, transpose), and the names that map to no parameter."""
        out, ignored = {}, []
        for name in self.tensors:
            for pattern, (path, transpose) in _PATTERNS:
                m = pattern.match(name)
                if m:
                    out[path.format(i=m.group(1)) if m.groups() else path] = (name, transpose)
                    break
            else:
                ignored.append(name)
        if "lm_head/kernel" not in out and "token_embd.weight" in self.tensors:
            out["lm_head/kernel"] = ("token_embd.weight", True)   # tied classifier
        return out, ignored


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Undoes llama.cpp's ``LlamaModel.permute`` of q/k rows: [heads, 2, d/2] interleaved back to [heads, d/2, 2]."""
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    if w.shape[0] % (2 * heads):
        raise GGUFError(f"a q/k matrix of {w.shape[0]} rows does not split into {heads} heads of rotary pairs")
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's permutation (``convert_hf_to_gguf.py``), for writing test files the way llama.cpp does."""
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def find(path: str) -> str:
    """``path`` itself if it is a .gguf file, or the one .gguf file of a directory without config.json."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(SUFFIX))
        if len(found) == 1:
            return os.path.join(path, found[0])
    return path


# What each storage type keeps of a weight (ggml's block formats), for reports.
_LEVELS = {
    "Q4_0": "16 levels per block of 32 weights, one scale per block",
    "Q4_1": "16 levels per block of 32 weights, with a per-block scale and minimum",
    "Q5_0": "32 levels per block of 32 weights, one scale per block",
    "Q5_1": "32 levels per block of 32 weights, with a per-block scale and minimum",
    "Q8_0": "256 levels per block of 32 weights, one scale per block",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32",
}


def quantization_note(quantization: dict | None) -> str:
    """One sentence for reports: which storage types held the weights, what each keeps, and what it means for
    magnitude and bit-level results ("" when nothing was quantized)."""
    if not quantization or set(quantization) <= {"F32"}:
        return ""
    kinds = "; ".join(f"{k} ({_LEVELS.get(k, 'a ggml block format')}): {v['tensors']} tensor{'s' * (v['tensors'] != 1)}"
                      f", {v['weights']:,} weights" for k, v in quantization.items())
    return ("The weights were stored quantized and are read dequantized to float32 — " + kinds + ". Magnitudes "
            "and bit patterns are those of the dequantized values (a Q4_1 block of 32 weights holds at most 16 "
            "distinct values), so magnitude rankings and bit-flip results describe the dequantized model.")
