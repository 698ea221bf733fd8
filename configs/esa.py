r"""Critical weight analysis (ESA): score every weight, pick the top-k, prove they matter.

  python -m launch.esa --config configs/esa.py:stories260k --workdir runs/esa
  python -m launch.esa --config configs/esa.py:smoke --workdir /tmp/esa        # seconds, for tests
  python -m launch.esa --config configs/esa.py:minilm --workdir runs/esa-minilm
  python -m launch.esa --config configs/esa.py:shakespeare_char --workdir runs/esa-shakespeare
  python -m launch.esa --config configs/esa.py:smollm2 --workdir runs/esa-smollm2   # ~15 min on 2 CPU cores
  python -m launch.esa --config configs/esa.py:gemma3 --workdir runs/esa-gemma3     # ~26 min on 2 CPU cores
  python -m launch.esa --config configs/esa.py:stories_moe --workdir runs/esa-moe    # after launch.train_lm's pair
  python -m launch.esa --config configs/esa.py --config.metric=grad_x_weight,grad_squared \
      --config.perturb=sign_flip,gauss_noise --config.perturb_scale=0.25,0.5,1.0

Lists (metric, seeds, perturb, perturb_scale, controls) are comma-separated strings or tuples.
"""

import ml_collections

METRICS = "magnitude,grad_x_weight,grad_squared,taylor_squared,hutchinson_diag,act_mag"


def get_config(arg: str = "stories260k") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "stories260k"           # checkpoint dir, or stories260k / minilm
    c.corpus = "tinystories"          # wa.data.text.CORPORA name or a text file
    c.doc_split = "stories"           # wa.data.text.documents
    c.heldout_fraction = 0.2          # last documents: perplexity; the rest: calibration
    c.metric = METRICS
    c.mode = "per_layer"              # per_layer (k per weight matrix) or global
    c.topk = 0.002                    # count (>= 1) or fraction in (0, 1) of each matrix / of all
    c.param_filter = r"kernel$"       # which tensors compete: weight matrices (not embeddings, norms)
    # Tensors outside param_filter that are scored in the same passes and reported apart (the token embedding,
    # norm weights; "" = none): their own top-k by vocabulary row, the model-wide top-k with them competing,
    # their mean score per weight, and their top-k perturbed against random-k (wa/esa/apart.py says why apart).
    c.apart = r"embed|norm|/ln_"      # Llama/Gemma names, and GPT-2's wte, wpe, ln_1, ln_2, ln_f
    # Calibration sequences per seed (seeds draw disjoint sets): 64 × 255 ≈ 16k tokens, where per-window
    # grad×weight's top-0.2% sets first agree across seeds at Jaccard > 0.4 on stories260K.
    c.max_samples = 64
    c.window_chunk = 8                # per-window gradients computed this many windows at a time
    c.seq_len = 256
    c.batch_size = 8
    c.eval_windows = 32               # held-out windows for perplexity
    c.eval_corpus = ""                # a whole other text for perplexity instead of corpus's last documents
    c.seeds = "1337,123,999"          # each changes calibration batches, probes and random-k
    c.probes = 4                      # Hutchinson probes per batch
    c.probe_chunk = 4                 # probes vmapped together
    c.stability_check = True          # Jaccard of top-k across seeds
    c.perturb = "sign_flip"           # sign_flip, gauss_noise, zero, bit_flip
    c.perturb_scale = "0.25,0.5,1.0"  # doses; several -> dose-response curve
    c.perturb_prob = 0.0              # bit_flip: per-bit flip probability when bit_flip_bits is empty
    c.bit_flip_bits = "30"            # bit_flip: bits to flip (30: float32 exponent MSB; 14 for bfloat16)
    c.noise_ref = "layer_std"         # gauss_noise scale relative to the layer's std, or "weight" (|w|)
    c.controls = "random_k,bottom_k"
    c.random_draws = 8                # random-k draws per seed (the null distribution)
    c.control_doses = "all"           # controls at every dose, or "largest": at each perturbation's largest
                                      # dose only (the headline test's); the top-k is measured at every dose
    c.perturb_group = 8               # perturbed parameter sets evaluated per compiled call, ...
    # ... one after another inside it ("map") or vmapped ("vmap"); "serial" evaluates one set per call, so one
    # perturbed copy of the scored weights exists at a time instead of 2 × perturb_group (the sets and their
    # stack). On 2 CPU cores the forward pass is already compute-bound: vmap measured 2.7x slower than map, map
    # as fast as one call per set (experiments/bench_perturb.py); vmap is for accelerators, where one small
    # model leaves the device idle.
    c.perturb_batching = "map"
    c.dtype = "float32"               # float32 or bfloat16 parameters
    # Remove this fraction of the lowest-saliency weights, or N of every M consecutive inputs of each row (N:M,
    # the 2:4 pattern sparse tensor cores run) ("" = skip) ...
    c.prune_sparsity = "0.3,0.5,0.7,2:4"
    # ... of every matrix, of the whole model and / or of each output row (Wanda's comparison group)
    c.prune_modes = "per_layer,global,per_output"
    c.prune_sparsegpt = True          # SparseGPT (OBS reconstruction from the calibration inputs) beside them
    c.prune_owl = False               # every pruner also at OWL's outlier-weighted layer sparsities (Yin et al. 2024)
    c.super_weights = True            # Yu et al. 2024 activation-spike candidates, zeroed vs largest |w| ...
    c.super_weights_each = 0          # ... this many (strongest spikes first) also one at a time; 0 = all
    c.bos = True                      # each document starts with BOS (False for models trained without one)
    c.window_bos = False              # every window starts with BOS instead (with bos False; Gemma needs one)
    # Fault tolerance: flip one bit (by position) of every top-k weight of these metrics (first seed) and of
    # random-k draws, in the weights' float32 and bfloat16 encodings ("" = skip).
    c.fault_metrics = "magnitude,grad_x_weight"
    c.fault_bits_float32 = "31,30,29,27,23,22,16"   # sign, exponent MSB..LSB, mantissa MSB, a low mantissa bit
    c.fault_bits_bfloat16 = "15,14,13,11,7,6,0"
    c.fault_random_draws = 4
    c.architecture = True             # where the global top-k land by layer, component and role
    c.spectral = True                 # WeightWatcher's data-free metrics per matrix beside the scores (an SVD each)
    c.save_plots = True
    c.mesh = "data:1,fsdp:-1"
    if arg == "stories260k":
        pass
    elif arg == "dose":
        c.metric = "grad_x_weight,magnitude"
        c.perturb = "sign_flip,gauss_noise"
        c.perturb_scale = "0.25,0.5,1.0,2.0"
    elif arg == "smoke":
        c.apart = ""
        c.metric = "magnitude,grad_x_weight,grad_squared,hutchinson_diag,act_mag"
        c.max_samples = 4
        c.seq_len = 64
        c.batch_size = 2
        c.eval_windows = 4
        c.seeds = "1,2"
        c.probes = 2
        c.probe_chunk = 2
        c.random_draws = 2
        c.perturb_scale = "0.5,1.0"
        c.prune_sparsity = "0.5,2:4"
        c.fault_metrics = "magnitude"
        c.fault_bits_float32 = "31,30"
        c.fault_bits_bfloat16 = "14"
        c.fault_random_draws = 2
        c.perturb_group = 4
    elif arg == "shakespeare_char":
        # wa's own 1.25M-parameter character-level GPT-2 (launch.train_lm); its validation split is
        # the last 10% of the Tiny Shakespeare paragraphs, so that is the held-out part here too.
        c.model = "shakespeare_char"
        c.corpus = "tinyshakespeare"
        c.doc_split = "blank_lines"
        c.heldout_fraction = 0.1
    elif arg in ("stories_moe", "stories_llama"):
        # The matched pair launch.train_lm trains (configs/train_lm.py:stories_moe and :stories_llama): a Mixtral
        # (8 experts, 2 per token) and a dense Llama with as many weights multiplied per token, same tokens and
        # schedule. Held out: the last 10% of TinyStories documents, the part neither was trained on.
        c.model = f"runs/{arg}/hf"
        c.heldout_fraction = 0.1
    elif arg == "minilm":
        c.model = "minilm"
        c.apart = ""
        c.corpus = "wikitext2_valid"
        c.doc_split = "blank_lines"
        c.seq_len = 128
        c.max_samples = 16
        c.eval_windows = 32
    elif arg in ("smollm2", "gemma3"):
        # SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) on WikiText-2 validation text, sized to run
        # in under 15 minutes on 2 CPU cores: 134.5M weight-matrix entries (the layers' 106M and the file's untied
        # 28M output matrix), 8 windows' per-window gradients in ~14-19 s, one held-out evaluation of 2k tokens in
        # ~4.2 s, and 128 evaluations in all (the report's "Where the time went"). Hutchinson (two extra
        # gradients per probe) is left out; so OBD with the Hessian diagonal is too. Fewer evaluations than the
        # defaults: the controls at the largest dose only, pruning at 50% and 70%, three super-weight candidates one
        # at a time, three bit positions per encoding.
        # Gemma-3-270M (base; Q4_K_M GGUF, dequantized to float32; Gemma Terms of Use) takes the same stages and
        # sizes, so the two set side by side (~26 minutes: its 262,144-row tied head doubles an evaluation). Its
        # embedding (168M of 268M weights) is scored in the same gradient pass but reported apart (``apart``).
        c.model = arg
        c.corpus = "wikitext2_valid"
        c.doc_split = "blank_lines"
        c.bos = False                 # SmolLM2's tokenizer adds none (add_bos_token false in the file) ...
        c.window_bos = arg == "gemma3"  # ... and Gemma is trained always to see BOS first
        c.metric = "magnitude,grad_x_weight,grad_squared,taylor_squared,act_mag"
        c.max_samples = 24            # 3 seeds × 24 windows × 255 tokens: 18k calibration tokens
        c.window_chunk = 2            # 2 per-window gradients of the whole model at a time
        c.eval_windows = 8
        c.random_draws = 3
        c.control_doses = "largest"   # the controls where the test is read; the top-k at every dose
        c.perturb_batching = "serial"  # one perturbed copy of the ~100M scored weights at a time (host memory)
        c.prune_sparsity = "0.5,0.7"
        c.super_weights_each = 3
        c.fault_bits_float32 = "31,30,22"
        c.fault_bits_bfloat16 = "15,14,6"
        c.fault_random_draws = 2
    else:
        raise ValueError(f"configs/esa.py: unknown variant {arg!r}; use stories260k, dose, smoke, minilm, "
                         "shakespeare_char, smollm2, gemma3, stories_moe or stories_llama")
    return c
