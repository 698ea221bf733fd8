"""Per-family adapters: model types, loss on a token batch, parameter taxonomy, partition rules.

Adding a family is adding one ``register(Family(...))`` call. Taxonomy rules are ordered
``(regex, component, role)``; the named group ``layer`` gives the block index, and ``role`` the role where
the rule's own is None, and ``expert`` the expert of a mixture-of-experts block. Components
are ``embedding / attention / mlp / router / norm / head``; roles say which matrix inside
(``q, k, v, qkv, o, up, gate, down, token, position, ...``).

Kernel layouts differ: GPT-2 stores Conv1D kernels as [out, in]; every other family here
stores Dense kernels as [in, out]. Partition rules shard the ``in`` side of fan-out matrices
on ``fsdp`` and their ``out`` side on ``model`` (and the reverse for fan-in matrices), the
Megatron split; embeddings shard their hidden dimension only, since vocabularies (GPT-2's
50257) and position tables (OPT's 2050) rarely divide a mesh.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

COMPONENTS = ("embedding", "attention", "mlp", "router", "norm", "head")

FAN_OUT = P("fsdp", "model")   # [in, out] matrices that widen: q, k, v, up, gate
FAN_IN = P("model", "fsdp")    # [in, out] matrices that narrow: o, down
EMBED = P(None, ("fsdp", "model"))
VOCAB_COLUMNS = P(None, ("fsdp", "model"))   # [hidden, vocab] heads split along the vocabulary
REPLICATED = P()


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    layer: int | None
    component: str
    role: str
    expert: int | None = None   # the expert of an MoE block's matrix (component mlp), else None


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    kind: str                                   # "causal_lm" or "encoder"
    # The config.model_types the family reads (wa.models.checkpoint.build_model builds wa's own module for each).
    model_types: tuple[str, ...]
    taxonomy: tuple[tuple[str, str, str], ...]
    partition_rules: tuple[tuple[str, P], ...]
    # PyTorch state-dict entries that are buffers, not parameters (never loaded).
    pt_buffers: tuple[str, ...] = ()
    loss_doc: str = ""
    # Kernels stored [out, in] (GPT-2's Conv1D), by path; every other 2-D kernel is a Flax Dense's [in, out].
    conv1d: str = ""
    # Fused matrices: (regex, layout(config) -> role of each output unit, in order). ``parts`` reads them.
    fused: tuple[tuple[str, Callable], ...] = ()

    def parts(self, path: str, shape: tuple, config) -> tuple[int, np.ndarray] | None:
        """For a fused tensor (a kernel or its bias): the axis of its output units and the role of each unit
        (q, k, v; gate, up), so analyses can read the fused matrix as the separate ones it holds; else None."""
        for regex, layout in self.fused:
            if re.search(regex, path):
                labels = np.asarray(layout(config))
                axis = len(shape) - 1 if self.input_axis(path) == 0 or len(shape) == 1 else 0
                if labels.shape != (shape[axis],):
                    raise ValueError(f"{path}: {shape[axis]} output units, the {self.name} layout gives "
                                     f"{labels.shape[0]}")
                return axis, labels
        return None

    def input_axis(self, path: str) -> int:
        """Which axis of the linear layer's 2-D kernel at ``path`` multiplies its input: 0 for [in, out], 1 for
        [out, in]."""
        return 1 if self.conv1d and re.search(self.conv1d, path) else 0

    def forward(self, model, params, input_ids, attention_mask=None, train=False, rng=None):
        """The model's output (logits or hidden states first)."""
        return model(input_ids, attention_mask=attention_mask, params=params, train=train, dropout_rng=rng)

    def classify(self, path: str) -> ParamInfo:
        for regex, component, role in self.taxonomy:
            m = re.search(regex, path)
            if m:
                groups = m.groupdict()
                layer, expert = groups.get("layer"), groups.get("expert")
                return ParamInfo(None if layer is None else int(layer), component, role or groups["role"],
                                 None if expert is None else int(expert))
        return ParamInfo(None, "other", "other")

    def token_nll(self, model, params, batch, rng=None):
        """(sum of per-example losses, number of loss terms) on a token batch.

        Returning the sum and the count lets callers aggregate exactly over batches and
        shards: the mean is ``sum / count`` and perplexity ``exp(sum / count)``.
        """
        return LOSSES[self.kind](self, model, params, batch, rng)

    def loss(self, model, params, batch, rng=None):
        total, count = self.token_nll(model, params, batch, rng)
        return total / jnp.maximum(count, 1)


def causal_lm_nll(family, model, params, batch, rng=None):
    """Next-token cross entropy over positions where both token and target are real."""
    if hasattr(model, "token_nll"):  # wa's own models: the loss in chunks of the sequence
        return model.token_nll(params, batch)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = jnp.ones_like(ids) if mask is None else mask
    logits = family.forward(model, params, ids, mask)[0]
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


SIMCSE_TEMPERATURE = 0.05


def encoder_contrastive_nll(family, model, params, batch, rng=None):
    """Unsupervised SimCSE loss for encoders without a task head.

    Each sequence is encoded twice under independent dropout masks; the mean-pooled,
    L2-normalised embeddings of the two views must pick each other out of the batch
    (InfoNCE, temperature 0.05). Why this loss: a bare encoder has no head whose output is a
    likelihood, and bolting on an untrained one would measure the head, not the encoder.
    Sentence encoders such as all-MiniLM-L6-v2 were trained with exactly this kind of
    in-batch contrastive objective, it reaches every weight that shapes the pooled
    embedding, and a fixed ``rng`` makes it deterministic.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = jnp.ones_like(ids) if mask is None else mask
    rng = jax.random.key(0) if rng is None else rng
    r1, r2 = jax.random.split(rng)

    def embed(r):
        h = family.forward(model, params, ids, mask, train=True, rng=r)[0]
        m = mask[..., None].astype(h.dtype)
        e = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-6)

    # Fully masked rows (batch padding) are neither examples nor negatives.
    real = mask.sum(1) > 0
    sim = embed(r1) @ embed(r2).T / SIMCSE_TEMPERATURE
    sim = jnp.where(real[None, :], sim.astype(jnp.float32), -1e9)
    nll = optax.softmax_cross_entropy_with_integer_labels(sim, jnp.arange(ids.shape[0]))
    return jnp.sum(jnp.where(real, nll, 0.0)), jnp.sum(real).astype(jnp.float32)


LOSSES: dict[str, Callable] = {"causal_lm": causal_lm_nll, "encoder": encoder_contrastive_nll}

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    return sorted(FAMILIES)


def model_types() -> dict[str, Family]:
    return {t: f for f in FAMILIES.values() for t in f.model_types}


def for_model_type(model_type: str) -> Family | None:
    return model_types().get(model_type)


_NORM = (r"(ln_\d|ln_f|layer_?norm|LayerNorm|norm)/(scale|bias|weight)$", REPLICATED)


def _blocks(*parts: tuple[str, int]) -> np.ndarray:
    return np.concatenate([np.full(n, role) for role, n in parts])


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _qkv_blocks(config) -> np.ndarray:
    """Every q head, then every k head, then every v head (GPT-2's c_attn, Phi-3's qkv_proj)."""
    heads = config.num_attention_heads   # GPT2Config maps it (and hidden_size) to n_head, n_embd
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = _head_dim(config)
    return _blocks(("q", heads * d), ("k", kv * d), ("v", kv * d))


def _qkv_per_head(config) -> np.ndarray:
    """GPT-NeoX: each head's q, k and v side by side."""
    d = _head_dim(config)
    return np.tile(_blocks(("q", d), ("k", d), ("v", d)), config.num_attention_heads)


def _gate_up(config) -> np.ndarray:
    return _blocks(("gate", config.intermediate_size), ("up", config.intermediate_size))
_BIAS = (r"/bias$", REPLICATED)

register(Family(
    name="gpt2",
    kind="causal_lm",
    model_types=("gpt2",),
    taxonomy=(
        (r"wte/embedding$", "embedding", "token"),
        (r"wpe/embedding$", "embedding", "position"),
        (r"h/(?P<layer>\d+)/attn/c_attn/", "attention", "qkv"),
        (r"h/(?P<layer>\d+)/attn/c_proj/", "attention", "o"),
        (r"h/(?P<layer>\d+)/mlp/c_fc/", "mlp", "up"),
        (r"h/(?P<layer>\d+)/mlp/c_proj/", "mlp", "down"),
        (r"h/(?P<layer>\d+)/ln_1/", "norm", "attn_norm"),
        (r"h/(?P<layer>\d+)/ln_2/", "norm", "mlp_norm"),
        (r"ln_f/", "norm", "final_norm"),
        (r"^lm_head/", "head", "lm_head"),
    ),
    # Conv1D kernels are [out, in], so the specs are the transpose of FAN_OUT / FAN_IN.
    partition_rules=(
        (r"(wte|wpe)/embedding$", EMBED),
        (r"(c_attn|mlp/c_fc)/kernel$", P("model", "fsdp")),
        (r"c_proj/kernel$", P("fsdp", "model")),
        (r"lm_head/kernel$", VOCAB_COLUMNS),
        _NORM, _BIAS,
    ),
    pt_buffers=(r"(^|\.)attn\.(masked_)?bias$",),
    conv1d=r"/(c_attn|c_proj|c_fc)/kernel$",
    fused=((r"attn/c_attn/", _qkv_blocks),),
))

register(Family(
    name="gpt_neo",
    kind="causal_lm",
    model_types=("gpt_neo",),
    taxonomy=(
        (r"wte/embedding$", "embedding", "token"),
        (r"wpe/embedding$", "embedding", "position"),
        (r"h/(?P<layer>\d+)/attn/attention/q_proj/", "attention", "q"),
        (r"h/(?P<layer>\d+)/attn/attention/k_proj/", "attention", "k"),
        (r"h/(?P<layer>\d+)/attn/attention/v_proj/", "attention", "v"),
        (r"h/(?P<layer>\d+)/attn/attention/out_proj/", "attention", "o"),
        (r"h/(?P<layer>\d+)/mlp/c_fc/", "mlp", "up"),
        (r"h/(?P<layer>\d+)/mlp/c_proj/", "mlp", "down"),
        (r"h/(?P<layer>\d+)/ln_1/", "norm", "attn_norm"),
        (r"h/(?P<layer>\d+)/ln_2/", "norm", "mlp_norm"),
        (r"ln_f/", "norm", "final_norm"),
        (r"^lm_head/", "head", "lm_head"),
    ),
    partition_rules=(
        (r"(wte|wpe)/embedding$", EMBED),
        (r"(q_proj|k_proj|v_proj|c_fc)/kernel$", FAN_OUT),
        (r"(out_proj|c_proj)/kernel$", FAN_IN),
        (r"lm_head/kernel$", VOCAB_COLUMNS),
        _NORM, _BIAS,
    ),
    pt_buffers=(r"(^|\.)attn\.attention\.(masked_)?bias$",),
))

register(Family(
    name="opt",
    kind="causal_lm",
    model_types=("opt",),
    taxonomy=(
        (r"embed_tokens/embedding$", "embedding", "token"),
        (r"embed_positions/embedding$", "embedding", "position"),
        (r"project_in/", "embedding", "project_in"),
        (r"project_out/", "head", "project_out"),
        (r"layers/(?P<layer>\d+)/self_attn/q_proj/", "attention", "q"),
        (r"layers/(?P<layer>\d+)/self_attn/k_proj/", "attention", "k"),
        (r"layers/(?P<layer>\d+)/self_attn/v_proj/", "attention", "v"),
        (r"layers/(?P<layer>\d+)/self_attn/out_proj/", "attention", "o"),
        (r"layers/(?P<layer>\d+)/fc1/", "mlp", "up"),
        (r"layers/(?P<layer>\d+)/fc2/", "mlp", "down"),
        (r"layers/(?P<layer>\d+)/self_attn_layer_norm/", "norm", "attn_norm"),
        (r"layers/(?P<layer>\d+)/final_layer_norm/", "norm", "mlp_norm"),
        (r"decoder/final_layer_norm/", "norm", "final_norm"),
        (r"lm_head/", "head", "lm_head"),
    ),
    partition_rules=(
        (r"embed_(tokens|positions)/embedding$", EMBED),
        (r"(q_proj|k_proj|v_proj|fc1)/kernel$", FAN_OUT),
        (r"(out_proj|fc2)/kernel$", FAN_IN),
        (r"project_(in|out)/kernel$", REPLICATED),
        (r"lm_head/kernel$", VOCAB_COLUMNS),
        _NORM, _BIAS,
    ),
))

def _decoder_taxonomy(*, attn=r"self_attn/(?P<role>[qkvo])_proj/", mlp=r"mlp/(?P<role>gate|up|down)_proj/",
                      extra=(), post_norms=False) -> tuple:
    """A llama-like decoder's taxonomy by layer, in the HF names of the Llama line (``attn`` and ``mlp``: the
    family's projection names, their ``role`` group the role).

    ``post_norms``: Gemma-2/3, whose ``post_attention_layernorm`` normalizes the attention output and whose MLP
    input norm is ``pre_feedforward_layernorm``; elsewhere ``post_attention_layernorm`` is the MLP input norm."""
    layer = r"layers/(?P<layer>\d+)/"
    rows = [(r"model/embed_tokens/embedding$", "embedding", "token"),
            (layer + attn, "attention", None), (layer + mlp, "mlp", None), *extra,
            (layer + "input_layernorm/", "norm", "attn_norm")]
    if post_norms:
        rows += [(layer + "post_attention_layernorm/", "norm", "attn_post_norm"),
                 (layer + "pre_feedforward_layernorm/", "norm", "mlp_norm"),
                 (layer + "post_feedforward_layernorm/", "norm", "mlp_post_norm")]
    else:
        rows += [(layer + "post_attention_layernorm/", "norm", "mlp_norm")]
    rows += [(r"model/norm/", "norm", "final_norm"), (r"^lm_head/", "head", "lm_head")]
    return tuple(rows)


_QK_NORM = ((r"layers/(?P<layer>\d+)/self_attn/q_norm/", "norm", "q_norm"),
            (r"layers/(?P<layer>\d+)/self_attn/k_norm/", "norm", "k_norm"))
_DECODER_RULES = (
    (r"embed_tokens/embedding$", EMBED),
    (r"(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj)/kernel$", FAN_OUT),
    (r"(o_proj|down_proj)/kernel$", FAN_IN),
    # Split by vocabulary column: the chunked loss then gathers and reduces per chunk what a hidden-dimension
    # split made it hold whole (Llama-3.1-8B plan: 11.1 -> 8.9 GiB of temporaries per device).
    (r"lm_head/kernel$", VOCAB_COLUMNS),
    _NORM, _BIAS,
)
_ROTARY_BUFFERS = (r"rotary_emb\.inv_freq$",)

register(Family(
    name="llama",
    kind="causal_lm",
    model_types=("llama", "mistral"),
    taxonomy=_decoder_taxonomy(),
    partition_rules=_DECODER_RULES,
    pt_buffers=_ROTARY_BUFFERS,
))

# Qwen2/2.5 (bias on q, k, v) and Qwen3 (RMSNorm on each query and key head): the Llama names otherwise.
register(Family(name="qwen", kind="causal_lm", model_types=("qwen2", "qwen3"),
                taxonomy=_decoder_taxonomy(extra=_QK_NORM), partition_rules=_DECODER_RULES,
                pt_buffers=_ROTARY_BUFFERS))

# Gemma 1: the Llama names ((1 + w) norms, GeGLU and scaled embeddings are the module's, not the names').
register(Family(name="gemma", kind="causal_lm", model_types=("gemma",),
                taxonomy=_decoder_taxonomy(), partition_rules=_DECODER_RULES, pt_buffers=_ROTARY_BUFFERS))

# Gemma 2 and 3: norms before and after attention and MLP; Gemma-3 adds the per-head q/k norms.
register(Family(name="gemma2", kind="causal_lm", model_types=("gemma2", "gemma3_text"),
                taxonomy=_decoder_taxonomy(extra=_QK_NORM, post_norms=True), partition_rules=_DECODER_RULES,
                pt_buffers=_ROTARY_BUFFERS))

# Phi-3: q, k, v in one qkv_proj (rows: every q head, then k, then v) and gate, up in one gate_up_proj.
register(Family(name="phi3", kind="causal_lm", model_types=("phi3",),
                taxonomy=_decoder_taxonomy(attn=r"self_attn/(?P<role>qkv|o)_proj/",
                                           mlp=r"mlp/(?P<role>gate_up|down)_proj/"),
                partition_rules=_DECODER_RULES, pt_buffers=_ROTARY_BUFFERS,
                fused=((r"self_attn/qkv_proj/", _qkv_blocks), (r"mlp/gate_up_proj/", _gate_up))))

# Mixtral: Mistral's attention; each layer's MLP a sparse mixture of SwiGLU experts (w1 gate, w3 up, w2 down) under
# a router. Each expert's matrices are split as a dense MLP's (FSDP and tensor parallel within the expert); the
# router ([hidden, experts]: 8 columns rarely divide a mesh) is replicated.
_EXPERT = r"layers/(?P<layer>\d+)/block_sparse_moe/experts/(?P<expert>\d+)/"
register(Family(name="mixtral", kind="causal_lm", model_types=("mixtral",),
                taxonomy=_decoder_taxonomy(extra=((_EXPERT + "w1/", "mlp", "gate"), (_EXPERT + "w3/", "mlp", "up"),
                                                  (_EXPERT + "w2/", "mlp", "down"),
                                                  (r"layers/(?P<layer>\d+)/block_sparse_moe/gate/", "router",
                                                   "router"))),
                partition_rules=((r"experts/\d+/(w1|w3)/kernel$", FAN_OUT), (r"experts/\d+/w2/kernel$", FAN_IN),
                                 (r"block_sparse_moe/gate/kernel$", REPLICATED), *_DECODER_RULES),
                pt_buffers=_ROTARY_BUFFERS))

# GPT-NeoX (Pythia): its own names; query_key_value holds each head's q, k and v rows side by side.
register(Family(
    name="gpt_neox",
    kind="causal_lm",
    model_types=("gpt_neox",),
    taxonomy=(
        (r"gpt_neox/embed_in/embedding$", "embedding", "token"),
        (r"layers/(?P<layer>\d+)/attention/query_key_value/", "attention", "qkv"),
        (r"layers/(?P<layer>\d+)/attention/dense/", "attention", "o"),
        (r"layers/(?P<layer>\d+)/mlp/dense_h_to_4h/", "mlp", "up"),
        (r"layers/(?P<layer>\d+)/mlp/dense_4h_to_h/", "mlp", "down"),
        (r"layers/(?P<layer>\d+)/input_layernorm/", "norm", "attn_norm"),
        (r"layers/(?P<layer>\d+)/post_attention_layernorm/", "norm", "mlp_norm"),
        (r"gpt_neox/final_layer_norm/", "norm", "final_norm"),
        (r"^embed_out/", "head", "lm_head"),
    ),
    partition_rules=(
        (r"embed_in/embedding$", EMBED),
        (r"(query_key_value|dense_h_to_4h)/kernel$", FAN_OUT),
        (r"(attention/dense|dense_4h_to_h)/kernel$", FAN_IN),
        (r"embed_out/kernel$", VOCAB_COLUMNS),
        _NORM, _BIAS,
    ),
    pt_buffers=(r"(^|\.)attention\.(masked_)?bias$", r"rotary_emb\.inv_freq$"),
    fused=((r"attention/query_key_value/", _qkv_per_head),),
))

_BERT_TAXONOMY = (
    (r"embeddings/word_embeddings/", "embedding", "token"),
    (r"embeddings/position_embeddings/", "embedding", "position"),
    (r"embeddings/token_type_embeddings/", "embedding", "token_type"),
    (r"embeddings/LayerNorm/", "norm", "embed_norm"),
    (r"layer/(?P<layer>\d+)/attention/self/query/", "attention", "q"),
    (r"layer/(?P<layer>\d+)/attention/self/key/", "attention", "k"),
    (r"layer/(?P<layer>\d+)/attention/self/value/", "attention", "v"),
    (r"layer/(?P<layer>\d+)/attention/output/dense/", "attention", "o"),
    (r"layer/(?P<layer>\d+)/attention/output/LayerNorm/", "norm", "attn_norm"),
    (r"layer/(?P<layer>\d+)/intermediate/dense/", "mlp", "up"),
    (r"layer/(?P<layer>\d+)/output/dense/", "mlp", "down"),
    (r"layer/(?P<layer>\d+)/output/LayerNorm/", "norm", "mlp_norm"),
    (r"pooler/dense/", "head", "pooler"),
)
_BERT_RULES = (
    (r"embeddings/\w+_embeddings/embedding$", EMBED),
    (r"(query|key|value|intermediate/dense)/kernel$", FAN_OUT),
    (r"(attention/output/dense|layer/\d+/output/dense)/kernel$", FAN_IN),
    (r"pooler/dense/kernel$", REPLICATED),
    _NORM, _BIAS,
)
_ENCODER_LOSS = encoder_contrastive_nll.__doc__

register(Family(name="bert", kind="encoder", model_types=("bert",),
                taxonomy=_BERT_TAXONOMY, partition_rules=_BERT_RULES,
                pt_buffers=(r"position_ids$",), loss_doc=_ENCODER_LOSS))
register(Family(name="roberta", kind="encoder", model_types=("roberta",),
                taxonomy=_BERT_TAXONOMY, partition_rules=_BERT_RULES,
                pt_buffers=(r"position_ids$",), loss_doc=_ENCODER_LOSS))
