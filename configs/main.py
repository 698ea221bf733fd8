r"""The README's main job: inspect a causal LM, measure its held-out perplexity, then run the
critical weight analysis (configs/esa.py, variant ``esa_variant``) into <workdir>/esa.

  python -m launch.main                                   # stories260K on TinyStories
  python -m launch.main --config configs/main.py:smoke    # a few windows, for tests
  python -m launch.main --config.corpus=tinyshakespeare --workdir runs/x
"""

import ml_collections


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = "stories260k"     # a directory, or a short name: stories260k, minilm
    c.corpus = "tinystories"         # wa.data.text.CORPORA name or a text file
    c.doc_split = "stories"          # how the corpus splits into documents (each gets BOS);
    #                                  see wa.data.text.documents
    c.seq_len = 512                  # window length; stories260K was trained at 512
    c.batch_size = 8
    c.max_windows = 0                # 0 = every window of the corpus
    c.mesh = "data:1,fsdp:-1"
    c.dtype = "float32"
    c.sample_tokens = 64             # greedy continuation of BOS shown in the report (0 = none)
    c.esa_variant = "stories260k"    # configs/esa.py variant run after the perplexity ("" = skip)
    if arg == "smoke":
        c.max_windows = 4
        c.seq_len = 128
        c.batch_size = 2
        c.sample_tokens = 8
        c.esa_variant = ""
    elif arg != "default":
        raise ValueError(f"configs/main.py: unknown variant {arg!r}; use default or smoke")
    return c
