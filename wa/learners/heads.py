"""Shared pieces of the neural learners: input embeddings of graph nodes and edges, and the multi-task heads."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wa.weights import graph as graph_lib

MAX_INDEX = 256   # input pixels / patch pixels / positions / classes: the units whose index means something


def fixed_units(nodes) -> jnp.ndarray:
    """Input and output units keep their identity under hidden-neuron permutations; hidden units do not."""
    return (nodes["x"][..., 2] + nodes["x"][..., 3]) > 0


class NodeEmbed(nn.Module):
    dim: int
    layer_types: bool = True
    positions: str = "fixed"      # "fixed": index of input/output units only; "all": every unit's index (ablation)

    @nn.compact
    def __call__(self, nodes):
        h = nn.Dense(self.dim, name="x")(nodes["x"])
        h = h + nn.Embed(len(graph_lib.ACTIVATIONS), self.dim, name="activation")(nodes["activation"])
        if self.layer_types:
            h = h + nn.Embed(len(graph_lib.LAYER_TYPES), self.dim, name="layer_type")(nodes["layer_type"])
        index = jnp.minimum(nodes["index"], MAX_INDEX - 1)
        pos = nn.Embed(MAX_INDEX, self.dim, name="index")(index)
        keep = fixed_units(nodes) if self.positions == "fixed" else jnp.ones(index.shape, bool)
        return h + pos * keep[..., None]


def residual_update(h, update, dim: int):
    """Post-LN transformer tail shared by the learners: h + Dense(update), then h + MLP(h), each LayerNorm'd.
    Called inside a compact method, so its layers (``out``, ``ln_1``, ``mlp_in``, ``mlp_out``, ``ln_2``) belong to
    the caller."""
    h = nn.LayerNorm(name="ln_1")(h + nn.Dense(dim, name="out")(update))
    return nn.LayerNorm(name="ln_2")(h + nn.Dense(dim, name="mlp_out")(nn.gelu(nn.Dense(2 * dim, name="mlp_in")(h))))


def add_wide_rows(h, rows, dim: int):
    """Each neuron fed by a wide input layer (``base.drop_wide_inputs``) reads its row of weights over the fixed
    input units as one feature vector (as NFN reads its inputs), added to its embedding. Called inside a compact
    method; its layers (``wide_input_<inputs>x<taps>``, one per input size) belong to the caller."""
    for at, w in rows:
        f = nn.Dense(dim, name=f"wide_input_{w.shape[-2]}x{w.shape[-1]}")(w.reshape(*w.shape[:-2], -1))
        h = h + jnp.pad(f, ((0, 0), (at, h.shape[1] - at - f.shape[1]), (0, 0)))
    return h


def fuse_stats(z, stats, dim: int):
    """Multi-resolution readout: the pooled embedding (micro/meso levels, from neurons and layers) concatenated
    with an embedding of the network's per-layer weight statistics (macro level), when the batch carries them.
    Called inside a compact method; its layer (``stats_embed``) belongs to the caller."""
    if stats is None:
        return z
    return jnp.concatenate([z, nn.gelu(nn.Dense(dim, name="stats_embed")(stats))], -1)


class Heads(nn.Module):
    """embedding → {task: logits [.., classes] or value [..]} through a shared MLP trunk."""
    out_dims: tuple          # ((task, classes or 0 for a scalar), ...)
    hidden: int

    @nn.compact
    def __call__(self, z):
        t = nn.gelu(nn.Dense(self.hidden, name="trunk")(z))
        out = {}
        for task, dim in self.out_dims:
            o = nn.Dense(dim or 1, name=f"head_{task}")(t)
            out[task] = o if dim else o[..., 0]
        return out
