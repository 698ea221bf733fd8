r"""Train a small causal LM (HF Flax GPT-2 or Llama) and save it with save_pretrained.

  python -m launch.train_lm --config configs/train_lm.py:shakespeare_char --workdir runs/shakespeare_char
  python -m launch.train_lm --config configs/train_lm.py:smoke --workdir /tmp/lm    # seconds, for tests

Re-running with the same workdir resumes from the last orbax checkpoint.
"""

import ml_collections


def get_config(arg: str = "shakespeare_char") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.arch = "gpt2"                   # gpt2 or llama (HF Flax classes)
    c.tokenizer = "bytes"             # bytes, gpt2, or a SentencePiece .model / checkpoint dir
    c.corpus = "tinyshakespeare"
    c.doc_split = "blank_lines"
    c.val_fraction = 0.1              # last documents, never trained on
    c.hidden = 128
    c.layers = 6
    c.heads = 4
    c.kv_heads = 4                    # llama only
    c.intermediate = 512              # llama only (gpt2 uses 4 * hidden)
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
    elif arg == "stories_llama":
        c.arch = "llama"
        c.tokenizer = "stories260k"
        c.corpus = "tinystories"
        c.doc_split = "stories"
        c.hidden = 128
        c.layers = 5
        c.heads = 8
        c.kv_heads = 4
        c.intermediate = 344
        c.lr = 2e-3
    elif arg == "smoke":
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
    else:
        raise ValueError(f"configs/train_lm.py: unknown variant {arg!r}; use shakespeare_char, stories_llama "
                         "or smoke")
    return c
