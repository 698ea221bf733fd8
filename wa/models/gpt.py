"""wa's own GPT-2, GPT-Neo and OPT: the learned-position decoders, each read from its HF config, built from
``wa.models.layers`` (the attention core, Conv1D, the chunked loss, the ``Model`` interface).

What they differ in, and where it lives here:

* GPT-2: one ``c_attn`` Conv1D for q, k, v ([out, in] kernels, as HF keeps PyTorch's Conv1D), queries scaled by
  1/√d (and by 1/(layer + 1) with ``scale_attn_by_inverse_layer_idx``; none without ``scale_attn_weights``),
  ``n_inner`` (default 4·d), the head tied to ``wte`` unless the config unties it;
* GPT-Neo: separate q/k/v without bias under ``attn/attention``, no query scaling at all, and a per-layer pattern
  of global and local layers (``attention_layers``: a local query sees the ``window_size`` - 1 tokens before it);
* OPT: positions stored with an offset of 2 and counted over real tokens (``cumsum(mask) - 1``, as PyTorch's
  OPT does), embeddings of ``word_embed_proj_dim`` projected in and out (``project_in``/``project_out``) where it
  differs from the hidden size, norms before (``do_layer_norm_before``, all sizes but 350m) or after each block,
  ``enable_bias``, ReLU.

Parameters keep HF's Flax names (``transformer/h/3/attn/c_attn/kernel``, ``model/decoder/layers/3/fc1/kernel``)
so checkpoints of every format, partition rules, taxonomies and reports read as before. These models take no
dropout (wa evaluates and differentiates them; it never fine-tunes them with dropout) and run layer by layer:
``scan`` and ``remat`` are the llama-like decoder's (``wa.models.llama``).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wa import errors
from wa.models import layers

MODEL_TYPES = ("gpt2", "gpt_neo", "opt")


def _std(config) -> float:
    return getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02


def _dense(config, features, name, dtype, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(_std(config)))


def _layer_norm(config, name, dtype, eps_field="layer_norm_epsilon"):
    return nn.LayerNorm(epsilon=getattr(config, eps_field, 1e-5), dtype=dtype, name=name)


def _opt_norm(config, name, dtype):
    affine = getattr(config, "layer_norm_elementwise_affine", True)
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name, use_scale=affine, use_bias=affine)


def _lm_head(config, h, embed, dtype):
    """Logits: through the token embedding where tied (GPT-2's and OPT's default), else an ``lm_head`` Dense."""
    if config.tie_word_embeddings:
        return embed.attend(h)
    return nn.Dense(config.vocab_size, use_bias=False, dtype=dtype, name="lm_head",
                    kernel_init=nn.initializers.normal(_std(config)))(h)


def _heads(x, n):
    return x.reshape(x.shape[:2] + (n, x.shape[-1] // n))


class GPTBlock(nn.Module):
    """A GPT-2 or GPT-Neo block: ``ln_1``, ``attn``, ``ln_2``, ``mlp``, each branch added to the residual."""
    config: object
    layer: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, biases):
        c = self.config
        d = c.hidden_size
        act = layers.activation(c.activation_function)
        if c.model_type == "gpt_neo":   # Dense [in, out] layers; q, k, v without bias under attn/attention
            n = c.num_heads
            linear = lambda f, name, bias=True: _dense(c, f, name, self.dtype, bias)  # noqa: E731
            bias = biases[c.attention_layers[self.layer] == "local"]
            inner = c.intermediate_size or 4 * d

            def attention(x):
                q, k, v = (_heads(linear(d, f"{t}_proj", False)(x), n) for t in "qkv")
                # GPT-Neo does not scale its attention scores.
                return linear(d, "out_proj")(layers.attend(q, k, v, bias, self.dtype, 1.0))
            attn = layers.Scope(lambda x: layers.Scope(attention, name="attention")(x), name="attn")
        else:                           # GPT-2: Conv1D [out, in] layers, q, k, v in one c_attn
            n = c.num_attention_heads
            linear = lambda f, name: layers.Conv1D(f, self.dtype, _std(c), name=name)  # noqa: E731
            bias = biases[0]
            inner = c.n_inner or 4 * d
            scale = (d // n) ** -0.5 if getattr(c, "scale_attn_weights", True) else 1.0
            if getattr(c, "scale_attn_by_inverse_layer_idx", False):
                scale /= self.layer + 1

            def attention(x):
                q, k, v = (_heads(t, n) for t in jnp.split(linear(3 * d, "c_attn")(x), 3, axis=-1))
                return linear(d, "c_proj")(layers.attend(q, k, v, bias, self.dtype, scale))
            attn = layers.Scope(attention, name="attn")
        mlp = layers.Scope(lambda x: linear(d, "c_proj")(act(linear(inner, "c_fc")(x))), name="mlp")
        h = h + attn(_layer_norm(c, "ln_1", self.dtype)(h))
        return h + mlp(_layer_norm(c, "ln_2", self.dtype)(h))


class OPTLayer(nn.Module):
    config: object
    layer: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, bias):
        c = self.config
        d, n = c.hidden_size, c.num_attention_heads
        b = getattr(c, "enable_bias", True)
        dense = lambda f, name: _dense(c, f, name, self.dtype, b)  # noqa: E731
        pre = c.do_layer_norm_before
        norm = lambda name: _opt_norm(c, name, self.dtype)  # noqa: E731

        def attention(x):
            q, k, v = (_heads(dense(d, f"{t}_proj")(x), n) for t in "qkv")
            return dense(d, "out_proj")(layers.attend(q, k, v, bias, self.dtype, (d // n) ** -0.5))

        attn_norm, mlp_norm = norm("self_attn_layer_norm"), norm("final_layer_norm")
        a = layers.Scope(attention, name="self_attn")(attn_norm(h) if pre else h)
        h = h + a if pre else attn_norm(h + a)
        m = dense(d, "fc2")(layers.activation(c.activation_function)(dense(c.ffn_dim, "fc1")(mlp_norm(h) if pre
                                                                                              else h)))
        return h + m if pre else mlp_norm(h + m)


class Stack(nn.Module):
    """Layers named "0".."L-1" under one module, as HF's layer collections name them."""
    block: type
    config: object
    count: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, bias):
        for i in range(self.count):
            h = self.block(self.config, i, self.dtype, name=str(i))(h, bias)
        return h


class GPT2(nn.Module):
    """GPT-2 and GPT-Neo: ``transformer`` (wte, wpe, h, ln_f) and ``lm_head`` where untied."""
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask, hidden_only: bool = False):
        c = self.config
        neo = c.model_type == "gpt_neo"

        def transformer(ids, mask):
            embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name,  # noqa: E731
                                             embedding_init=nn.initializers.normal(_std(c)))
            wte = embed(c.vocab_size, "wte")
            t = ids.shape[1]
            h = wte(ids) + embed(c.max_position_embeddings, "wpe")(jnp.arange(t)[None])
            allowed = layers.causal_allowed(mask)
            biases = (layers.mask_bias(allowed),)   # a local layer's (GPT-Neo) second
            if neo:
                biases += (layers.mask_bias(layers.window_allowed(allowed, c.window_size)),)
            h = Stack(GPTBlock, c, c.num_layers if neo else c.num_hidden_layers, self.dtype, name="h")(h, biases)
            return _layer_norm(c, "ln_f", self.dtype)(h), wte

        h, wte = layers.Scope(transformer, name="transformer")(ids, mask)
        return h if hidden_only else _lm_head(c, h, wte, self.dtype)

    def hidden(self, ids, mask):
        return self(ids, mask, hidden_only=True)


OPT_POSITION_OFFSET = 2


class OPT(nn.Module):
    """``model/decoder`` (embed_tokens, embed_positions, project_in/out, layers, final_layer_norm) and
    ``lm_head`` where untied."""
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask, hidden_only: bool = False):
        c = self.config
        proj = c.word_embed_proj_dim
        std = _std(c)

        def decoder(ids, mask):
            embed = nn.Embed(c.vocab_size, proj, dtype=self.dtype, name="embed_tokens",
                             embedding_init=nn.initializers.normal(std))
            h = embed(ids)
            if proj != c.hidden_size:
                h = _dense(c, c.hidden_size, "project_in", self.dtype, False)(h)
            # PyTorch's OPT counts positions over real tokens; padded ones read row offset - 1.
            pos = jnp.cumsum(mask, axis=1) * mask - 1 + OPT_POSITION_OFFSET
            h = h + nn.Embed(c.max_position_embeddings + OPT_POSITION_OFFSET, c.hidden_size, dtype=self.dtype,
                             name="embed_positions", embedding_init=nn.initializers.normal(std))(pos)
            h = Stack(OPTLayer, c, c.num_hidden_layers, self.dtype, name="layers")(
                h, layers.mask_bias(layers.causal_allowed(mask)))
            if c.do_layer_norm_before and not getattr(c, "_remove_final_layer_norm", False):
                h = _opt_norm(c, "final_layer_norm", self.dtype)(h)
            if proj != c.hidden_size:
                h = _dense(c, proj, "project_out", self.dtype, False)(h)
            return h, embed

        h, embed = layers.Scope(lambda *a: layers.Scope(decoder, name="decoder")(*a), name="model")(ids, mask)
        return h if hidden_only else _lm_head(c, h, embed, self.dtype)

    def hidden(self, ids, mask):
        return self(ids, mask, hidden_only=True)


def _check(config):
    t = config.model_type
    d = config.hidden_size
    n = config.num_heads if t == "gpt_neo" else config.num_attention_heads
    if d % n:
        raise errors.CheckpointError(f"{t} config: num_attention_heads={n} does not divide hidden_size={d}")
    if t == "gpt_neo":
        kinds = list(config.attention_layers)
        if len(kinds) != config.num_layers or not set(kinds) <= {"global", "local"}:
            raise errors.CheckpointError(f"gpt_neo config: attention_types gives {kinds}; expected "
                                         f"{config.num_layers} entries, each 'global' or 'local'")
    if getattr(config, "add_cross_attention", False):
        raise errors.CheckpointError(f"{t} config: add_cross_attention=True; wa reads decoder-only models")


def model(config, dtype=jnp.float32, loss_chunk: int = 512) -> layers.Model:
    """The ``layers.Model`` of a GPT-2, GPT-Neo or OPT config."""
    _check(config)
    tied = bool(config.tie_word_embeddings)
    if config.model_type == "opt":
        head = ("model", "decoder", "embed_tokens", "embedding") if tied else ("lm_head", "kernel")
        return layers.Model(config, OPT(config, dtype), "model", dtype, loss_chunk, head, tied)
    head = ("transformer", "wte", "embedding") if tied else ("lm_head", "kernel")
    return layers.Model(config, GPT2(config, dtype), "transformer", dtype, loss_chunk, head, tied)
