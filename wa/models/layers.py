"""The pieces wa's own language models are built from: activations by their HF names, the attention core, GPT-2's
Conv1D, the chunked next-token loss, and ``Model``, the HF-style interface every analysis calls.

wa's modules (``wa.models.llama`` for the llama-like decoders, ``wa.models.gpt`` for GPT-2, GPT-Neo and OPT,
``wa.models.bert`` for BERT and RoBERTa) keep the parameter names and layouts HF's checkpoints use, so loading,
partition rules, taxonomies and reports speak the user's names; transformers serves only configs and tokenizers.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util

from wa import errors

# HF activation names -> the function (transformers' ACT2FN): gelu is the exact erf form, gelu_new GPT-2's tanh one.
ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
               "gelu_new": lambda x: nn.gelu(x, approximate=True),
               "gelu_fast": lambda x: nn.gelu(x, approximate=True),
               "relu": nn.relu, "tanh": jnp.tanh}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise errors.CheckpointError(f"activation {name!r}: wa's models implement {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attend(q, k, v, bias, dtype, scale: float | None = None, cap: float | None = None, dropout=None, keep=None):
    """Softmax attention of queries ``q`` [b, t, heads, d] over keys and values [b, s, kv_heads, d] (grouped: a
    K/V head serves heads / kv_heads queries) with additive ``bias`` [b, t or 1, s]; returns [b, t, heads · d].

    Queries are scaled before the product (by ``scale``, or divided by √d where None), as flax's attention does;
    scores and softmax in float32 whatever the compute dtype; ``cap``: Gemma-2's soft cap on the scores.
    ``dropout`` = (rng, rate) drops attention weights with one mask shared by every batch row and head, drawn
    as flax's ``dot_product_attention_weights`` draws it (so encoders keep the masks they had under HF's Flax
    classes). ``keep``, if given, is called with the attention weights [b, heads, t, s] (a module's ``sow``: what
    analyses of attention patterns read)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    q = q / jnp.sqrt(d).astype(dtype) if scale is None else q * jnp.asarray(scale, dtype)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    if cap:
        scores = jnp.tanh(scores / cap) * cap
    probs = jax.nn.softmax(scores + bias[:, None, None], axis=-1).astype(dtype)
    if keep is not None:
        keep(probs.reshape(b, h, t, -1))
    if dropout is not None:
        rng, rate = dropout
        keep = jax.random.bernoulli(rng, 1.0 - rate, (1, 1, 1) + probs.shape[-2:])
        probs = probs * (keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype))
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, t, h * d)


def mask_bias(allowed):
    """0 where a query may see a key, float32's lowest value where not."""
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def causal_allowed(mask):
    """[b, t, t]: key at or before the query, and a real token."""
    t = mask.shape[1]
    qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    return (ki <= qi)[None] & (mask[:, None, :] > 0)


def window_allowed(allowed, window: int):
    """``allowed`` [b, t, t] within a sliding window: a query sees itself and the ``window`` - 1 keys before it."""
    t = allowed.shape[-1]
    qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    return allowed & (qi - ki < window)[None]


class Scope(nn.Module):
    """One named level of the parameter tree (HF nests ``attn/attention/q_proj``): the modules ``fn`` creates when
    called are its children."""
    fn: Callable

    @nn.compact
    def __call__(self, *args):
        return self.fn(*args)


class Conv1D(nn.Module):
    """GPT-2's linear layer: kernel stored [out, in] (PyTorch's Conv1D weight transposed, as HF Flax keeps it)."""
    features: int
    dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(self.init_std), (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x = x.astype(self.dtype)
        return jax.lax.dot_general(x, kernel.astype(self.dtype), (((x.ndim - 1,), (1,)), ((), ()))) + \
            bias.astype(self.dtype)


def softcap(logits, cap):
    """Gemma-2's soft cap ``cap · tanh(x / cap)`` (identity without a cap)."""
    return logits if not cap else jnp.tanh(logits / cap) * cap


def chunked_nll(h, w, targets, weights, chunk: int, tied: bool, cap: float | None = None):
    """Σ weights · cross entropy of ``h @ w`` (soft-capped at ``cap``) against ``targets``, ``chunk`` positions at
    a time under ``jax.checkpoint``: the [batch, chunk, vocab] float32 logits of one chunk exist at once, never the
    whole sequence's, in the forward pass or the backward."""
    b, t, d = h.shape
    n = -(-t // chunk)
    # The fewest chunks of at most ``chunk`` positions, as equal as they can be: padding to a whole ``chunk`` cost
    # up to twice the head's work (255 targets of a 256-token window padded to 512).
    chunk = -(-t // n)
    pad = n * chunk - t
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    weights = jnp.pad(weights, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(hc, tc, wc):
        logits = jnp.einsum("bcd,vd->bcv" if tied else "bcd,dv->bcv", hc, w, preferred_element_type=jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(softcap(logits, cap), tc) * wc)

    def body(total, xs):
        return total + one(*xs), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, weights))[0]


def _at(params, path: tuple):
    for k in path:
        params = params[k]
    return params


class Model:
    """The HF Flax model interface wa uses — ``model(ids, attention_mask=, params=, train=, dropout_rng=)``,
    ``module``, ``params_shape_tree``, ``init_weights``, ``save_pretrained``, ``base_model_prefix`` — over one of
    wa's linen modules. A causal LM's module has a ``hidden`` method (the final states the head reads);
    ``token_nll`` then computes the loss in chunks of the sequence against ``head``, the path of the output
    matrix (the embedding where tied)."""

    def __init__(self, config, module: nn.Module, base_model_prefix: str, dtype=jnp.float32, loss_chunk: int = 512,
                 head: tuple = (), tied: bool = False, final_softcap: float | None = None, dropout: bool = False):
        if loss_chunk < 1:
            raise errors.ConfigError(f"loss_chunk={loss_chunk}: expected an integer >= 1")
        self.config, self.module, self.base_model_prefix = config, module, base_model_prefix
        self.dtype, self.loss_chunk = dtype, loss_chunk
        self.head, self.tied, self.final_softcap = head, tied, final_softcap
        self.dropout = dropout   # the module takes ``train`` and draws dropout masks (encoders)

    def _init(self, key, shape=(1, 1)):
        ids = jnp.zeros(shape, jnp.int32)
        return self.module.init(key, ids, jnp.ones_like(ids))["params"]

    @property
    def params_shape_tree(self):
        return jax.eval_shape(self._init, jax.random.key(0))

    def init_weights(self, key, input_shape):
        """Random parameters: normal(0, initializer_range) kernels and embeddings, as HF initializes them; norms
        and biases as the module sets them (ones, zeros)."""
        std = getattr(self.config, "initializer_range", None) or getattr(self.config, "init_std", None) or 0.02
        params = self._init(key, tuple(input_shape))
        flat = traverse_util.flatten_dict(params)
        keys = jax.random.split(key, len(flat))
        out = {k: (std * jax.random.normal(r, v.shape, v.dtype) if k[-1] in ("kernel", "embedding") else v)
               for r, (k, v) in zip(keys, flat.items(), strict=True)}
        return traverse_util.unflatten_dict(out)

    def _apply(self, params, *args, **kw):
        return self.module.apply({"params": params}, *args, **kw)

    def __call__(self, input_ids, attention_mask=None, params=None, train=False, dropout_rng=None, **_):
        """A tuple whose first entry is the logits (causal LMs) or the last hidden states (encoders)."""
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        if self.dropout and train and dropout_rng is not None:
            out = self._apply(params, input_ids, mask, train=True, rngs={"dropout": dropout_rng})
        else:
            out = self._apply(params, input_ids, mask)
        return out if isinstance(out, tuple) else (out,)

    def token_nll(self, params, batch):
        """(Σ next-token NLL over real (token, target) pairs, their count), computed in chunks of the sequence."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else mask
        return self.nll_of_hidden(params, self._apply(params, ids, mask, method="hidden"), ids, mask)

    def nll_of_hidden(self, params, h, ids, mask):
        """``token_nll`` from the final hidden states ``h`` of ``ids``."""
        w = _at(params, self.head).astype(self.dtype)
        weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return chunked_nll(h[:, :-1], w, ids[:, 1:], weights, self.loss_chunk, self.tied,
                           self.final_softcap), jnp.sum(weights)

    def save_pretrained(self, out_dir: str, params, safe_serialization: bool = False):
        """config.json and flax_model.msgpack (or model.safetensors in the Flax layout, names joined by dots), the
        files HF's Flax ``save_pretrained`` wrote."""
        os.makedirs(out_dir, exist_ok=True)
        self.config.save_pretrained(out_dir)
        params = jax.tree.map(np.asarray, dict(params))
        if safe_serialization:
            from safetensors.numpy import save_file
            flat = traverse_util.flatten_dict(params, sep=".")
            save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, os.path.join(out_dir, "model.safetensors"),
                      metadata={"format": "flax"})
            return
        with open(os.path.join(out_dir, "flax_model.msgpack"), "wb") as f:
            f.write(serialization.msgpack_serialize(params))
