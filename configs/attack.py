r"""Bit-flip attack search (progressive bit search, Rakin et al. 2019) against no-search controls, in float32,
bfloat16 and int8 (per-output-channel quantized, as deployed).

  python -m launch.attack --config configs/attack.py:stories260k --workdir runs/attack-stories260k
  python -m launch.attack --config configs/attack.py:smollm2 --workdir runs/attack-smollm2
  python -m launch.attack --config configs/attack.py:smoke --workdir /tmp/attack                 # seconds, for tests

Every ESA field applies (``configs/esa.py``): the model, the attacked matrices (``param_filter``), the attacker's
text (the calibration windows of the first seed) and the held-out windows the threshold is measured on. The scores
in ``metric`` order the no-search controls and say whether the attack picks ESA's critical weights.
"""

import ml_collections

from configs import esa


def get_config(arg: str = "stories260k") -> ml_collections.ConfigDict:
    variant, *flags = arg.split(",")
    if variant not in ("stories260k", "smollm2", "smoke"):
        raise ValueError(f"configs/attack.py variant {variant!r}: expected stories260k, smollm2 or smoke")
    c = esa.get_config(variant)
    c.seeds = "0"
    c.metric = "magnitude,grad_x_weight,grad_squared,act_mag"
    c.stability_check = False
    c.spectral = False
    c.attack_encodings = "float32,bfloat16,int8"
    c.attack_threshold = 10.0        # destroyed: held-out perplexity >= 10x the stored model's own
    c.attack_max_flips = 40          # the search's budget of flips
    c.attack_candidates = 4          # first-order candidates kept per matrix each step
    c.attack_exact = 8               # of which the best overall are evaluated exactly on the attacker's text
    c.attack_windows = 8             # the attacker's text: this many calibration windows
    c.attack_control_max = 4096      # the controls' most flips tried
    c.attack_random_draws = 3        # random orders for the random-weights control
    if variant == "stories260k":
        c.eval_windows = 16
    elif variant == "smollm2":
        c.metric = "magnitude,grad_x_weight,grad_squared"
        c.seq_len = 256
        c.max_samples = 8
        c.eval_windows = 8
        c.attack_windows = 4
        c.attack_control_max = 1024
        c.attack_random_draws = 2
    elif variant == "smoke":
        c.metric = "magnitude,grad_x_weight"
        c.attack_max_flips = 6
        c.attack_windows = 2
        c.attack_control_max = 64
        c.attack_random_draws = 1
    return c
