"""wa's own BERT and RoBERTa encoders: post-norm layers, token types, RoBERTa's positions counted from its padding
index, the pooled output; built from ``wa.models.layers``.

The module tree is HF's Flax tree (``embeddings``, ``encoder/layer/<i>/attention/self/query``, ...,
``pooler/dense``) down to the dropout modules: dropout keys derive from module names, so the SimCSE loss wa's
encoder analyses use (``wa.models.families.encoder_contrastive_nll``) draws, for the same ``rng``, the masks it drew
under HF's Flax classes. Outputs: (last hidden states, pooled output).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wa import errors
from wa.models import layers

MODEL_TYPES = ("bert", "roberta")


class Encoder(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask, train: bool = False):
        c, dtype = self.config, self.dtype
        det = not train
        init = nn.initializers.normal(c.initializer_range)
        dense = lambda f, name: nn.Dense(f, dtype=dtype, kernel_init=init, name=name)  # noqa: E731
        norm = lambda: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype, name="LayerNorm")  # noqa: E731
        drop = lambda: nn.Dropout(rate=c.hidden_dropout_prob, name="dropout")  # noqa: E731
        d, n = c.hidden_size, c.num_attention_heads
        roberta = c.model_type == "roberta"

        class Embeddings(nn.Module):
            @nn.compact
            def __call__(s, ids, mask):
                embed = lambda v, name: nn.Embed(v, d, embedding_init=init, dtype=dtype, name=name)  # noqa: E731
                if roberta:   # positions count real tokens from padding_idx + 1; padding sits at padding_idx
                    real = (ids != c.pad_token_id).astype(jnp.int32)
                    pos = jnp.cumsum(real, axis=1) * real + c.pad_token_id
                else:
                    pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
                h = embed(c.vocab_size, "word_embeddings")(ids.astype("i4")) + \
                    embed(c.max_position_embeddings, "position_embeddings")(pos.astype("i4")) + \
                    embed(c.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(ids, "i4"))
                return drop()(norm()(h), deterministic=det)

        class SelfAttention(nn.Module):
            @nn.compact
            def __call__(s, x, bias):
                q, k, v = (dense(d, t)(x).reshape(x.shape[:2] + (n, d // n)) for t in ("query", "key", "value"))
                rate = c.attention_probs_dropout_prob
                dropout = (s.make_rng("dropout"), rate) if train and rate > 0 else None
                return layers.attend(q, k, v, bias, dtype, dropout=dropout)

        class Residual(nn.Module):   # dense, dropout, LayerNorm(x + residual): BERT's "output" blocks
            @nn.compact
            def __call__(s, x, residual):
                return norm()(drop()(dense(d, "dense")(x), deterministic=det) + residual)

        class Attention(nn.Module):
            @nn.compact
            def __call__(s, x, bias):
                return Residual(name="output")(SelfAttention(name="self")(x, bias), x)

        class Intermediate(nn.Module):
            @nn.compact
            def __call__(s, x):
                return layers.activation(c.hidden_act)(dense(c.intermediate_size, "dense")(x))

        class Layer(nn.Module):
            @nn.compact
            def __call__(s, x, bias):
                a = Attention(name="attention")(x, bias)
                return Residual(name="output")(Intermediate(name="intermediate")(a), a)

        class Layers(nn.Module):
            @nn.compact
            def __call__(s, h, bias):
                for i in range(c.num_hidden_layers):
                    h = Layer(name=str(i))(h, bias)
                return h

        class Stack(nn.Module):
            @nn.compact
            def __call__(s, h, bias):
                return Layers(name="layer")(h, bias)

        class Pooler(nn.Module):
            @nn.compact
            def __call__(s, h):
                return jnp.tanh(dense(d, "dense")(h[:, 0]))

        h = Embeddings(name="embeddings")(ids, mask)
        h = Stack(name="encoder")(h, layers.mask_bias(mask[:, None, :] > 0))
        return h, Pooler(name="pooler")(h)


def model(config, dtype=jnp.float32) -> layers.Model:
    """The ``layers.Model`` of a BERT or RoBERTa config: outputs (last hidden states, pooled output)."""
    if config.hidden_size % config.num_attention_heads:
        raise errors.CheckpointError(f"{config.model_type} config: num_attention_heads={config.num_attention_heads} "
                                     f"does not divide hidden_size={config.hidden_size}")
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise errors.CheckpointError(f"{config.model_type} config: position_embedding_type={kind!r}; wa's encoder "
                                     "implements absolute positions")
    if getattr(config, "is_decoder", False):
        raise errors.CheckpointError(f"{config.model_type} config: is_decoder=True; wa reads encoders")
    return layers.Model(config, Encoder(config, dtype), config.model_type, dtype, dropout=True)
