"""wa's own Flax Llama / Mistral: the HF parameter tree, the rotary base the checkpoint asks for, scanned and
rematerialized layers, and a loss that never holds full-vocabulary logits for the whole sequence.

Why not transformers' FlaxLlamaForCausalLM: it builds rotary tables with base 10000 whatever ``rope_theta``
says (SmolLM2 uses 100000, Llama-3.1 500000 with its own frequency scaling), takes the head size from
hidden/heads (ignoring ``head_dim``), precomputes a [max_positions, max_positions] mask, has no gradient
checkpointing, and left transformers in 5.0.

Parameters keep the HF Flax names and layout (``model/layers/3/mlp/down_proj/kernel``, kernels [in, out]), so
checkpoints, partition rules, scores and reports see the same tree. With ``scan=True`` the decoder layers run
under ``jax.lax.scan`` over their parameters stacked on the fly, each layer's forward wrapped in
``jax.checkpoint`` (``remat``: "none", "full", or "dots" — save matmul outputs, recompute the rest), so the
compiler sees one layer's activations, not 32. Unscanned (the default), every layer is its own module call,
which activation capture (``flax.linen.intercept_methods``: Wanda norms, super weights) needs.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util

from wa import errors
from wa.parallel import batch as batch_lib

REMAT = ("none", "full", "dots")
MODEL_TYPES = ("llama", "mistral")


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the module needs from an HF Llama / Mistral config."""
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
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    rope_scaling: tuple | None = None   # sorted (key, value) pairs of the config's rope_scaling

    @classmethod
    def from_hf(cls, config) -> Spec:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        scaling = getattr(config, "rope_scaling", None)
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise errors.CheckpointError(f"rope_scaling {scaling!r}: wa's Llama supports the llama3 scaling "
                                             "(Llama-3.1) and none")
            scaling = None if kind == "default" else tuple(sorted(scaling.items()))
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise errors.CheckpointError(f"hidden_act={act!r}: wa's Llama implements silu (SwiGLU) only")
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, rope_theta=float(getattr(config, "rope_theta", 10000.0)),
                   rms_norm_eps=float(config.rms_norm_eps), tie_word_embeddings=bool(config.tie_word_embeddings),
                   attention_bias=bool(getattr(config, "attention_bias", False)),
                   mlp_bias=bool(getattr(config, "mlp_bias", False)),
                   sliding_window=getattr(config, "sliding_window", None), rope_scaling=scaling)


def inverse_frequencies(spec: Spec) -> np.ndarray:
    """RoPE's per-pair angular frequencies θ^(-2i/d) (Su et al. 2021), with Llama-3.1's scaling if configured
    (long wavelengths divided by ``factor``, short ones kept, a smooth blend between)."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if spec.rope_scaling:
        s = dict(spec.rope_scaling)
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv


def rotary(positions, spec: Spec):
    """(sin, cos) of shape [batch, seq, 1, head_dim] for integer ``positions`` [batch, seq], in float32."""
    ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies(spec), jnp.float32)
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    return jnp.sin(ang), jnp.cos(ang)


def _rotate(x, sin, cos):
    half = x.shape[-1] // 2
    turned = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + turned * sin


class RMSNorm(nn.Module):
    spec: Spec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (self.spec.hidden_size,))
        x32 = x.astype(jnp.float32)
        x32 = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.spec.rms_norm_eps)
        return w * x32.astype(self.dtype)


class Attention(nn.Module):
    spec: Spec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, sin, cos):
        s = self.spec
        dense = lambda n, name: nn.Dense(n, use_bias=s.attention_bias, dtype=self.dtype, name=name)  # noqa: E731
        b, t, _ = x.shape
        q = dense(s.num_heads * s.head_dim, "q_proj")(x).reshape(b, t, s.num_heads, s.head_dim)
        k = dense(s.num_kv_heads * s.head_dim, "k_proj")(x).reshape(b, t, s.num_kv_heads, s.head_dim)
        v = dense(s.num_kv_heads * s.head_dim, "v_proj")(x).reshape(b, t, s.num_kv_heads, s.head_dim)
        q = _rotate(q.astype(jnp.float32), sin, cos).astype(self.dtype)
        k = _rotate(k.astype(jnp.float32), sin, cos).astype(self.dtype)
        groups = s.num_heads // s.num_kv_heads
        q = q.reshape(b, t, s.num_kv_heads, groups, s.head_dim)
        # Scores and softmax in float32 whatever the compute dtype; grouped queries share their K/V head.
        q = q / jnp.sqrt(s.head_dim).astype(self.dtype)   # scaled before the product, as flax's attention does
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + bias[:, None, None], axis=-1).astype(self.dtype)
        out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, t, s.num_heads * s.head_dim)
        return dense(s.hidden_size, "o_proj")(out)


class MLP(nn.Module):
    spec: Spec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = self.spec
        dense = lambda n, name: nn.Dense(n, use_bias=s.mlp_bias, dtype=self.dtype, name=name)  # noqa: E731
        return dense(s.hidden_size, "down_proj")(
            nn.silu(dense(s.intermediate_size, "gate_proj")(x)) * dense(s.intermediate_size, "up_proj")(x))


class DecoderLayer(nn.Module):
    spec: Spec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, bias, sin, cos):
        h = h + Attention(self.spec, self.dtype, name="self_attn")(
            RMSNorm(self.spec, self.dtype, name="input_layernorm")(h), bias, sin, cos)
        return h + MLP(self.spec, self.dtype, name="mlp")(
            RMSNorm(self.spec, self.dtype, name="post_attention_layernorm")(h))


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


class Layers(_Stacked):
    """The decoder layers, named "0".."L-1" as in HF; run one by one or scanned over their stacked parameters."""

    def setup(self):
        self.blocks = [DecoderLayer(self.spec, self.dtype, name=str(i)) for i in range(self.spec.num_layers)]

    def __call__(self, h, bias, sin, cos):
        if not self.scan or self.is_initializing():
            for block in self.blocks:
                h = _constrain(block(h, bias, sin, cos), self.act_sharding)
            return h
        params = self.variables["params"]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[str(i)] for i in range(self.spec.num_layers)])
        layer = DecoderLayer(self.spec, self.dtype, parent=None)

        def body(h, p):
            return _constrain(layer.apply({"params": p}, h, bias, sin, cos), self.act_sharding), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_policy(self.remat), prevent_cse=False)
        return jax.lax.scan(body, h, stacked)[0]


class Backbone(_Stacked):

    @nn.compact
    def __call__(self, ids, mask):
        s = self.spec
        embed = nn.Embed(s.vocab_size, s.hidden_size, dtype=self.dtype, name="embed_tokens")
        h = _constrain(embed(ids), self.act_sharding)
        t = ids.shape[1]
        # Positions 0..t-1 whatever the mask, as HF's Flax classes do: wa's windows are padded on the right.
        sin, cos = rotary(jnp.broadcast_to(jnp.arange(t)[None], ids.shape), s)
        qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        allowed = (ki <= qi)[None] & (mask[:, None, :] > 0)
        if s.sliding_window:
            allowed &= (qi - ki < s.sliding_window)[None]
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)  # [batch, q, k]
        h = Layers(s, self.dtype, self.scan, self.remat, self.act_sharding, name="layers")(h, bias, sin, cos)
        return RMSNorm(s, self.dtype, name="norm")(h), embed


class CausalLM(_Stacked):
    """``__call__`` gives logits; ``hidden`` the final normed states, for the chunked loss."""

    def setup(self):
        self.model = Backbone(self.spec, self.dtype, self.scan, self.remat, self.act_sharding)
        if not self.spec.tie_word_embeddings:
            self.lm_head = nn.Dense(self.spec.vocab_size, use_bias=False, dtype=self.dtype)

    def hidden(self, ids, mask):
        return self.model(ids, mask)[0]

    def __call__(self, ids, mask):
        h, embed = self.model(ids, mask)
        return _constrain(embed.attend(h) if self.spec.tie_word_embeddings else self.lm_head(h), self.act_sharding)


def chunked_nll(h, w, targets, weights, chunk: int, tied: bool):
    """Σ weights · cross entropy of ``h @ w`` against ``targets``, ``chunk`` positions at a time under
    ``jax.checkpoint``: the [batch, chunk, vocab] float32 logits of one chunk exist at once, never the whole
    sequence's, in the forward pass or the backward."""
    b, t, d = h.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    weights = jnp.pad(weights, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(hc, tc, wc):
        logits = jnp.einsum("bcd,vd->bcv" if tied else "bcd,dv->bcv", hc, w, preferred_element_type=jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, tc) * wc)

    def body(total, xs):
        return total + one(*xs), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, weights))[0]


class Model:
    """The HF Flax model interface wa uses — ``model(ids, attention_mask=, params=)``, ``module``,
    ``params_shape_tree``, ``init_weights``, ``save_pretrained`` — over ``CausalLM``, plus ``token_nll`` with the
    chunked loss."""

    base_model_prefix = "model"

    def __init__(self, config, dtype=jnp.float32, scan: bool = False, remat: str = "none", loss_chunk: int = 512,
                 mesh=None):
        if remat not in REMAT:
            raise errors.ConfigError(f"remat={remat!r}: expected one of {', '.join(REMAT)}")
        if loss_chunk < 1:
            raise errors.ConfigError(f"loss_chunk={loss_chunk}: expected an integer >= 1")
        self.config = config
        self.spec = Spec.from_hf(config)
        self.dtype = dtype
        self.scan, self.remat, self.loss_chunk = scan, remat, loss_chunk
        # Scanned on a mesh, hidden states are kept split by batch rows over the data axes (wa.parallel.batch):
        # Llama-3.1-8B's gradient-step plan 12.9 -> 11.1 GiB of temporaries per device. Unscanned, the same
        # constraint makes the partitioner gather every layer's weights up front (the capture pass: 7.4 -> 30.2
        # GiB), so there the partitioner keeps its own choice.
        act = None
        if mesh is not None and scan:
            act = batch_lib.batch_sharding(mesh, 3)
        self.module = CausalLM(self.spec, dtype, scan, remat, act)

    def _init(self, key, shape=(1, 1)):
        ids = jnp.zeros(shape, jnp.int32)
        return self.module.init(key, ids, jnp.ones_like(ids))["params"]

    @property
    def params_shape_tree(self):
        return jax.eval_shape(self._init, jax.random.key(0))

    def init_weights(self, key, input_shape):
        """Random parameters: normal(0, initializer_range) kernels and embeddings, as HF initializes them."""
        std = getattr(self.config, "initializer_range", 0.02)
        params = self._init(key, tuple(input_shape))
        flat = traverse_util.flatten_dict(params)
        keys = jax.random.split(key, len(flat))
        out = {k: (std * jax.random.normal(r, v.shape, v.dtype) if k[-1] in ("kernel", "embedding") else v)
               for r, (k, v) in zip(keys, flat.items(), strict=True)}
        return traverse_util.unflatten_dict(out)

    def __call__(self, input_ids, attention_mask=None, params=None, train=False, dropout_rng=None, **_):
        del train, dropout_rng  # no dropout in these models
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        return (self.module.apply({"params": params}, input_ids, mask),)

    def token_nll(self, params, batch):
        """(Σ next-token NLL over real (token, target) pairs, their count), computed in chunks of the sequence."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else mask
        h = self.module.apply({"params": params}, ids, mask, method=CausalLM.hidden)
        w = _head(params, self.spec, self.dtype)
        weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        total = chunked_nll(h[:, :-1], w, ids[:, 1:], weights, self.loss_chunk, self.spec.tie_word_embeddings)
        return total, jnp.sum(weights)

    def save_pretrained(self, out_dir: str, params):
        """config.json and flax_model.msgpack, the files HF's ``save_pretrained`` writes."""
        os.makedirs(out_dir, exist_ok=True)
        self.config.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "flax_model.msgpack"), "wb") as f:
            f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(params))))


def _head(params, spec: Spec, dtype):
    if spec.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].astype(dtype)
    return params["lm_head"]["kernel"].astype(dtype)

