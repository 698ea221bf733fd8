r"""What each MoE expert path costs here: the loss and its gradient of one Mixtral (the stories_moe shape by default:
8 experts of 172, 2 per token, 5 layers of 128) with every expert run on every token ("dense") and with the tokens
grouped by expert through ``jax.lax.ragged_dot`` ("grouped"), beside the dense Llama with as many weights
multiplied per token (intermediate 2 × 172). Prints one JSON line; ratios are measured in one run.

  python experiments/moe_bench.py [--batch 8] [--seq 256] [--repeats 5]

On CPU, XLA lowers ``ragged_dot`` densely, so "grouped" does not save the E/k = 4× MLP FLOPs that "dense" spends;
on an accelerator with a grouped-matmul kernel it should.
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import transformers

    from wa import models

    common = dict(vocab_size=512, hidden_size=128, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=a.seq, rms_norm_eps=1e-6, tie_word_embeddings=False)
    moe = transformers.MixtralConfig(**common, intermediate_size=172, num_local_experts=8, num_experts_per_tok=2,
                                     rope_theta=10000.0, sliding_window=None)
    dense = transformers.LlamaConfig(**common, intermediate_size=344)
    ids = jax.random.randint(jax.random.key(1), (a.batch, a.seq), 0, 512)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}

    def timed(config, path):
        model, family = models.build_model(config, moe=path)
        params = model.init_weights(jax.random.key(0), (1, 8))
        out = {}
        for name, fn in (("loss", lambda p: family.loss(model, p, batch)),
                         ("gradient", jax.grad(lambda p: family.loss(model, p, batch)))):
            f = jax.jit(fn)
            jax.block_until_ready(f(params))   # compile
            t = time.perf_counter()
            for _ in range(a.repeats):
                jax.block_until_ready(f(params))
            out[name] = (time.perf_counter() - t) / a.repeats
        return out

    res = {"moe_dense": timed(moe, "dense"), "moe_grouped": timed(moe, "grouped"), "llama": timed(dense, "dense")}
    line = {"platform": jax.default_backend(), "batch": a.batch, "seq": a.seq, "repeats": a.repeats,
            **{f"{k}_{s}_seconds": round(v[s], 4) for k, v in res.items() for s in ("loss", "gradient")},
            **{f"grouped_over_dense_{s}": round(res["moe_grouped"][s] / res["moe_dense"][s], 3)
               for s in ("loss", "gradient")},
            **{f"moe_dense_over_llama_{s}": round(res["moe_dense"][s] / res["llama"][s], 3)
               for s in ("loss", "gradient")}}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
