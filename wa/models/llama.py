"""wa's own llama-like decoder: one Flax builder for Llama, Mistral, Qwen2/Qwen3, Gemma 1–3, Phi-3 and GPT-NeoX
(Pythia), each read from its HF config into one ``Spec``; scanned and rematerialized layers, and a loss that never
holds full-vocabulary logits for the whole sequence.

What the families differ in, and where it lives here (as penzai's ``llamalike_common`` holds Llama, Mistral and
Gemma in one config, with an attention type per layer):

* projections: separate q/k/v (bias on all four, on q/k/v only as Qwen2, or none), Phi-3's fused ``qkv_proj`` and
  ``gate_up_proj``, GPT-NeoX's per-head-interleaved ``query_key_value`` (``Spec.attention``, ``Spec.mlp``);
* norms: RMSNorm ``w·x̂`` (Llama), ``(1 + w)·x̂`` in float32 (Gemma), LayerNorm with bias (GPT-NeoX); per-head
  RMSNorm on queries and keys (Qwen3, Gemma-3); post-attention and post-feed-forward norms (Gemma-2/3);
* rotary: the base per layer type (Gemma-3: 10k on sliding-window layers, 1M on global ones), a partial rotary
  dimension (GPT-NeoX ``rotary_pct``, Phi-3 ``partial_rotary_factor``), and the scalings ``linear``, ``llama3``,
  ``yarn`` and ``longrope`` as transformers computes them (``modeling_rope_utils``);
* attention: grouped K/V heads, a per-layer pattern of sliding-window and global layers, the query scale
  (``query_pre_attn_scalar``), attention-logit and final-logit soft caps (Gemma-2);
* residual: sequential, or GPT-NeoX's parallel ``x + attn(ln1 x) + mlp(ln2 x)``; GeGLU with tanh-approximated GELU
  (Gemma), SwiGLU, or a plain GELU MLP (GPT-NeoX); embeddings × √d (Gemma).

Why not transformers' Flax classes: FlaxLlama builds rotary tables with base 10000 whatever ``rope_theta`` says,
takes the head size from hidden/heads, precomputes a [max_positions, max_positions] mask, has no gradient
checkpointing, most of these families have no Flax class at all, and all left transformers in 5.0.

Parameters keep the HF names and the Flax layout (``model/layers/3/mlp/down_proj/kernel``,
``gpt_neox/layers/3/attention/query_key_value/kernel``; kernels [in, out]), so checkpoints, partition rules,
scores and reports speak the user's names. With ``scan=True`` the decoder layers run under ``jax.lax.scan`` over
their parameters stacked on the fly (a layer's type — sliding or global — travels as a scanned flag), each
layer's forward wrapped in ``jax.checkpoint`` (``remat``: "none", "full", or "dots" — save matmul outputs,
recompute the rest), so the compiler sees one layer's activations, not 32. Unscanned (the default), every layer
is its own module call, which activation capture (``flax.linen.intercept_methods``: Wanda norms, super weights)
needs.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wa import errors
from wa.models import layers
from wa.models.layers import ACTIVATIONS, softcap
from wa.parallel import batch as batch_lib

REMAT = ("none", "full", "dots")
MOE_PATHS = ("dense", "grouped")
SLIDING, FULL = "sliding_attention", "full_attention"
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclasses.dataclass(frozen=True)
class Names:
    """The HF module names of a family (GPT-NeoX names its parts differently from the Llama line)."""
    backbone: str = "model"
    embed: str = "embed_tokens"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str = "qkv_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    moe: str = "block_sparse_moe"         # a sparse MoE block (Mixtral), its router and experts
    router: str = "gate"
    experts: str = "experts"
    w_gate: str = "w1"
    w_up: str = "w3"
    w_down: str = "w2"
    final_norm: str = "norm"
    head: str = "lm_head"


NEOX_NAMES = Names(backbone="gpt_neox", embed="embed_in", attn="attention", qkv="query_key_value", o="dense",
                   up="dense_h_to_4h", down="dense_4h_to_h", final_norm="final_layer_norm", head="embed_out")


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the decoder needs from an HF config (``from_hf`` reads each family's fields)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False          # bias on q, k, v and o
    qkv_bias: bool = False                # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()     # per layer SLIDING or FULL; empty: every layer FULL
    rope_scaling: tuple | None = None     # sorted (key, value) pairs of the config's rope_scaling (lists as tuples)
    rope_local_theta: float | None = None  # the rotary base of sliding-window layers where it differs (Gemma-3)
    rotary_dim: int | None = None         # rotate the first rotary_dim of each head (None: all of it)
    max_position_embeddings: int | None = None
    original_max_position_embeddings: int | None = None
    attention: str = "split"              # "split" q/k/v, "fused" [q|k|v] (Phi-3), "neox" per head [q k v]
    mlp: str = "gated"                    # "gated" act(gate)·up, "gated_fused" [gate|up] (Phi-3), "plain" (GPT-NeoX)
    activation: str = "silu"
    norm: str = "rms"                     # "rms" w·x̂, "rms_1p" (1 + w)·x̂ in float32 (Gemma), "layer" (LayerNorm)
    qk_norm: bool = False
    post_norms: bool = False              # Gemma-2/3: norms on the attention and MLP outputs too
    parallel_residual: bool = False       # GPT-NeoX
    embed_scale: bool = False             # Gemma: embeddings × √hidden_size
    query_scale: float | None = None      # None: 1/√head_dim
    attn_softcap: float | None = None
    final_softcap: float | None = None
    num_experts: int = 0                  # > 0: every layer's MLP is a sparse mixture of this many experts
    experts_per_token: int = 0
    norm_topk: bool = True                # renormalise the chosen experts' router weights to sum to 1 (Mixtral)
    names: Names = Names()

    @classmethod
    def from_hf(cls, config) -> Spec:
        model_type = getattr(config, "model_type", None)
        if model_type not in READERS:
            raise errors.CheckpointError(f"model_type {model_type!r}: wa's decoder reads "
                                         f"{', '.join(sorted(READERS))}")
        return READERS[model_type](config)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(t == SLIDING for t in self.layer_types) or (False,) * self.num_layers


def _get(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


# Fields transformers 5 keeps inside rope_parameters that are not part of the scaling itself.
_ROPE_OWN = ("rope_theta", "partial_rotary_factor")


def _rope(config, theta_fields=("rope_theta",)) -> dict:
    """The rotary settings of a config from either transformers line: 4.x keeps ``rope_theta``, ``rope_scaling``,
    ``partial_rotary_factor`` (GPT-NeoX ``rotary_pct``, ``rotary_emb_base``) and Gemma-3's ``rope_local_base_freq``
    as config fields; 5.x moves them into ``rope_parameters`` (per layer type, {full_attention: ...,
    sliding_attention: ...}, where the types differ). Returns theta, scaling (a dict or None), local_theta and
    partial."""
    params = getattr(config, "rope_parameters", None)
    if not params:   # transformers 4.x
        partial = _get(config, "partial_rotary_factor", "rotary_pct", default=1.0)
        return dict(theta=float(_get(config, *theta_fields, default=10000.0)),
                    scaling=getattr(config, "rope_scaling", None) or None,
                    local_theta=getattr(config, "rope_local_base_freq", None), partial=float(partial or 1.0))
    full, local = params, None
    if FULL in params or SLIDING in params:
        full, local = params.get(FULL, {}), params.get(SLIDING)
        if local and local.get("rope_type", "default") != "default":
            raise errors.CheckpointError(f"rope_parameters {dict(params)!r}: wa's decoder scales the rotary "
                                         "frequencies of global layers only; the sliding-window ones must be default")
    scaling = {k: v for k, v in full.items() if k not in _ROPE_OWN}
    partial = full.get("partial_rotary_factor") or _get(config, "partial_rotary_factor", "rotary_pct", default=1.0)
    return dict(theta=float(full.get("rope_theta") or _get(config, *theta_fields, default=10000.0)),
                scaling=scaling or None, local_theta=None if not local else local.get("rope_theta"),
                partial=float(partial or 1.0))


def _rope_scaling(scaling: dict | None) -> tuple | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("su",):   # Phi-3's early name for longrope, as its config class renames it
        kind = "longrope"
    if kind not in ROPE_TYPES:
        raise errors.CheckpointError(f"rope_scaling {scaling!r}: wa's decoder supports the rope types "
                                     f"{', '.join(ROPE_TYPES)}")
    if kind == "default":
        return None
    items = {**scaling, "rope_type": kind}
    items.pop("type", None)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items.items()))


def _layer_types(config, n: int, sliding_window) -> tuple[str, ...]:
    types = getattr(config, "layer_types", None)
    if types is None:
        # Mistral and Phi-3 slide every layer when the config names a window.
        return (SLIDING,) * n if sliding_window else ()
    types = tuple(types)
    if len(types) != n or not set(types) <= {SLIDING, FULL}:
        raise errors.CheckpointError(f"layer_types {list(types)!r}: expected {n} entries, each {SLIDING!r} or "
                                     f"{FULL!r}")
    if SLIDING in types and not sliding_window:
        raise errors.CheckpointError("layer_types names sliding_attention layers but sliding_window is not set")
    return types if SLIDING in types else ()


def _common(config, **kw) -> dict:
    heads = config.num_attention_heads
    hidden = config.hidden_size
    if hidden % heads and not getattr(config, "head_dim", None):
        raise errors.CheckpointError(f"num_attention_heads={heads} does not divide hidden_size={hidden}")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise errors.CheckpointError(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}")
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    rope = _rope(config)
    partial = rope["partial"]
    out = dict(vocab_size=config.vocab_size, hidden_size=hidden, intermediate_size=config.intermediate_size,
               num_layers=n, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
               rope_theta=rope["theta"],
               rms_norm_eps=float(_get(config, "rms_norm_eps", "layer_norm_eps", default=1e-6)),
               tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
               attention_bias=bool(getattr(config, "attention_bias", False)),
               mlp_bias=bool(getattr(config, "mlp_bias", False)),
               sliding_window=window, layer_types=_layer_types(config, n, window),
               rope_scaling=_rope_scaling(rope["scaling"]),
               rotary_dim=None if partial == 1.0 else int(head_dim * partial),
               max_position_embeddings=getattr(config, "max_position_embeddings", None),
               original_max_position_embeddings=getattr(config, "original_max_position_embeddings", None) or
               (rope["scaling"] or {}).get("original_max_position_embeddings"))
    out.update(kw)
    act = out.get("activation", "silu")
    if act not in ACTIVATIONS:
        raise errors.CheckpointError(f"hidden_act={act!r}: wa's decoder implements {', '.join(ACTIVATIONS)}")
    return out


def _llama(config) -> Spec:
    return Spec(**_common(config, activation=getattr(config, "hidden_act", "silu")))


def _qwen(config) -> Spec:
    # Qwen2: bias on q, k and v, none on o; Qwen3: attention_bias (off) on all four and RMSNorm on q and k heads.
    qwen3 = config.model_type == "qwen3"
    return Spec(**_common(config, activation=config.hidden_act, qkv_bias=not qwen3, qk_norm=qwen3,
                          attention_bias=qwen3 and bool(getattr(config, "attention_bias", False))))


def _gemma(config) -> Spec:
    v = config.model_type
    gemma1 = v == "gemma"
    scalar = getattr(config, "query_pre_attn_scalar", None)
    local = _rope(config)["local_theta"] if v == "gemma3_text" else None
    return Spec(**_common(
        config, activation=_get(config, "hidden_activation", "hidden_act") if not gemma1 else config.hidden_act,
        norm="rms_1p", embed_scale=True, qk_norm=v == "gemma3_text", post_norms=not gemma1,
        query_scale=None if gemma1 or scalar is None else float(scalar) ** -0.5,
        attn_softcap=None if gemma1 else getattr(config, "attn_logit_softcapping", None),
        final_softcap=None if gemma1 else getattr(config, "final_logit_softcapping", None),
        rope_local_theta=None if local is None else float(local)))


def _phi3(config) -> Spec:
    return Spec(**_common(config, activation=config.hidden_act, attention="fused", mlp="gated_fused"))


def _mixtral(config) -> Spec:
    e, k = int(config.num_local_experts), int(config.num_experts_per_tok)
    if not 0 < k <= e:
        raise errors.CheckpointError(f"num_experts_per_tok={k}: expected 1..num_local_experts ({e})")
    return Spec(**_common(config, activation=config.hidden_act, num_experts=e, experts_per_token=k))


def _gpt_neox(config) -> Spec:
    head_dim = config.hidden_size // config.num_attention_heads
    return Spec(**_common(config, activation=config.hidden_act, attention="neox", mlp="plain", norm="layer",
                          attention_bias=bool(getattr(config, "attention_bias", True)), mlp_bias=True,
                          parallel_residual=bool(config.use_parallel_residual),
                          rotary_dim=int(head_dim * _rope(config, ("rotary_emb_base", "rope_theta"))["partial"]),
                          rope_theta=_rope(config, ("rotary_emb_base", "rope_theta"))["theta"],
                          names=NEOX_NAMES))


READERS = {"llama": _llama, "mistral": _llama, "qwen2": _qwen, "qwen3": _qwen, "gemma": _gemma,
           "gemma2": _gemma, "gemma3_text": _gemma, "phi3": _phi3, "gpt_neox": _gpt_neox,
           "mixtral": _mixtral}
MODEL_TYPES = tuple(READERS)


def inverse_frequencies(spec: Spec, seq_len: int | None = None, local: bool = False) -> tuple[np.ndarray, float]:
    """RoPE's per-pair angular frequencies θ^(-2i/d) (Su et al. 2021) over the rotary dimension d, with the
    config's scaling, and the factor transformers multiplies sin and cos by (yarn, longrope). ``local``: the
    sliding-window layers' base, unscaled (Gemma-3). ``seq_len`` picks longrope's short or long factors."""
    d = spec.rotary_dim or spec.head_dim
    base = spec.rope_local_theta if local and spec.rope_local_theta else spec.rope_theta
    exponents = np.arange(0, d, 2, dtype=np.float64) / d
    inv = 1.0 / (base ** exponents)
    if not spec.rope_scaling or (local and spec.rope_local_theta):
        return inv, 1.0
    s = dict(spec.rope_scaling)
    kind = s["rope_type"]
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "llama3":
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        return np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    if kind == "yarn":
        return _yarn(spec, s, inv, d, base)
    # longrope (Phi-3): per-frequency factors, long ones past the original context.
    original = spec.original_max_position_embeddings
    factor = s.get("factor")
    if original:
        factor = spec.max_position_embeddings / original
    else:
        original = spec.max_position_embeddings
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = s["long_factor"] if seq_len and seq_len > original else s["short_factor"]
    if len(ext) != len(inv):
        raise errors.CheckpointError(f"rope_scaling: {len(ext)} longrope factors for {len(inv)} rotary frequencies")
    return inv / np.asarray(ext, np.float64), float(attention)


def _yarn(spec: Spec, s: dict, inv, d: int, base: float):
    """YaRN (Peng et al. 2023) as transformers' ``_compute_yarn_parameters``: interpolate the long wavelengths,
    keep the short ones, a linear ramp between; sin/cos scaled by the attention factor."""
    factor = s["factor"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    original = s.get("original_max_position_embeddings") or spec.max_position_embeddings

    def dim_of(rotations):
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(fast), dim_of(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return (inv / factor) * (1 - keep) + inv * keep, float(attention)


def rotary(positions, spec: Spec, local: bool = False):
    """(sin, cos) of shape [batch, seq, 1, rotary_dim] for integer ``positions`` [batch, seq], in float32."""
    inv, scale = inverse_frequencies(spec, positions.shape[-1], local)
    ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inv, jnp.float32)
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    return jnp.sin(ang) * scale, jnp.cos(ang) * scale


def _rotate(x, sin, cos):
    d = sin.shape[-1]
    x, rest = x[..., :d], x[..., d:]
    half = d // 2
    turned = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos + turned * sin
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


class Norm(nn.Module):
    """The family's norm over the last axis of size ``dim``: statistics in float32 whatever the compute dtype."""
    spec: Spec
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = self.spec
        x32 = x.astype(jnp.float32)
        if s.norm == "layer":   # LayerNorm with bias; HF Flax names its parameters scale and bias
            w = self.param("scale", nn.initializers.ones, (self.dim,))
            b = self.param("bias", nn.initializers.zeros, (self.dim,))
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            x32 = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + s.rms_norm_eps)
            return (x32 * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(self.dtype)
        x32 = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + s.rms_norm_eps)
        if s.norm == "rms_1p":   # Gemma: (1 + w) in float32, w zero-initialised
            w = self.param("weight", nn.initializers.zeros, (self.dim,))
            return (x32 * (1.0 + w.astype(jnp.float32))).astype(self.dtype)
        w = self.param("weight", nn.initializers.ones, (self.dim,))
        return w * x32.astype(self.dtype)


class Attention(nn.Module):
    spec: Spec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, sin, cos):
        s, n = self.spec, self.spec.names

        def dense(size, name, use_bias):
            return nn.Dense(size, use_bias=use_bias, dtype=self.dtype, name=name)

        b, t, _ = x.shape
        h, kv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        in_bias = s.attention_bias or s.qkv_bias
        if s.attention == "split":
            q = dense(h * hd, n.q, in_bias)(x).reshape(b, t, h, hd)
            k = dense(kv * hd, n.k, in_bias)(x).reshape(b, t, kv, hd)
            v = dense(kv * hd, n.v, in_bias)(x).reshape(b, t, kv, hd)
        elif s.attention == "fused":   # Phi-3: the output rows are all q heads, then k, then v
            qkv = dense((h + 2 * kv) * hd, n.qkv, in_bias)(x)
            q = qkv[..., :h * hd].reshape(b, t, h, hd)
            k = qkv[..., h * hd:(h + kv) * hd].reshape(b, t, kv, hd)
            v = qkv[..., (h + kv) * hd:].reshape(b, t, kv, hd)
        else:                          # GPT-NeoX: each head's [q, k, v] side by side
            qkv = dense(3 * h * hd, n.qkv, in_bias)(x).reshape(b, t, h, 3 * hd)
            q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
        if s.qk_norm:   # Qwen3, Gemma-3: RMSNorm over each head, before the rotation
            q = Norm(s, hd, self.dtype, name="q_norm")(q)
            k = Norm(s, hd, self.dtype, name="k_norm")(k)
        q = _rotate(q.astype(jnp.float32), sin, cos).astype(self.dtype)
        k = _rotate(k.astype(jnp.float32), sin, cos).astype(self.dtype)
        # Scaled by 1/√head_dim where the family asks nothing else, as wa's Llama always did.
        out = layers.attend(q, k, v, bias, self.dtype, s.query_scale, s.attn_softcap,
                            keep=lambda p: self.sow("intermediates", "attention", p))
        return dense(s.hidden_size, n.o, s.attention_bias)(out)


class MLP(nn.Module):
    """The family's MLP; ``expert``: one expert of an MoE block, Mixtral's SwiGLU ``w2(act(w1 x) · w3 x)``."""
    spec: Spec
    dtype: jnp.dtype = jnp.float32
    expert: bool = False

    @nn.compact
    def __call__(self, x):
        s, n = self.spec, self.spec.names
        act = ACTIVATIONS[s.activation]
        gate, up, down = (n.w_gate, n.w_up, n.w_down) if self.expert else (n.gate, n.up, n.down)

        def dense(size, name):
            return nn.Dense(size, use_bias=s.mlp_bias and not self.expert, dtype=self.dtype, name=name)

        if s.mlp == "plain" and not self.expert:
            inner = act(dense(s.intermediate_size, up)(x))
        elif s.mlp == "gated_fused" and not self.expert:   # Phi-3: gate rows first, then up
            gu = dense(2 * s.intermediate_size, n.gate_up)(x)
            inner = act(gu[..., :s.intermediate_size]) * gu[..., s.intermediate_size:]
        else:
            inner = act(dense(s.intermediate_size, gate)(x)) * dense(s.intermediate_size, up)(x)
        return dense(s.hidden_size, down)(inner)


def route(logits, k: int, renormalise: bool = True):
    """Mixtral's router (transformers' ``MixtralSparseMoeBlock``): softmax over the experts in float32, the ``k``
    most probable, their weights renormalised to sum to one. Returns (probabilities [..., E], weights [..., k],
    experts [..., k]); ties go to the lower expert index."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, idx = jax.lax.top_k(p, k)
    if renormalise:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return p, w, idx


class Experts(nn.Module):
    """The experts "0".."E-1" of a sparse MoE block, each its own parameters under HF's names
    (``block_sparse_moe/experts/3/w1/kernel``, [in, out]), so every per-matrix analysis reads an expert as it
    reads a dense MLP.

    Two ways to compute the same sum Σ_k w_k · expert_{i_k}(x) (``Model(moe=...)``):

    * ``grouped=False`` ("dense", the default): every expert is its own module call over every token, its input
      zeroed where the router did not pick it (an expert has no bias, so it adds exactly zero there). E/k times
      the active FLOPs, but what activation capture (Wanda's input norms, super weights) records for an expert
      is then its own routed tokens' inputs, and it runs under every transformation (``vmap``: per-window
      gradients, Hutchinson probes).
    * ``grouped=True`` ("grouped"): the (token, slot) pairs sorted by expert and multiplied with
      ``jax.lax.ragged_dot`` against the stacked kernels, the grouped matmul of MoE training on accelerators: the
      active FLOPs only. jax's ``ragged_dot`` cannot be ``vmap``-ped unless every operand carries the batch axis
      (parameters never do), and XLA's CPU backend lowers it densely, slower than the above
      (``experiments/moe_bench.py``): for one gradient or forward pass at a time, on accelerators.
    """
    spec: Spec
    dtype: jnp.dtype = jnp.float32
    grouped: bool = False

    def setup(self):
        self.each = [MLP(self.spec, self.dtype, expert=True, name=str(i)) for i in range(self.spec.num_experts)]

    def __call__(self, x, weights, experts):
        e = self.spec.num_experts
        if not self.grouped or self.is_initializing():
            comb = jnp.einsum("...k,...ke->...e", weights, jax.nn.one_hot(experts, e, dtype=jnp.float32))
            out = jnp.zeros(x.shape, jnp.float32)
            for i, expert in enumerate(self.each):
                g = comb[..., i:i + 1]
                out = out + g * expert(x * (g > 0).astype(x.dtype)).astype(jnp.float32)
            return out.astype(self.dtype)
        return self._grouped(x, weights, experts)

    def _grouped(self, x, weights, experts):
        s, n = self.spec, self.spec.names
        e, k = s.num_experts, s.experts_per_token
        p = self.variables["params"]

        def stacked(name):
            return jnp.stack([p[str(i)][name]["kernel"] for i in range(e)]).astype(self.dtype)

        xt = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        rows = order // k                              # the token of each (token, slot) pair, sorted by expert
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        xs = xt[rows]
        act = ACTIVATIONS[s.activation]
        inner = act(jax.lax.ragged_dot(xs, stacked(n.w_gate), sizes)) * jax.lax.ragged_dot(xs, stacked(n.w_up),
                                                                                          sizes)
        y = jax.lax.ragged_dot(inner, stacked(n.w_down), sizes).astype(jnp.float32)
        y = y * weights.reshape(-1)[order][:, None]
        out = jnp.zeros(xt.shape, jnp.float32).at[rows].add(y)
        return out.reshape(x.shape).astype(self.dtype)


class MoE(nn.Module):
    """Mixtral's sparse MoE block: the router (``gate``, [hidden, experts], no bias) picks ``experts_per_token``
    experts per token; the output is their weighted sum. Sows ("intermediates", "router") the router's
    probabilities [..., E] and how many of the token's slots chose each expert [..., E], which the load-balancing
    loss (``balance_loss``) and the routing counts of an analysis read."""
    spec: Spec
    dtype: jnp.dtype = jnp.float32
    grouped: bool = False

    @nn.compact
    def __call__(self, x):
        s, n = self.spec, self.spec.names
        logits = nn.Dense(s.num_experts, use_bias=False, dtype=self.dtype, name=n.router)(x)
        p, w, idx = route(logits, s.experts_per_token, s.norm_topk)
        self.sow("intermediates", "router", (p, jax.nn.one_hot(idx, s.num_experts, dtype=jnp.float32).sum(-2)))
        return Experts(s, self.dtype, self.grouped, name=n.experts)(x, w, idx)


def balance_loss(probs, chosen, mask, per_layer: bool = False):
    """The router's auxiliary load-balancing loss (Fedus et al. 2021, Switch Transformer eq. 4, with top-k as
    transformers' ``load_balancing_loss_func``): E · Σ_e f_e · P_e, f_e the (token, slot) pairs sent to expert e
    per real token (Σ_e f_e = k) and P_e its mean router probability, both over every layer and real token.
    ``probs`` and ``chosen``: [layers, batch, seq, E] (``MoE``'s sown values); ``mask`` [batch, seq]. Equals k when
    the router's probabilities are uniform, however its top-k picks fall. The layers are pooled before f and P are
    formed, as transformers does: layers that favour different experts cancel. ``per_layer``: the loss of each layer
    on its own, averaged over the layers (the Switch Transformer adds one per layer; the mean keeps k as the
    uniform value, so one coefficient means the same for either)."""
    m = mask.astype(jnp.float32)[None, :, :, None]
    axes = (1, 2) if per_layer else (0, 1, 2)
    n = jnp.maximum(jnp.sum(m) * (1 if per_layer else probs.shape[0]), 1.0)
    f = jnp.sum(chosen * m, axis=axes) / n
    pm = jnp.sum(probs * m, axis=axes) / n
    return probs.shape[-1] * jnp.mean(jnp.sum(f * pm, axis=-1))


def router_values(intermediates) -> tuple | None:
    """(probabilities, chosen) stacked [layers, batch, seq, E] from a forward pass's ("intermediates") collection,
    scanned (one stacked entry) or not (one entry per layer, in layer order); None without experts."""
    found = []

    def visit(tree, path):
        for key in sorted(tree, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
            v = tree[key]
            if key == "router":
                found.append(v[0])
            elif isinstance(v, dict):
                visit(v, path + (key,))

    visit(intermediates, ())
    if not found:
        return None
    if len(found) == 1 and found[0][0].ndim == 4:
        return found[0]
    return tuple(jnp.stack(xs) for xs in zip(*found, strict=True))


class DecoderLayer(nn.Module):
    spec: Spec
    dtype: jnp.dtype = jnp.float32
    grouped: bool = False   # MoE layers: the grouped-matmul expert path

    @nn.compact
    def __call__(self, h, bias, sin, cos):
        s = self.spec
        norm = lambda name: Norm(s, s.hidden_size, self.dtype, name=name)  # noqa: E731
        attn = Attention(s, self.dtype, name=s.names.attn)
        mlp = MoE(s, self.dtype, self.grouped, name=s.names.moe) if s.num_experts else MLP(s, self.dtype, name="mlp")
        if s.parallel_residual:   # GPT-NeoX: both branches read the same input
            return h + attn(norm("input_layernorm")(h), bias, sin, cos) + mlp(norm("post_attention_layernorm")(h))
        a = attn(norm("input_layernorm")(h), bias, sin, cos)
        if s.post_norms:   # Gemma-2/3 name the norm on the attention output post_attention_layernorm
            a = norm("post_attention_layernorm")(a)
            h = h + a
            return h + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(h)))
        h = h + a
        return h + mlp(norm("post_attention_layernorm")(h))


def _policy(remat: str):
    return {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}[remat]


def _constrain(x, sharding):
    """Hidden states stay split by batch rows: left to itself, the partitioner may follow the embedding's
    hidden-dimension sharding and hold every row's activations on every device. A batch that does not divide
    over the data axes (one prompt when sampling) is left to the partitioner."""
    if sharding is None:
        return x
    axes = sharding.spec[0] or ()
    rows = int(np.prod([sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
    return jax.lax.with_sharding_constraint(x, sharding) if x.shape[0] % rows == 0 else x


class _Stacked(nn.Module):
    """The settings every module above a decoder layer passes down."""
    spec: Spec
    dtype: jnp.dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    act_sharding: object = None
    moe: str = "dense"       # MoE layers' expert path (``Experts``): "dense" or "grouped"


class Layers(_Stacked):
    """The decoder layers, named "0".."L-1" as in HF; run one by one or scanned over their stacked parameters.
    ``ctx`` maps a layer's kind (sliding: True, global: False) to its (mask bias, sin, cos)."""

    def setup(self):
        grouped = self.moe == "grouped"
        self.blocks = [DecoderLayer(self.spec, self.dtype, grouped, name=str(i)) for i in range(self.spec.num_layers)]

    def __call__(self, h, ctx):
        sliding = self.spec.sliding_layers
        if not self.scan or self.is_initializing():
            for block, kind in zip(self.blocks, sliding, strict=True):
                h = _constrain(block(h, *ctx[kind]), self.act_sharding)
            return h
        params = self.variables["params"]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[str(i)] for i in range(self.spec.num_layers)])
        routed = bool(self.spec.num_experts)
        layer = DecoderLayer(self.spec, self.dtype, grouped=self.moe == "grouped", parent=None)
        mixed = len(set(sliding)) > 1

        def body(h, xs):
            p, kind = xs
            # A pattern of sliding and global layers scans as one body: the layer's flag picks its mask and
            # rotary tables (both precomputed once outside the scan).
            args = jax.tree.map(lambda a, b: jnp.where(kind, a, b), ctx[True], ctx[False]) if mixed \
                else ctx[sliding[0]]
            if not routed:
                return _constrain(layer.apply({"params": p}, h, *args), self.act_sharding), None
            # The router's values leave the scan as its per-layer outputs (re-sown below, stacked).
            out, state = layer.apply({"params": p}, h, *args, mutable=["intermediates"])
            return _constrain(out, self.act_sharding), state["intermediates"][self.spec.names.moe]["router"][0]

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_policy(self.remat), prevent_cse=False)
        h, router = jax.lax.scan(body, h, (stacked, jnp.asarray(sliding)))
        if router is not None:
            self.sow("intermediates", "router", router)
        return h


class Backbone(_Stacked):

    @nn.compact
    def __call__(self, ids, mask):
        s, n = self.spec, self.spec.names
        embed = nn.Embed(s.vocab_size, s.hidden_size, dtype=self.dtype, name=n.embed)
        h = embed(ids)
        if s.embed_scale:   # Gemma: × √d in the compute dtype, as HF casts its normalizer
            h = h * jnp.asarray(math.sqrt(s.hidden_size), self.dtype)
        h = _constrain(h, self.act_sharding)
        t = ids.shape[1]
        # Positions 0..t-1 whatever the mask, as HF's Flax classes do: wa's windows are padded on the right.
        pos = jnp.broadcast_to(jnp.arange(t)[None], ids.shape)
        allowed = layers.causal_allowed(mask)
        rot = rotary(pos, s)
        ctx = {False: (layers.mask_bias(allowed), *rot)}   # [batch, q, k] mask bias
        if any(s.sliding_layers):
            near = layers.window_allowed(allowed, s.sliding_window)
            local = rotary(pos, s, local=True) if s.rope_local_theta else rot
            ctx[True] = (layers.mask_bias(near), *local)
        h = Layers(s, self.dtype, self.scan, self.remat, self.act_sharding, self.moe, name="layers")(h, ctx)
        return Norm(s, s.hidden_size, self.dtype, name=n.final_norm)(h), embed


class CausalLM(_Stacked):
    """``__call__`` gives logits; ``hidden`` the final normed states, for the chunked loss."""

    @nn.compact
    def __call__(self, ids, mask, hidden_only: bool = False):
        s = self.spec
        h, embed = Backbone(s, self.dtype, self.scan, self.remat, self.act_sharding, self.moe,
                            name=s.names.backbone)(ids, mask)
        if hidden_only:
            return h
        if s.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(s.vocab_size, use_bias=False, dtype=self.dtype, name=s.names.head)(h)
        return _constrain(softcap(logits, s.final_softcap), self.act_sharding)

    def hidden(self, ids, mask):
        return self(ids, mask, hidden_only=True)


class Model(layers.Model):
    """``layers.Model`` over ``CausalLM``: the HF Flax model interface, and ``token_nll`` with the chunked loss."""

    def __init__(self, config, dtype=jnp.float32, scan: bool = False, remat: str = "none", loss_chunk: int = 512,
                 mesh=None, moe: str = "dense"):
        if remat not in REMAT:
            raise errors.ConfigError(f"remat={remat!r}: expected one of {', '.join(REMAT)}")
        if moe not in MOE_PATHS:
            raise errors.ConfigError(f"moe={moe!r}: expected one of {', '.join(MOE_PATHS)}")
        self.spec = s = Spec.from_hf(config)
        self.scan, self.remat = scan, remat
        # Scanned on a mesh, hidden states are kept split by batch rows over the data axes (wa.parallel.batch):
        # Llama-3.1-8B's gradient-step plan 12.9 -> 11.1 GiB of temporaries per device. Unscanned, the same
        # constraint makes the partitioner gather every layer's weights up front (the capture pass: 7.4 -> 30.2
        # GiB), so there the partitioner keeps its own choice.
        act = None
        if mesh is not None and scan:
            act = batch_lib.batch_sharding(mesh, 3)
        head = (s.names.backbone, s.names.embed, "embedding") if s.tie_word_embeddings else (s.names.head, "kernel")
        super().__init__(config, CausalLM(s, dtype, scan, remat, act, moe), s.names.backbone, dtype, loss_chunk, head,
                         s.tie_word_embeddings, s.final_softcap)

    @property
    def experts(self) -> int:
        return self.spec.num_experts

    def _hidden_and_router(self, params, batch):
        """(final hidden states, ``router_values`` or None, ids, mask) of one forward pass."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else mask
        h, state = self.module.apply({"params": params}, ids, mask, method="hidden", mutable=["intermediates"])
        return h, router_values(state.get("intermediates", {})), ids, mask

    def routing(self, params, batch):
        """How the router spread the real tokens of ``batch``: per layer and expert the (token, slot) pairs routed
        [L, E] and the summed router probability [L, E], and the number of real tokens."""
        _, (probs, chosen), _, mask = self._hidden_and_router(params, batch)
        m = mask.astype(jnp.float32)[None, :, :, None]
        return jnp.sum(chosen * m, axis=(1, 2)), jnp.sum(probs * m, axis=(1, 2)), jnp.sum(mask)

    def nll_and_balance(self, params, batch, per_layer: bool = False):
        """``token_nll``'s (Σ NLL, count) and the router's ``balance_loss`` over the real tokens (``per_layer``: each
        layer's, averaged), from one forward pass (the balance loss is 0.0 for a dense model)."""
        h, routed, ids, mask = self._hidden_and_router(params, batch)
        balance = jnp.zeros((), jnp.float32) if routed is None else balance_loss(*routed, mask, per_layer)
        return self.nll_of_hidden(params, h, ids, mask), balance
