"""Ahead-of-time memory plan for one loss-and-gradient step on a sharded model, and for ESA's HVP and capture
steps (planned as ESA runs them: it sits above the models and the scores it plans)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import NamedSharding

from wa.esa import scores
from wa.models import build_model
from wa.parallel import batch as batch_lib
from wa.parallel import rules as rules_lib


def hf_config(fields: dict) -> transformers.PretrainedConfig:
    fields = dict(fields)
    model_type = fields.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **fields)


def trim_positions(config, seq_len: int):
    """``config`` with ``max_position_embeddings = seq_len`` where no parameter depends on it.

    HF Flax decoders precompute a [max_positions, max_positions] causal mask as a constant
    (Llama-3.1's 131072 positions make that 17 GB), which would dominate the plan without
    touching any real training step at ``seq_len``. Rotary models (Llama, Mistral) have no
    position parameters, so trimming leaves the parameters identical; models with learned
    position tables keep their config.
    """
    n = getattr(config, "max_position_embeddings", None)
    if n is None or n <= seq_len:
        return config, False
    trimmed = config.__class__.from_dict({**config.to_dict(), "max_position_embeddings": seq_len})
    a, _ = build_model(config)
    b, _ = build_model(trimmed)
    same = jax.tree_util.tree_map(lambda x, y: x.shape == y.shape, a.params_shape_tree, b.params_shape_tree)
    return (trimmed, True) if all(jax.tree_util.tree_leaves(same)) else (config, False)


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    out = {"compiled_argument_bytes_per_device": int(mem.argument_size_in_bytes),
           "compiled_output_bytes_per_device": int(mem.output_size_in_bytes),
           "temp_bytes_per_device": int(mem.temp_size_in_bytes),
           "alias_bytes_per_device": int(mem.alias_size_in_bytes),
           "generated_code_bytes": int(mem.generated_code_size_in_bytes)}
    out["peak_estimate_bytes_per_device"] = (out["compiled_argument_bytes_per_device"]
                                             + out["compiled_output_bytes_per_device"]
                                             + out["temp_bytes_per_device"] - out["alias_bytes_per_device"])
    return out


def plan(config, mesh, batch_size: int, seq_len: int, param_dtype=jnp.bfloat16,
         compute_dtype=jnp.bfloat16, remat: str = "none", rules=None, scan: bool = False, loss_chunk: int = 512,
         hvp_probes: int = 0, capture: bool = False) -> dict:
    """Per-device bytes for parameters, gradients and temporaries of one loss-and-gradient step; with
    ``hvp_probes`` also of ESA's Hutchinson step (that many Hessian-vector products vmapped), with ``capture`` of
    its activation-capture pass (the per-input-channel sums of squares Wanda scores need).

    ``scan``, ``remat`` ("none", "full", "dots") and ``loss_chunk`` configure wa's own decoder
    (``wa.models.llama``); for other families ``remat="full"`` turns on the HF class's gradient checkpointing
    where it has one.
    """
    config, trimmed = trim_positions(config, seq_len)
    model, family = build_model(config, compute_dtype, scan=scan, remat=remat, loss_chunk=loss_chunk, mesh=mesh)
    if remat != "none" and not hasattr(model, "token_nll"):
        try:
            model.enable_gradient_checkpointing()
        except NotImplementedError:
            raise ValueError(f"remat: {type(model).__name__} has no gradient checkpointing in "
                             "transformers; plan with remat='none'") from None
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype),
                                    model.params_shape_tree)
    rules = family.partition_rules if rules is None else rules
    p_shard = rules_lib.shardings_for(shapes, rules, mesh)
    batch_lib.check_batch_size(mesh, batch_size)
    b_shard = batch_lib.batch_sharding(mesh, 2)
    abstract_params = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, p_shard)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=b_shard)
    abstract_batch = {"input_ids": tokens, "attention_mask": tokens}
    in_shardings = (p_shard, {"input_ids": b_shard, "attention_mask": b_shard})
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def grad_step(params, batch):
        return jax.value_and_grad(lambda p: family.loss(model, p, batch))(params)

    steps = {"gradient": (grad_step, (replicated, p_shard))}
    if hvp_probes:
        def hvp_step(params, batch):
            return scores.hvp_diag_chunk(lambda p: family.loss(model, p, batch), params, jax.random.key(0),
                                         hvp_probes, jnp.ones((hvp_probes,), jnp.float32))
        steps["hvp"] = (hvp_step, p_shard)
    if capture:
        # Capture needs every layer as its own module call: the same parameters through the unscanned model.
        unrolled, _ = build_model(config, compute_dtype, loss_chunk=loss_chunk, mesh=mesh)
        stand_in = type("Forward", (), {"forward": staticmethod(
            lambda params, ids, mask: family.forward(unrolled, params, ids, mask))})

        def capture_step(params, batch):
            return scores.input_sq_norms(stand_in, params, batch)
        steps["capture"] = (capture_step, None)

    flat = rules_lib.flatten(shapes)
    specs = rules_lib.flatten(p_shard)
    param_bytes = sum(rules_lib.bytes_per_device(s.shape, s.dtype, specs[p].spec, mesh)
                      for p, s in flat.items())
    n_params = sum(int(np.prod(s.shape)) for s in flat.values())
    out = {
        "model_type": config.model_type,
        "model_code": "wa" if hasattr(model, "token_nll") else "transformers",
        "n_params": n_params,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "platform": jax.default_backend(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "param_dtype": jnp.dtype(param_dtype).name,
        "compute_dtype": jnp.dtype(compute_dtype).name,
        "scan": scan, "remat": remat, "loss_chunk": loss_chunk,
        "max_position_embeddings_trimmed_to_seq_len": trimmed,
        "params_bytes_per_device": param_bytes,
        "grads_bytes_per_device": param_bytes,  # gradients take the parameters' shardings
        "total_params_bytes": sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in flat.values()),
    }
    for name, (fn, out_shardings) in steps.items():
        t0 = time.time()
        kw = {} if out_shardings is None else {"out_shardings": out_shardings}
        lowered = jax.jit(fn, in_shardings=in_shardings, **kw).lower(abstract_params, abstract_batch)
        t_lower = time.time() - t0
        compiled = lowered.compile()
        fig = {"seconds_lower": round(t_lower, 1), "seconds_compile": round(time.time() - t0 - t_lower, 1),
               **_memory(compiled)}
        if name == "gradient":
            out.update(fig)        # the step every plan has, at the top level
        else:
            out[name] = {"probes": hvp_probes, **fig} if name == "hvp" else fig
    return out
