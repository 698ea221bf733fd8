r"""Sparse fine-tuning on critical weights: adapt a pretrained LM to a new corpus training only a chosen set.

  python -m launch.finetune --config configs/finetune.py:stories260k --workdir runs/finetune-stories
  python -m launch.finetune --config configs/finetune.py:smoke --workdir /tmp/finetune     # seconds, for tests

``methods``: ``topk:<score>`` (the k highest ESA scores on the target corpus; ``topk:grad_squared`` is the FISH
mask), ``bottom:<score>``, ``random``, ``full``, ``lora`` (rank matched to k); protection of the source model's
top-k of a score on source text: ``freeze:<score>``, ``ewc:<score>``; ``fractions``: k as a share of the
weight-matrix entries (``param_filter``).
"""

import ml_collections


def get_config(arg: str = "stories260k") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "stories260k"
    c.source = "tinystories"              # the corpus the model was trained on: forgetting is measured here
    c.source_split = "stories"
    c.target = "tinyshakespeare"          # the corpus it is adapted to
    c.target_split = "blank_lines"
    c.val_fraction = 0.1                  # last documents of each corpus held out
    c.metrics = "grad_squared,grad_x_weight,magnitude,act_mag"
    c.methods = ("topk:grad_squared,topk:grad_x_weight,topk:magnitude,topk:act_mag,random,bottom:grad_squared,"
                 "lora,full,freeze:grad_x_weight,ewc:grad_x_weight")
    c.ewc_lambda = 100.0                  # EWC's λ on the Fisher normalised to mean 1 over the protected set
    c.fractions = "0.001,0.003,0.01,0.03,0.1"
    c.param_filter = r"kernel$"
    c.steps = 100                         # 100 × 8 × 256 = 205k target tokens (~1 min per run on 2 CPU cores)
    c.warmup = 10
    c.batch_size = 8
    c.seq_len = 256
    c.lr = 3e-3
    c.weight_decay = 0.0
    c.lora_alpha = 1.0                    # LoRA's scale α / r (α = r keeps the update's scale fixed across ranks)
    c.score_windows = 32                  # target windows the ESA scores are computed on
    c.eval_windows = 32
    c.seed = 0
    if arg == "smoke":
        c.methods = "topk:grad_squared,random,lora,full,freeze:grad_squared,ewc:grad_squared"
        c.metrics = "grad_squared"
        c.fractions = "0.01,0.1"
        c.steps = 6
        c.warmup = 1
        c.batch_size = 2
        c.seq_len = 64
        c.score_windows = 2
        c.eval_windows = 2
    elif arg != "stories260k":
        raise ValueError(f"configs/finetune.py variant {arg!r}: expected stories260k or smoke")
    return c
