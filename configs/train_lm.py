r"""Train a small causal LM (GPT-2, Llama or Mixtral) and save it with save_pretrained.

  python -m launch.train_lm --config configs/train_lm.py:shakespeare_char --workdir runs/shakespeare_char
  python -m launch.train_lm --config configs/train_lm.py:smoke --workdir /tmp/lm    # seconds, for tests
  # A dense Llama and a Mixtral (8 experts, 2 per token) with the same active weights, tokens and schedule:
  python -m launch.train_lm --config configs/train_lm.py:stories_llama --workdir runs/stories_llama
  python -m launch.train_lm --config configs/train_lm.py:stories_moe --workdir runs/stories_moe

Re-running with the same workdir resumes from the last orbax checkpoint.
"""

import ml_collections


def get_config(arg: str = "shakespeare_char") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.arch = "gpt2"                   # gpt2, llama or mixtral (wa's own modules, HF configs)
    c.tokenizer = "bytes"             # bytes, gpt2, or a SentencePiece .model / checkpoint dir
    c.corpus = "tinyshakespeare"
    c.doc_split = "blank_lines"
    c.val_fraction = 0.1              # last documents, never trained on
    c.hidden = 128
    c.layers = 6
    c.heads = 4
    c.kv_heads = 4                    # llama only
    c.intermediate = 512              # llama; mixtral: each expert's (gpt2 uses 4 * hidden)
    c.experts = 8                     # mixtral only: experts per layer, experts_per_token of them routed per token
    c.experts_per_token = 2
    # The router's load-balancing loss weight: 0.01 as the Switch Transformer (Fedus et al. 2021) trains with from
    # scratch (transformers' Mixtral default, 0.001, is for fine-tuning a balanced model).
    c.router_aux_loss_coef = 0.01
    # "pooled": every layer's tokens pooled before the loss is formed, as transformers' Mixtral computes it (layers
    # favouring different experts cancel); "per_layer": each layer's loss, averaged, as the Switch Transformer.
    c.balance = "pooled"
    c.seq_len = 256
    c.batch_size = 16
    c.steps = 1500
    c.lr = 3e-3
    c.warmup = 100
    c.weight_decay = 0.1
    c.clip = 1.0
    c.eval_every = 250
    c.eval_windows = 64
    c.checkpoint_every = 250
    c.seed = 0
    c.halt_at = 0                     # stop after this step as if preempted (0 = never); re-run resumes
    c.mesh = "data:-1"
    if arg == "shakespeare_char":
        pass
    elif arg in ("stories_llama", "stories_moe"):
        # A matched pair: the same tokenizer, tokens, schedule, attention and width; the Mixtral's 8 experts of
        # 172 with 2 routed per token multiply as many MLP weights per token as the Llama's one MLP of 344.
        c.arch = "mixtral" if arg == "stories_moe" else "llama"
        c.tokenizer = "stories260k"
        c.corpus = "tinystories"
        c.doc_split = "stories"
        c.hidden = 128
        c.layers = 5
        c.heads = 8
        c.kv_heads = 4
        c.intermediate = 172 if arg == "stories_moe" else 344
        c.lr = 2e-3
        # The TinyStories text here holds 341k training tokens: at 16 × 256 tokens a step the dense model's
        # held-out loss is lowest near step 750 of a 1,500-step run (2.137 nats; 2.273 at 1,500, where its training
        # loss, 0.98, says it memorised the text), so the pair trains 750 steps (9 passes).
        c.steps = 750
    elif arg in ("smoke", "smoke_moe"):
        c.hidden = 32
        c.layers = 2
        c.heads = 2
        c.seq_len = 32
        c.batch_size = 4
        c.steps = 6
        c.warmup = 2
        c.eval_every = 3
        c.eval_windows = 4
        c.checkpoint_every = 3
        if arg == "smoke_moe":
            c.arch = "mixtral"
            c.kv_heads = 2
            c.intermediate = 16
            c.experts = 4
    else:
        raise ValueError(f"configs/train_lm.py: unknown variant {arg!r}; use shakespeare_char, stories_llama, "
                         "stories_moe, smoke or smoke_moe")
    return c
