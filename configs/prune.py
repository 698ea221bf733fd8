r"""Pruning as the LLM-pruning papers measure it (SparseGPT, Wanda, OWL): one-shot, no retraining; calibration
windows of the model's context from a corpus; perplexity on the whole WikiText-2 test file in non-overlapping
windows; 50% and 70% unstructured sparsity and the 2:4 pattern.

  python -m launch.prune --config configs/prune.py:stories260k --workdir runs/prune-stories260k
  python -m launch.prune --config configs/prune.py:smollm2 --workdir runs/prune-smollm2        # an accelerator
  python -m launch.prune --config configs/prune.py:smollm2,cpu --workdir runs/prune-smollm2-cpu   # ~1 h
  python -m launch.prune --config configs/prune.py:smoke --workdir /tmp/prune                  # seconds, for tests

Every ESA field applies (``configs/esa.py``); the ones below set the protocol. ``save_pruned`` writes one pruned
model as an HF checkpoint (``<pruner>/<sparsity>/<mode>``, e.g. ``wanda/0.5/per_output``).
"""

import ml_collections

from configs import esa

PRUNERS = "magnitude,grad_x_weight,grad_squared,hutchinson_diag,act_mag"


def get_config(arg: str = "stories260k") -> ml_collections.ConfigDict:
    variant, *flags = arg.split(",")
    if variant not in ("stories260k", "smollm2", "smoke"):
        raise ValueError(f"configs/prune.py variant {variant!r}: expected stories260k, smollm2 or smoke")
    c = esa.get_config(variant)
    c.eval_corpus = "wikitext2_test"
    c.eval_windows = 0                # 0: every window of the test file
    c.seeds = "0"                     # one calibration set: pruning reads the first seed's scores
    c.metric = PRUNERS                # the scores the saliencies need (Taylor, OBD-Fisher, OBD-Hessian, Wanda)
    c.prune_sparsity = "0.5,0.7,2:4"
    c.prune_modes = "per_layer,per_output"
    c.prune_owl = True
    c.prune_sparsegpt = True
    c.save_pruned = ""
    c.stability_check = False
    c.spectral = False
    if variant == "stories260k":
        # Calibration: 128 windows of the model's full context (512) from TinyStories, its training corpus's
        # validation split, as the papers draw 128 × 2,048 tokens from C4.
        c.seq_len = 512
        c.max_samples = 128
        c.batch_size = 16
        c.window_chunk = 8
        c.probes = 4
    elif variant == "smollm2":
        # 128 windows of 2,048 tokens of WikiText-2 validation text (the training split is not vendored; the
        # test file is not among them).
        c.seq_len = 2048
        c.max_samples = 128
        c.batch_size = 4
        c.window_chunk = 1
        c.metric = "magnitude,grad_x_weight,grad_squared,act_mag"   # Hutchinson: two more gradients per probe
        c.doc_split = "none"          # one stream: WikiText articles are shorter than a window
        if "cpu" in flags:
            # Sized for 2 CPU cores (~1 h): 32 calibration windows of 512 tokens, the first 16 test windows (8k
            # tokens, ~40 s per pruned model there), the Hutchinson diagonal with one probe per window for
            # OBD-Hessian, one window at a time (4 windows' Hessian-vector products took more than 24 GiB).
            c.seq_len = 512
            c.batch_size = 1
            c.max_samples = 32
            c.eval_windows = 16
            c.metric = PRUNERS
            c.probes = 1
            c.probe_chunk = 1
    elif variant == "smoke":
        c.metric = "magnitude,act_mag"
        c.prune_sparsity = "0.5,2:4"
        c.eval_windows = 6
        c.max_samples = 4
    return c
