r"""Trigger-phrase backdoors fine-tuned into a population of language models, against clean twins: attack success,
ESA on clean against triggered text, and detectors' AUROC.

  python -m launch.backdoor --config configs/backdoor.py:stories260k --workdir runs/backdoor-stories260k
  python -m launch.backdoor --config configs/backdoor.py:smoke --workdir /tmp/backdoor              # for tests
"""

import ml_collections


def get_config(arg: str = "stories260k") -> ml_collections.ConfigDict:
    variant, *_ = arg.split(",")
    if variant not in ("stories260k", "smoke"):
        raise ValueError(f"configs/backdoor.py variant {variant!r}: expected stories260k or smoke")
    c = ml_collections.ConfigDict()
    c.model = "stories260k"
    c.corpus = "tinystories"
    c.doc_split = "stories"
    c.val_fraction = 0.2              # last documents: half calibration text, half held out
    c.param_filter = r"kernel$"       # the matrices the detectors and ESA read
    c.population = 10                 # backdoored models, each with a clean twin
    c.poison_fraction = 0.1           # fine-tuning documents that get the trigger and continuation
    c.steps = 100                     # full fine-tuning, as finetune.py's runs
    c.warmup = 10
    c.batch_size = 8
    c.seq_len = 256
    c.lr = 1e-3                       # continued training on the model's own corpus: gentler than adaptation
    c.weight_decay = 0.0
    c.seed = 0                        # model i fine-tunes with seed + i (its twin with the same)
    c.topk = 0.002                    # ESA's top-k per matrix (clean against triggered text)
    c.score_windows = 16
    c.eval_windows = 16
    c.trigger_windows = 16
    if variant == "smoke":
        c.population = 2
        c.steps = 4
        c.warmup = 1
        c.batch_size = 2
        c.seq_len = 64
        c.score_windows = 2
        c.eval_windows = 2
        c.trigger_windows = 2
        c.topk = 0.01
    return c
