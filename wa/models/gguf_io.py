"""llama.cpp GGUF checkpoints read into wa's HF Flax trees: the ``llama``, ``qwen2``, ``qwen3``, ``gemma``,
``gemma2``, ``gemma3``, ``phi3`` and ``gptneox`` architectures.

Everything format-specific comes from libraries: the ``gguf`` package reads the file, dequantizes every
quantization type (``gguf.quants.dequantize``) and names the tensors (``gguf.get_tensor_name_map``: HF name ->
``blk.3.attn_q.weight``), and ``transformers``' GGUF tables convert the vocabulary into a fast tokenizer. What is
left here is what llama.cpp's ``convert_hf_to_gguf.py`` does to a checkpoint, undone, and what its loader reads
from the metadata (``src/models/<arch>.cpp``), mapped back onto the HF config — one ``Arch`` record each:

* ``llama``: the rows of ``q_proj`` and ``k_proj`` permuted (each head's two rotary halves interleaved, for its
  rope kernel) — ``unpermute`` undoes it; Llama-3.1/3.2's rope scaling stored as ``rope_freqs.weight``, a divisor
  per rotary frequency, which is exactly ``longrope`` with equal short and long factors and attention factor 1;
* ``gemma``, ``gemma2``, ``gemma3``: every norm weight stored with the 1 of Gemma's ``(1 + w)`` added; the sliding
  window pattern is llama.cpp's (every 2nd layer global for Gemma-2, every 6th for Gemma-3, unless the file says),
  the local rope base ``rope.freq_base_swa`` (10000 when absent, llama.cpp's default), and the query scale
  1/√head_dim except for the 27B models (1/√(hidden/heads)), as llama.cpp computes it;
* ``phi3``: longrope's factors as ``rope_factors_long.weight`` / ``rope_factors_short.weight``;
* ``gptneox``: ``query_key_value``'s per-head [q, k, v] rows regrouped as all q, all k, all v.

A GGUF matrix is stored ``[out, in]`` like a PyTorch ``Linear``, so Flax kernels are its transpose. A tensor wa
does not know is an error, never skipped: a file whose meaning wa would only partly apply (as the rope factors
were once) computes a different model silently.

Quantized weights are dequantized to float32 exactly as llama.cpp would compute with them; the per-type
counts stay with the loaded model (``Loaded.quantization``) so reports can say the weights were quantized.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import re
import typing
from collections.abc import Callable

import numpy as np
import transformers

from wa import errors

SUFFIX = ".gguf"


class GGUFError(errors.CheckpointError):
    pass


def is_gguf(path: str) -> bool:
    return str(path).endswith(SUFFIX)


def open_file(path: str) -> GGUFFile:
    """``GGUFFile(path)``, read once per process while the file is unchanged: parsing the metadata of a large
    vocabulary takes seconds (Gemma-3's 262,144 pieces: 13 s), and a job reads the weights and the tokenizer."""
    st = os.stat(path)
    return _open(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> GGUFFile:
    del mtime_ns, size   # part of the key: a rewritten file is read anew
    return GGUFFile(path)


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


@dataclasses.dataclass(frozen=True)
class Arch:
    """What one llama.cpp architecture means in HF terms."""
    name: str                                  # general.architecture
    model_type: str                            # the HF config's model_type
    tokenizer: str                             # transformers' GGUF tokenizer converter
    config: Callable[[GGUFFile, dict], None] = lambda f, kw: None   # fills the family's own config fields
    permute_qk: bool = False                   # llama: q/k rows interleaved per head
    norm_shift: float = 0.0                    # Gemma: stored norm weights are w + 1
    neox_qkv: bool = False                     # gptneox: fused qkv rows regrouped by q, k, v
    consumed: tuple[str, ...] = ()             # tensors that are config, not parameters (read by ``config``)
    untie: bool = False                        # a missing output.weight becomes its own lm_head (see llama)


ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    ARCHS[arch.name] = arch
    return arch


# Metadata keys every architecture here writes (``{arch}.<key>``) and the HF config field each one is.
COMMON_KEYS = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
               "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
               "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
               "rope.freq_base": "rope_theta", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
               "attention.key_length": "head_dim"}


class Source(typing.NamedTuple):
    """Where one Flax parameter lives in a GGUF file: the tensor, whether the Flax kernel is its 2-D matrix
    transposed, and for an MoE expert, its index along the stacked tensor's first axis."""
    name: str
    transpose: bool
    expert: int | None = None


class GGUFFile:
    """One GGUF file: metadata, config, tokenizer and lazily dequantized tensors."""

    def __init__(self, path: str):
        self.path = path
        self.reader = _reader(path)
        self.fields = _fields(self.reader)
        name = self.fields.get("general.architecture")
        if name not in ARCHS:
            raise GGUFError(f"{path}: general.architecture is {name!r}; wa reads the GGUF architectures "
                            f"{', '.join(sorted(ARCHS))}")
        self.arch = ARCHS[name]
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._check_layout()

    def _check_layout(self):
        """Every tensor's bytes where the format puts them: at an offset aligned to ``general.alignment`` inside
        the data section, as many bytes as its type's blocks × its element count, inside the file, overlapping no
        other tensor. The reader trusts the offsets: one pointing into another tensor's bytes loads wrong weights
        without a word."""
        from gguf import GGML_QUANT_SIZES
        align, start, size = int(self.reader.alignment), int(self.reader.data_offset), len(self.reader.data)
        spans = []
        for t in self.reader.tensors:
            offset = int(t.data_offset) - start
            block, block_bytes = GGML_QUANT_SIZES.get(t.tensor_type, (None, None))
            n = int(t.n_elements)
            if block is None or n % block:
                raise GGUFError(f"{self.path}: tensor {t.name!r} has {n} elements, not whole blocks of its type "
                                f"{t.tensor_type.name}")
            want = n // block * block_bytes
            if offset < 0 or offset % align:
                raise GGUFError(f"{self.path}: tensor {t.name!r} starts at data offset {offset}, not a multiple of "
                                f"general.alignment={align}")
            if int(t.n_bytes) != want or int(t.data_offset) + want > size:
                raise GGUFError(f"{self.path}: tensor {t.name!r} needs {want} bytes from file offset "
                                f"{int(t.data_offset)}; the file has {size} bytes")
            spans.append((offset, offset + want, t.name))
        spans.sort()
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise GGUFError(f"{self.path}: tensors {a!r} and {b!r} overlap in the data section")

    def blocks(self) -> int:
        """The number of layers the tensors hold (``blk.<i>.``, every i from 0 present), or -1 if some are missing."""
        found = {int(m.group(1)) for name in self.tensors if (m := re.match(r"blk\.(\d+)\.", name))}
        return len(found) if found == set(range(len(found))) else -1

    def field(self, key: str, default=None):
        """The architecture's metadata value ``{arch}.{key}``."""
        return self.fields.get(f"{self.arch.name}.{key}", default)

    # ---- metadata -------------------------------------------------------------------------------------
    def config(self) -> transformers.PretrainedConfig:
        """The HF config of the model the file holds, as llama.cpp's loader reads the metadata."""
        kw = {}
        for key, name in COMMON_KEYS.items():
            v = self.field(key)
            if v is not None:
                kw[name] = v
        kw["vocab_size"] = self.field("vocab_size") or len(self.fields.get("tokenizer.ggml.tokens", ()))
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            v = kw.get(key)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v < 2**31:
                raise GGUFError(f"{self.path}: metadata gives {key}={v!r}; expected an integer in [1, 2**31 - 1]")
        # The layer count is checked against the tensors before anything loops over layers: a file of a few KB
        # whose metadata says 2**31 - 1 layers must not hang the loader.
        n = self.blocks()
        if kw["num_hidden_layers"] != n:
            held = f"tensors of {n} blocks (blk.0 ... blk.{n - 1})" if n >= 0 else "blk.<i> tensors that skip layers"
            raise GGUFError(f"{self.path}: metadata gives block_count={kw['num_hidden_layers']}, but the file holds "
                            f"{held}")
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = self.fields.get(f"tokenizer.ggml.{k}")
            if v is not None:
                kw[k] = int(v)
        scaling = self.field("rope.scaling.type")
        if scaling not in (None, "none"):
            kw["rope_scaling"] = {"rope_type": scaling, "factor": float(self.field("rope.scaling.factor", 1.0))}
            original = self.field("rope.scaling.original_context_length")
            if original:
                kw["rope_scaling"]["original_max_position_embeddings"] = int(original)
            # YaRN's own settings, as the converter writes them from the HF config.
            for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                              ("yarn_attn_factor", "attention_factor")):
                v = self.field(f"rope.scaling.{key}")
                if v is not None:
                    kw["rope_scaling"][name] = float(v)
            for key, neutral in (("yarn_ext_factor", (None, 1.0, -1.0)), ("yarn_log_multiplier", (None, 0.0))):
                if self.field(f"rope.scaling.{key}") not in neutral:
                    raise GGUFError(f"{self.path}: rope.scaling.{key}={self.field(f'rope.scaling.{key}')!r}; wa's "
                                    "YaRN follows transformers, which has no such setting")
        kw["tie_word_embeddings"] = "output.weight" not in self.tensors and not self.arch.untie
        self.arch.config(self, kw)
        return transformers.CONFIG_MAPPING[kw.pop("model_type", self.arch.model_type)](**kw)

    def sentencepiece_model(self) -> bytes | None:
        """A SentencePiece vocabulary (``tokenizer.ggml.model`` "llama": Llama-2, Gemma) as a serialized
        ``ModelProto``, None for other vocabularies.

        The pieces, scores and types are the file's; the model type is BPE and the normalization llama.cpp's
        own (spaces as ▁, a leading ▁ where ``add_space_prefix`` says, nothing else), so the pieces merge as
        llama.cpp's tokenizer merges them. transformers' GGUF converters do not do this for Gemma: they build a
        Unigram model whose scores are BPE merge ranks ("Once" -> "On", "ce"), or take minutes to rebuild merges
        for 262,144 pieces."""
        if self.fields.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.tokens" not in self.fields:
            return None
        from sentencepiece import sentencepiece_model_pb2 as pb
        tokens = self.fields["tokenizer.ggml.tokens"]
        scores = self.fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = self.fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if not len(tokens) == len(scores) == len(types):
            raise GGUFError(f"{self.path}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} types")
        m = pb.ModelProto()
        unk = int(self.fields.get("tokenizer.ggml.unknown_token_id", 0))   # llama.cpp's default
        for i, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
            kind = int(kind) if 1 <= int(kind) <= 6 else 1
            m.pieces.add(piece=piece, score=float(score), type=2 if i == unk else kind)   # SentencePiece needs one
        t = m.trainer_spec
        t.model_type = pb.TrainerSpec.BPE
        t.vocab_size = len(tokens)
        t.byte_fallback = any(int(k) == 6 for k in types)
        for role, key in (("unk", "unknown_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("pad", "padding_token_id")):
            v = self.fields.get(f"tokenizer.ggml.{key}")
            ok = v is not None and 0 <= int(v) < len(tokens)
            setattr(t, f"{role}_id", int(v) if ok else -1)
            if ok:   # SentencePiece finds its special ids by these pieces
                setattr(t, f"{role}_piece", tokens[int(v)])
        n = m.normalizer_spec
        n.name = "identity"
        n.add_dummy_prefix = bool(self.fields.get("tokenizer.ggml.add_space_prefix", True))
        n.remove_extra_whitespaces = False
        n.escape_whitespaces = True
        return m.SerializeToString()

    def tokenizer(self) -> transformers.PreTrainedTokenizerFast:
        """The vocabulary in the file as a ``transformers`` fast tokenizer (transformers' GGUF converter)."""
        try:   # transformers 5.x
            from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        except ImportError:   # 4.x
            from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        tok, cfg = {}, {}
        for out, table in (("tokenizer", tok), ("tokenizer_config", cfg)):
            for key, name in GGUF_TOKENIZER_MAPPING[out].items():
                v = self.fields.get(f"tokenizer.{key}")
                if v is not None and name is not None:
                    table[name] = v
        if "tokens" not in tok:
            raise GGUFError(f"{self.path}: no tokenizer.ggml.tokens in the metadata; the file carries no vocabulary")
        # transformers' converter for the vocabulary kind: the architecture's own for SentencePiece-style files,
        # a byte-level one for byte-level BPE (Phi-4-mini is a phi3 file with a gpt2 vocabulary)
        kind = self.fields.get("tokenizer.ggml.model")
        byte_level = self.arch.tokenizer in ("llama", "qwen2", "qwen3", "gpt2")
        backend, extra = convert_gguf_tokenizer(self.arch.tokenizer if kind != "gpt2" or byte_level else "gpt2", tok)
        special = {}
        for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                          ("pad_token", "pad_token_id")):
            if key in tok and 0 <= int(tok[key]) < len(tok["tokens"]):
                special[role] = tok["tokens"][int(tok[key])]
        kwargs = {k: v for k, v in extra.items() if k not in special}
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special, **kwargs,
                                                    chat_template=cfg.get("chat_template"))

    def licence(self) -> str:
        """The file's ``general.license``, spelled out where wa knows it ("" when the file names none)."""
        v = self.fields.get("general.license")
        return LICENCES.get(str(v).lower(), str(v)) if v else ""

    def quantization(self) -> dict:
        """Tensor type -> number of tensors and of weights stored in it (e.g. Q4_1, Q8_0, F32)."""
        out: dict = collections.defaultdict(lambda: {"tensors": 0, "weights": 0})
        for t in self.reader.tensors:
            e = out[t.tensor_type.name]
            e["tensors"] += 1
            e["weights"] += int(np.prod(t.shape))
        return dict(out)

    # ---- tensors --------------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32 as stored, in the PyTorch layout ([out, in] for matrices)."""
        from gguf import GGMLQuantizationType, quants
        t = self.tensors[name]
        try:
            a = quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001 - unsupported type or damaged block
            raise GGUFError(f"{self.path}: tensor {name!r} ({t.tensor_type.name}) cannot be dequantized "
                            f"({type(e).__name__}: {e})") from e
        a = np.asarray(a, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        return a.copy() if t.tensor_type == GGMLQuantizationType.F32 else a   # F32 arrays view a memory map

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` with llama.cpp's conversion undone: the HF (PyTorch-layout) tensor."""
        a, arch = self.raw(name), self.arch
        q = self.field("attention.head_count")
        if arch.permute_qk and name.endswith("attn_q.weight"):
            a = unpermute(a, q)
        elif arch.permute_qk and name.endswith("attn_k.weight"):
            a = unpermute(a, q, self.field("attention.head_count_kv", q))
        elif arch.neox_qkv and ".attn_qkv." in name:   # [3, heads, head_dim, ...] -> [heads, 3, head_dim, ...]
            a = a.reshape(3, q, a.shape[0] // (3 * q), *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
        elif arch.norm_shift and "norm" in name and name.endswith(".weight"):
            a = a - np.float32(arch.norm_shift)
        return a

    def stored_shape(self, name: str) -> tuple:
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def mapping(self, flax_paths) -> dict[str, Source]:
        """Flax path -> its ``Source`` in the file, for the model's parameters ``flax_paths``. A tensor of the
        file that is neither one of them nor known configuration is an error.

        An MoE layer's experts are stacked in one tensor per matrix (``blk.N.ffn_gate_exps``: [experts, out, in]
        in PyTorch order, the expert outermost); each expert's parameter reads its slice."""
        import gguf
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch.name)
        names = gguf.get_tensor_name_map(arch_id, max(self.blocks(), 0))
        out = {}
        for path in flax_paths:
            parts = path.split("/")
            leaf = "bias" if parts[-1] == "bias" else "weight"
            hf = ".".join(parts[:-1])
            expert = re.search(r"\.experts\.(\d+)\.", hf)
            if expert:   # the stacked tensor's name is the experts' HF name without the index
                hf = hf[:expert.start()] + ".experts." + hf[expert.end():]
            name = names.get_name(hf)
            if name is not None and f"{name}.{leaf}" in self.tensors:
                out[path] = Source(f"{name}.{leaf}", parts[-1] == "kernel", int(expert.group(1)) if expert else None)
        if self.arch.untie and "lm_head/kernel" in flax_paths and "lm_head/kernel" not in out:
            out["lm_head/kernel"] = Source("token_embd.weight", True)   # the tied classifier, written out
        stacks = collections.defaultdict(set)
        for src in out.values():
            if src.expert is not None:
                stacks[src.name].add(src.expert)
        for name, experts in stacks.items():
            shape = self.stored_shape(name)
            if len(shape) != 3 or set(range(shape[0])) != experts:
                raise GGUFError(f"{self.path}: {name} has shape {list(shape)}, a stack of [out, in] matrices, one "
                                f"per expert; the metadata says {self.arch.name}.expert_count={len(experts)}")
        used = {s.name for s in out.values()} | set(self.arch.consumed)
        unknown = sorted(set(self.tensors) - used)
        if unknown:
            raise GGUFError(f"{self.path}: {len(unknown)} tensors are not parameters of wa's {self.arch.model_type} "
                            f"model and not configuration it knows, e.g. {unknown[:5]}; wa does not skip tensors "
                            "whose meaning it would not apply")
        return out


def _head_dim(kw: dict) -> int:
    """The head size the config fields give: ``attention.key_length`` where written, else hidden / heads."""
    return kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]


def _rope_freqs(f: GGUFFile, kw: dict) -> None:
    """Llama-3.1/3.2: llama.cpp divides each rotary frequency by ``rope_freqs.weight`` (the llama3 scaling,
    precomputed); the same division as longrope with equal short and long factors and attention factor 1."""
    if "rope_freqs.weight" not in f.tensors:
        return
    factors = [float(x) for x in f.raw("rope_freqs.weight").ravel()]
    rot = f.field("rope.dimension_count", _head_dim(kw))
    if len(factors) != rot // 2:
        raise GGUFError(f"{f.path}: rope_freqs.weight holds {len(factors)} factors; the rotary dimension {rot} "
                        f"has {rot // 2} frequencies")
    kw["rope_scaling"] = {"rope_type": "longrope", "short_factor": factors, "long_factor": factors,
                          "attention_factor": 1.0, "factor": 1.0}


def _llama(f: GGUFFile, kw: dict) -> None:
    """llama.cpp writes Mixtral as a llama with ``expert_count`` experts, ``expert_used_count`` per token
    (``feed_forward_length``: each expert's width), routed as Mixtral's router routes."""
    _rope_freqs(f, kw)
    experts = f.field("expert_count")
    if not experts:
        return
    used = f.field("expert_used_count")
    for key, v in (("expert_count", experts), ("expert_used_count", used)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= 4096:
            raise GGUFError(f"{f.path}: metadata gives llama.{key}={v!r}; expected an integer in [1, 4096]")
    kw.update(model_type="mixtral", num_local_experts=int(experts), num_experts_per_tok=int(used))


def _gemma(f: GGUFFile, kw: dict, pattern: int, gemma3: bool) -> None:
    kw["tie_word_embeddings"] = True
    kw["hidden_activation"] = kw["hidden_act"] = "gelu_pytorch_tanh"
    n, heads = kw["num_hidden_layers"], kw["num_attention_heads"]
    if pattern:
        window = f.field("attention.sliding_window", None if gemma3 else 4096)   # llama.cpp's Gemma-2 default
        if window:
            kw["sliding_window"] = int(window)
            swa = f.field("attention.sliding_window_pattern", pattern)
            if isinstance(swa, (list, tuple)):
                sliding = [bool(x) for x in swa]
            elif int(swa) == 0:   # llama.cpp's set_swa_pattern: 0 slides every layer ...
                sliding = [True] * n
            else:                 # ... else the last layer of every group of ``swa`` is global
                sliding = [i % int(swa) < int(swa) - 1 for i in range(n)]
            if len(sliding) != n:
                raise GGUFError(f"{f.path}: sliding_window_pattern has {len(sliding)} entries for {n} layers")
            kw["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        elif gemma3:
            kw["layer_types"] = ["full_attention"] * n
        big = n == (62 if gemma3 else 46)   # the 27B models scale queries by hidden/heads
        kw["query_pre_attn_scalar"] = kw["hidden_size"] // heads if big else _head_dim(kw)
        # llama.cpp's defaults where the file is silent: Gemma-2's caps 50 and 30, none for Gemma-3.
        kw["final_logit_softcapping"] = f.field("final_logit_softcapping", None if gemma3 else 30.0)
        kw["attn_logit_softcapping"] = f.field("attn_logit_softcapping", None if gemma3 else 50.0)
    if gemma3:
        kw["rope_local_base_freq"] = float(f.field("rope.freq_base_swa", 10000.0))
    elif f.field("rope.freq_base_swa") not in (None, f.field("rope.freq_base", 10000.0)):
        raise GGUFError(f"{f.path}: rope.freq_base_swa differs from rope.freq_base; Gemma-1/2 have one rope base")


def _phi3(f: GGUFFile, kw: dict) -> None:
    rot = f.field("rope.dimension_count", _head_dim(kw))
    kw["partial_rotary_factor"] = rot / _head_dim(kw)
    window = f.field("attention.sliding_window")
    kw["sliding_window"] = int(window) if window else None
    original = f.field("rope.scaling.original_context_length")
    if "rope_factors_long.weight" in f.tensors:
        kw["rope_scaling"] = {"type": "longrope",   # Phi3Config checks "type"
                              "long_factor": [float(x) for x in f.raw("rope_factors_long.weight").ravel()],
                              "short_factor": [float(x) for x in f.raw("rope_factors_short.weight").ravel()]}
    kw["original_max_position_embeddings"] = int(original) if original else kw.get("max_position_embeddings")
    # Phi3Config takes no attention factor: it derives it from the two context lengths, as the converter did when
    # it wrote one. A file whose factor is another would compute a different model; say so.
    attn = f.field("rope.scaling.attn_factor")
    ratio = kw.get("max_position_embeddings", 1) / kw["original_max_position_embeddings"]
    derived = 1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(kw["original_max_position_embeddings"]))
    if "rope_scaling" in kw and attn is not None and abs(float(attn) - derived) > 1e-5 * derived:
        raise GGUFError(f"{f.path}: rope.scaling.attn_factor={float(attn)!r}, but Phi-3's longrope derives "
                        f"{derived!r} from its context lengths; wa cannot express the file's factor")


def _gptneox(f: GGUFFile, kw: dict) -> None:
    kw["rotary_pct"] = f.field("rope.dimension_count") / _head_dim(kw)
    kw["rotary_emb_base"] = float(kw.pop("rope_theta", 10000.0))
    kw["use_parallel_residual"] = bool(f.field("use_parallel_residual", True))
    kw["layer_norm_eps"] = float(f.field("attention.layer_norm_epsilon", 1e-5))
    kw.pop("head_dim", None)


# A file without output.weight shares the embedding as classifier. For llama files wa writes that out as its own
# lm_head/kernel (the embedding transposed) with tie_word_embeddings=False, as for stories260K, so SmolLM2's tree
# and every figure measured on it stay as they were; the other architectures tie, as their HF configs do.
register(Arch("llama", "llama", "llama", _llama, permute_qk=True, consumed=("rope_freqs.weight",), untie=True))
register(Arch("qwen2", "qwen2", "qwen2"))
register(Arch("qwen3", "qwen3", "qwen3"))
register(Arch("gemma", "gemma", "gemma2", lambda f, kw: _gemma(f, kw, 0, False), norm_shift=1.0))
register(Arch("gemma2", "gemma2", "gemma2", lambda f, kw: _gemma(f, kw, 2, False), norm_shift=1.0))
register(Arch("gemma3", "gemma3_text", "gemma3_text", lambda f, kw: _gemma(f, kw, 6, True), norm_shift=1.0))
register(Arch("phi3", "phi3", "phi3", _phi3, consumed=("rope_factors_long.weight", "rope_factors_short.weight")))
register(Arch("gptneox", "gpt_neox", "gpt2", _gptneox, neox_qkv=True))


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


# general.license values and what a report says of them.
LICENCES = {"gemma": "Gemma Terms of Use (https://ai.google.dev/gemma/terms; not an OSI licence)",
            "apache-2.0": "Apache-2.0", "mit": "MIT"}

# What each storage type keeps of a weight (ggml's block formats), for reports.
_LEVELS = {
    "Q4_0": "16 levels per block of 32 weights, one scale per block",
    "Q4_1": "16 levels per block of 32 weights, with a per-block scale and minimum",
    "Q5_0": "32 levels per block of 32 weights, one scale per block",
    "Q5_1": "32 levels per block of 32 weights, with a per-block scale and minimum",
    "Q8_0": "256 levels per block of 32 weights, one scale per block",
    "Q4_K": "16 levels per block of 32 weights, 6-bit scales and minimums per block in super-blocks of 256",
    "Q5_K": "32 levels per block of 32 weights, 6-bit scales and minimums per block in super-blocks of 256",
    "Q6_K": "64 levels per block of 16 weights, an 8-bit scale per block in super-blocks of 256",
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
            "and bit patterns are those of the dequantized values (a block holds no more distinct values than its "
            "type has levels), so magnitude rankings and bit-flip results describe the dequantized model.")
