r"""The computational roles of critical weights: heads' attention patterns, neurons' top activations, knowledge
localisation by token category.

  python -m launch.roles --config configs/roles.py:stories260k --workdir runs/roles-stories260k
  python -m launch.roles --config configs/roles.py:smollm2 --workdir runs/roles-smollm2
  python -m launch.roles --config configs/roles.py:smoke --workdir /tmp/roles                    # seconds, for tests

Every ESA field applies (``configs/esa.py``): the model, the scores, the top-k the localisation zeroes, the held-out
windows the roles are read on.
"""

import ml_collections

from configs import esa


def get_config(arg: str = "stories260k") -> ml_collections.ConfigDict:
    variant, *flags = arg.split(",")
    if variant not in ("stories260k", "smollm2", "smoke"):
        raise ValueError(f"configs/roles.py variant {variant!r}: expected stories260k, smollm2 or smoke")
    c = esa.get_config(variant)
    c.seeds = "0"
    c.metric = "magnitude,grad_x_weight,grad_squared,act_mag"
    c.stability_check = False
    c.spectral = False
    c.roles_top = 100      # each score's highest-scoring weights given a role
    c.roles_units = 8      # units listed per score in the report
    c.roles_random = 3     # random-k sets beside the top-k in the localisation
    c.roles_facts = False  # short factual prompts (roles.FACTS): for models that may know facts
    if variant == "stories260k":
        c.eval_windows = 32
    elif variant == "smollm2":
        c.metric = "magnitude,grad_x_weight,grad_squared"
        c.max_samples = 8
        c.eval_windows = 16
        c.roles_random = 2
        c.roles_facts = True
    elif variant == "smoke":
        c.metric = "magnitude,grad_x_weight"
        c.roles_top = 20
        c.roles_random = 1
        c.roles_facts = True   # the code path (stories260K knows no facts)
    return c
