r"""Dry-run memory plan: abstract parameters from an HF config, sharded, step compiled ahead of time.

  python -m launch.plan --config configs/plan.py:llama3_8b
  python -m launch.plan --config configs/plan.py:llama3_8b --config.mesh=data:2,fsdp:4 --config.batch_size=16
  python -m launch.plan --config configs/plan.py:mixtral_8x7b
  python -m launch.plan --config configs/plan.py:tiny      # seconds, for tests

Nothing is allocated: parameters come from jax.eval_shape and the loss-and-gradient step is
lowered and compiled for ``num_devices`` devices (forced CPU devices where there are no
accelerators), then the compiled memory analysis is read.
"""

import ml_collections

LLAMA3_8B = dict(  # Llama-3.1-8B
    model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=False)

MIXTRAL_8X7B = dict(  # Mixtral-8x7B-v0.1: 46.7B weights, 12.9B multiplied per token (2 of 8 experts)
    model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
    rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
    tie_word_embeddings=False)

TINY = dict(
    model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, vocab_size=256, max_position_embeddings=128,
    tie_word_embeddings=False)


def get_config(arg: str = "llama3_8b") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_devices = 8
    c.mesh = "data:1,fsdp:-1"
    c.batch_size = 8              # global sequences per step
    c.seq_len = 2048
    c.param_dtype = "bfloat16"
    c.compute_dtype = "bfloat16"
    # Llama / Mistral run on wa's own module: decoder layers scanned, each rematerialized ("none", "full":
    # keep only layer inputs, "dots": also keep matmul outputs), the loss in chunks of this many positions.
    # Other families: remat "full" turns on the HF class's gradient checkpointing where it has one.
    c.scan = True
    c.remat = "full"
    c.loss_chunk = 512
    c.hvp_probes = 1                  # also plan ESA's Hutchinson step with this many probes vmapped (0 = skip)
    c.capture = True                  # also plan ESA's activation-capture pass (Wanda norms)
    c.moe = "dense"                   # an MoE model's expert path in the gradient step: dense, grouped or auto
    if arg == "llama3_8b":
        c.hf_config = LLAMA3_8B
    elif arg == "mixtral_8x7b":
        # FSDP over 8 devices: each expert's matrices split like a dense MLP's (no expert-parallel axis: wa keeps
        # every expert its own parameters). The gradient step's experts as grouped matmuls (ragged_dot) on an
        # accelerator, every expert on every token on CPU, whose compiler expands ragged_dot densely ("auto").
        c.hf_config = MIXTRAL_8X7B
        c.moe = "auto"
    elif arg in ("tiny", "tiny_moe"):
        c.hf_config = TINY if arg == "tiny" else dict(TINY, model_type="mixtral", num_local_experts=4,
                                                      num_experts_per_tok=2, intermediate_size=32)
        c.moe = "dense" if arg == "tiny" else "grouped"
        c.batch_size = 8
        c.seq_len = 32
        c.param_dtype = "float32"
        c.compute_dtype = "float32"
        c.loss_chunk = 16
    else:
        raise ValueError(f"configs/plan.py: unknown variant {arg!r}; use llama3_8b, mixtral_8x7b, tiny or tiny_moe")
    return c
