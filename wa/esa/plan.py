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
from wa.models import build_model, llama
from wa.parallel import batch as batch_lib
from wa.parallel import rules as rules_lib


def hf_config(fields: dict) -> transformers.PretrainedConfig:
    fields = dict(fields)
    model_type = fields.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **fields)


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
         hvp_probes: int = 0, capture: bool = False, moe: str = "dense") -> dict:
    """Per-device bytes for parameters, gradients and temporaries of one loss-and-gradient step; with
    ``hvp_probes`` also of ESA's Hutchinson step (that many Hessian-vector products vmapped), with ``capture`` of
    its activation-capture pass (the per-input-channel sums of squares Wanda scores need).

    ``scan`` and ``remat`` ("none", "full", "dots") configure the llama-like decoder (``wa.models.llama``);
    ``loss_chunk`` every causal LM; ``moe`` ("dense", "grouped", "auto") an MoE model's expert path in the gradient
    step (the HVP step vmaps its probes, which only the dense path supports; capture needs the dense path's module
    calls). "auto" is "dense" on CPU: XLA's CPU backend lowers ``ragged_dot`` densely, every expert for every row,
    so a CPU plan of the grouped path counts temporaries no accelerator holds (Mixtral-8x7B: 68 GiB at 2 layers
    against the dense path's 13 GiB); "grouped" elsewhere.
    """
    if moe == "auto":
        moe = "dense" if jax.default_backend() == "cpu" else "grouped"
    model, family = build_model(config, compute_dtype, scan=scan, remat=remat, loss_chunk=loss_chunk, mesh=mesh,
                                moe=moe)
    if (scan or remat != "none") and not isinstance(model, llama.Model):
        raise ValueError(f"scan/remat: wa's {config.model_type} module runs layer by layer; they apply to the "
                         f"llama-like decoder ({', '.join(llama.MODEL_TYPES)}); plan with scan=False, remat='none'")
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
        dense = model if moe == "dense" else build_model(config, compute_dtype, scan=scan, remat=remat,
                                                          loss_chunk=loss_chunk, mesh=mesh)[0]

        def hvp_step(params, batch):
            return scores.hvp_diag_chunk(lambda p: family.loss(dense, p, batch), params, jax.random.key(0),
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
        "n_params": n_params,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "platform": jax.default_backend(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "param_dtype": jnp.dtype(param_dtype).name,
        "compute_dtype": jnp.dtype(compute_dtype).name,
        "scan": scan, "remat": remat, "loss_chunk": loss_chunk,
        **({"experts": model.experts, "moe_gradient_step": moe, "moe_hvp_and_capture_steps": "dense"}
           if getattr(model, "experts", 0) else {}),
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
