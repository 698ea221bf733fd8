r"""One prepared check of wa on an accelerator: the figures only a GPU can give, in one command of at most ~8 minutes
on one H100, written as device_check.json and device_check.md (with the device's name) to --out.

  python experiments/device_check.py --out runs/device                 # on the GPU machine
  python experiments/device_check.py --smoke --out /tmp/device         # every section at toy sizes, on CPU (tests)

Sections, in this order (each timed, each failure recorded in its own entry and the rest run on):

- ``llama8b``: a random-init Llama-3.1-8B in bf16 on one device: the per-window gradient step's tokens/s and
  model-FLOPs utilisation (6N + 12·L·H·Q·T FLOPs per token, PaLM's count, against the chip's dense bf16 peak;
  MaxText reports about 50-60% for Llama training on H100), the Hutchinson HVP step over one gradient, and whether
  ESA's three per-window gradient scores (grad×weight, grad², (g·w)²) fit at once; if not, one at a time;
- ``steps``: the device paths of the steps that read a whole model's scores (model-wide top-k, per-matrix top-k,
  heavy-tail histograms, 50% pruning masks) timed on random scores of Llama-3.1-8B's matrix shapes;
- ``plan``: Llama-3.1-8B's gradient, HVP and capture steps compiled for one device (bf16, 1 x 2048 tokens): XLA's
  compiled memory analysis, which the CPU plan's estimate stands in for (with 8 devices, also the 8-device FSDP
  plan's per-device figures);
- ``esa``: SmolLM2-135M's whole ESA run (``configs/esa.py:smollm2``; 887 s on 2 CPU cores) wall time (where the
  SmolLM2 package is not installed, a random-init model of its shapes: ``_stand_in_smollm2``);
- ``zoo``: 64 small CNNs trained at once against one at a time on 8x8 digits, models per second (one epoch each);
- ``learners``: one training epoch of each learner on a zoo (``--zoo``, or the smoke zoo built here);
- ``tests``: the in-process tests of ESA's scores, selection and perturbation and the learners' quick lane, run by
  pytest on this device (at most 150 s; the multi-device tests force CPU devices and stay CPU checks).

``--smoke`` swaps every model for a toy (a 2-layer Llama of width 64, ``configs/esa.py:smoke`` with two scores and
one seed, 4 CNNs, one learner) so the whole script runs on a laptop CPU in about two minutes.
"""

import json
import os
import platform
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", None, "Folder for device_check.json and device_check.md.", required=True)
flags.DEFINE_bool("smoke", False, "Toy sizes: the whole script in about two minutes on CPU.")
flags.DEFINE_list("skip", [], "Sections to leave out (tests, plan, llama8b, esa, zoo, learners).")
flags.DEFINE_string("zoo", "", "Zoo store the learners' epoch is timed on (default: the smoke zoo, built in --out).")
FLAGS = flags.FLAGS

# The figures only a GPU gives first: a run cut off by its time limit keeps those (the JSON is rewritten after
# every section), and the test subset, which CPU runs also cover, comes last.
SECTIONS = ("llama8b", "steps", "plan", "esa", "zoo", "learners", "tests")
# Dense bf16 peak FLOP/s by device kind (NVIDIA's data sheets, SXM parts, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# In-process tests on the default device (the multi-device ones force 8 CPU devices, which a one-GPU machine runs
# on its CPU, so they are left to CPU runs): scores, selection and perturbation, the learners' quick lane.
TESTS = ["tests/test_scores.py", "tests/test_select_perturb.py", "tests/test_learners.py", "-m", "not slow"]
TESTS_TIMEOUT = 150   # seconds: the section may not eat the check's 8 minutes
SMOKE_TESTS = ["tests/test_select_perturb.py::test_per_layer_topk_ties_go_to_the_lower_index"]


def _peak(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def _timed(fn, repeat: int = 3) -> float:
    """Median seconds of ``fn()`` (blocked on), after one call that compiles."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def device_info() -> dict:
    d = jax.devices()[0]
    stats = d.memory_stats() or {}
    return {"platform": d.platform, "kind": d.device_kind, "devices": jax.device_count(),
            "memory_bytes": stats.get("bytes_limit"), "jax": jax.__version__, "host": platform.node()}


def tests(smoke: bool) -> dict:
    args = SMOKE_TESTS if smoke else TESTS
    t = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
                           timeout=TESTS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"args": args, "returncode": "timeout", "summary": f"stopped after {TESTS_TIMEOUT} s",
                "progress": out[-300:], "seconds": round(time.time() - t, 1)}
    lines = r.stdout.strip().splitlines()
    failed = [x for x in lines if x.startswith("FAILED")]
    return {"args": args, "returncode": r.returncode, "summary": lines[-1] if lines else r.stderr[-500:],
            "failed": failed[:20], "seconds": round(time.time() - t, 1)}


def _llama_config(smoke: bool):
    from configs import plan as plan_configs
    from wa.esa import plan
    return plan.hf_config(plan_configs.TINY if smoke else plan_configs.LLAMA3_8B)


def plan_section(smoke: bool) -> dict:
    from wa import parallel
    from wa.esa import plan
    cfg = _llama_config(smoke)
    seq = 64 if smoke else 2048
    out = {}
    meshes = [("one_device", 1)] + ([("fsdp_8", 8)] if jax.device_count() >= 8 else [])
    for name, n in meshes:
        mesh = parallel.make_mesh("data:1,fsdp:-1", jax.devices()[:n])
        out[name] = plan.plan(cfg, mesh, n, seq, scan=True, remat="full", hvp_probes=1, capture=not smoke)
    if "fsdp_8" not in out:
        out["fsdp_8"] = f"needs 8 devices; this machine has {jax.device_count()}"
    return out


def llama8b(smoke: bool) -> dict:
    from wa.esa import scores
    from wa.models import checkpoint
    from wa.parallel import mesh as mesh_lib
    from wa.parallel import rules as rules_lib
    cfg = _llama_config(smoke)
    seq = 64 if smoke else 2048
    model, family = checkpoint.build_model(cfg, jnp.bfloat16, scan=True, remat="full")
    mesh = mesh_lib.make_mesh("data:1,fsdp:-1", jax.devices()[:1])
    shardings = rules_lib.shardings_for(model.params_shape_tree, family.partition_rules, mesh)
    init = jax.jit(lambda k: jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.init_weights(k, (1, 8))),
                   out_shardings=shardings)
    params = init(jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    loaded = checkpoint.Loaded(model, params, cfg, family, mesh, shardings, "", [])
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    loss = jax.jit(jax.value_and_grad(lambda p: family.loss(model, p, batch)))
    t_grad = _timed(lambda: loss(params))
    tokens_per_s = seq / t_grad
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    flops_per_token = 6 * n_params + 12 * layers * h * seq
    kind = jax.devices()[0].device_kind
    peak = _peak(kind)
    out = {"params": n_params, "seq_len": seq, "gradient_seconds": round(t_grad, 4),
           "tokens_per_second": round(tokens_per_s, 1), "model_flops_per_token": flops_per_token,
           "mfu": round(flops_per_token * tokens_per_s / peak, 4) if peak else None,
           "peak_flops": peak}
    hvp = jax.jit(lambda p, k: scores.hvp_diag_chunk(lambda q: family.loss(model, q, batch), p, k, 1, jnp.ones(1)))
    out["hvp_over_gradient"] = round(_timed(lambda: hvp(params, jax.random.key(1))) / t_grad, 3)

    def per_window(names):
        cal = scores.Calibration(loaded, [batch], jax.random.key(0), progress=False, window_chunk=1)
        t = time.perf_counter()
        for _, acc in scores._window_sums(params, cal, names):
            jax.block_until_ready(acc)
        return round(time.perf_counter() - t, 2)

    three = ("grad_x_weight", "grad_squared", "taylor_squared")
    try:
        out["three_scores_at_once_seconds"] = per_window(three)
        out["three_scores_fit"] = True
    except Exception as e:   # XlaRuntimeError RESOURCE_EXHAUSTED: the configuration that fits is one at a time
        out["three_scores_fit"] = False
        out["three_scores_error"] = str(e).splitlines()[0][:300]
        out["one_at_a_time_seconds"] = {n: per_window((n,)) for n in three}
    return out


def _stand_in_smollm2(out_dir: str) -> str:
    """A random-init Llama of SmolLM2-135M's shapes (30 layers of width 576, 9 query and 3 key-value heads, MLP 1,536,
    untied head, as the GGUF wa reads) with GPT-2's tokenizer (50,257 rows against 49,152: 2% more head), saved as
    an HF checkpoint: the GGUF (98 MB) cannot travel to a device machine (64 MiB), and ESA's cost does not depend on
    the weights' values."""
    import transformers

    from wa.data import tokenizers
    from wa.models import checkpoint
    path = os.path.join(out_dir, "smollm2_shapes")
    cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model, _ = checkpoint.build_model(cfg)
    params = jax.jit(lambda k: model.init_weights(k, (1, 8)))(jax.random.key(0))
    checkpoint.save_torch_layout(cfg, params, path)
    with open(os.path.join(path, tokenizers.MARKER), "w") as f:
        json.dump({"type": "gpt2"}, f)
    return path


def steps(smoke: bool) -> dict:
    """The steps that read a whole model's scores, their device paths timed on random scores of Llama-3.1-8B's
    matrix shapes (7.5B float32 scores, 30 GB on the device)."""
    from experiments import bench_host_steps
    return bench_host_steps.measure("tiny" if smoke else "llama31_8b", host=False)


def esa(smoke: bool, out_dir: str) -> dict:
    from configs import esa as esa_configs
    from wa.data import paths
    from wa.esa import job
    cfg = esa_configs.get_config("smoke" if smoke else "smollm2")
    model = cfg.model
    if smoke:   # the run's stages, fewer of each
        cfg.update(metric="magnitude,grad_x_weight", seeds="1", fault_metrics="", prune_sparsity="0.5")
    else:
        try:
            paths.checkpoint("smollm2")
        except Exception:   # the SmolLM2 package is not installed here: the same shapes, random weights
            cfg.model = model = _stand_in_smollm2(out_dir)
    t = time.time()
    _, summary = job.run(cfg, os.path.join(out_dir, "esa"), overwrite=True)
    return {"config": "configs/esa.py:" + ("smoke" if smoke else "smollm2"), "model": model,
            "seconds": round(time.time() - t, 1),
            # The whole SmolLM2 analysis on 2 CPU cores (README: 887 s wall).
            "cpu_reference_seconds": None if smoke else 887, "base_ppl": summary.get("ppl_base")}


def zoo(smoke: bool) -> dict:
    from wa.data import images
    from wa.zoo import archs
    from wa.zoo import population as pop_lib
    d = images.load("digits")
    n = 4 if smoke else 64
    x = d.x_train
    pop = pop_lib.Population(archs.Arch("cnn", 3, 16, "relu"), 10, d.shape, len(x), batch_size=32)

    def members(k):
        hp = pop_lib.hparams_arrays([dict(optimizer="adam", lr=1e-3, weight_decay=0.0, dropout=0.0, augment=0)] * k)
        keys = np.asarray(jax.vmap(jax.random.PRNGKey)(np.arange(k)))
        params = pop.shard(pop.init(keys, ["he_normal"] * k, np.ones(k)))
        opt = pop.shard(pop.opt_init(params))
        mask, labels = np.ones((k, len(x)), bool), np.tile(d.y_train.astype(np.int32), (k, 1))
        return params, opt, *pop.shard((keys, hp, mask, labels))

    xs = pop.replicate(x)

    def epoch(state):
        # The step donates parameters, optimizer state and keys: each epoch continues from the last one's.
        state[0], state[1], state[2], loss = pop.epoch(*state, xs)
        return loss

    together, alone = list(members(n)), list(members(1))
    t_all = _timed(lambda: epoch(together), repeat=1)
    t_one = _timed(lambda: epoch(alone), repeat=1)
    return {"models": n, "epoch_seconds_together": round(t_all, 3), "epoch_seconds_one": round(t_one, 3),
            "models_per_second_together": round(n / t_all, 2), "models_per_second_one_at_a_time": round(1 / t_one, 2),
            "speedup": round(n * t_one / t_all, 2)}


def learners(smoke: bool, out_dir: str, zoo_path: str) -> dict:
    from configs import probe as probe_configs
    from wa.learners import probe
    if not zoo_path:
        from configs import zoo as zoo_configs
        from wa.zoo import build
        b = build.Builder(zoo_configs.get_config("smoke"), os.path.join(out_dir, "zoo"))
        b.run(progress=False)
        zoo_path = os.path.join(out_dir, "zoo", "zoo")
    out = {"zoo": zoo_path}
    # At smoke sizes one learner shows the section runs (each structure learner compiles for a minute on CPU).
    for name in ("stats_mlp",) if smoke else ("stats_mlp", "nwpa", "weightnet", "nfn"):
        c = probe_configs.get_config(name + (",smoke" if smoke else ""))
        c.zoo = zoo_path
        c.train.epochs = 1
        c.data.final_only = True
        t = time.time()
        r = probe.run(c, os.path.join(out_dir, "learners", name), overwrite=True, progress=False)
        out[name] = {"seconds_one_epoch_with_setup": round(time.time() - t, 2), "timing": r.get("timing")}
    return out


# The figures each section's row shows (dotted paths into its figures).
SHOWN = {"tests": ("summary",),
         "plan": ("one_device.n_params", "one_device.peak_estimate_bytes_per_device",
                  "one_device.temp_bytes_per_device", "one_device.hvp.peak_estimate_bytes_per_device",
                  "fsdp_8.peak_estimate_bytes_per_device"),
         "llama8b": ("params", "tokens_per_second", "mfu", "hvp_over_gradient", "three_scores_fit",
                     "three_scores_at_once_seconds", "one_at_a_time_seconds"),
         "steps": ("shapes", "steps.global_topk_device.seconds", "steps.heavy_tail_device.seconds",
                   "steps.prune_masks_device.seconds", "steps.per_layer_topk.seconds", "gini_error_bound"),
         "esa": ("config", "model", "seconds", "cpu_reference_seconds"),
         "zoo": ("models", "models_per_second_together", "models_per_second_one_at_a_time", "speedup"),
         "learners": ("stats_mlp.seconds_one_epoch_with_setup", "nwpa.seconds_one_epoch_with_setup",
                      "weightnet.seconds_one_epoch_with_setup", "nfn.seconds_one_epoch_with_setup")}


def _get(d, path: str):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def markdown(res: dict) -> str:
    d = res["device"]
    lines = [f"# wa on {d['kind']} ({d['platform']}, {d['devices']} device(s))", "",
             f"jax {d['jax']}; {'smoke sizes' if res['smoke'] else 'full sizes'}; {res['seconds']:.0f} s in all.", "",
             "| section | seconds | figures |", "|---|---|---|"]
    for name in SECTIONS:
        s = res["sections"].get(name)
        if s is None:
            continue
        figs = s.get("error") or ", ".join(f"{k} {_get(s['figures'], k)}" for k in SHOWN[name]
                                           if _get(s["figures"], k) is not None)
        lines.append(f"| {name} | {s['seconds']:.1f} | {figs} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    t0 = time.time()
    res = {"device": device_info(), "smoke": FLAGS.smoke, "sections": {}}
    jobs = {"tests": lambda: tests(FLAGS.smoke), "plan": lambda: plan_section(FLAGS.smoke),
            "llama8b": lambda: llama8b(FLAGS.smoke), "esa": lambda: esa(FLAGS.smoke, FLAGS.out),
            "steps": lambda: steps(FLAGS.smoke),
            "zoo": lambda: zoo(FLAGS.smoke), "learners": lambda: learners(FLAGS.smoke, FLAGS.out, FLAGS.zoo)}
    for name in SECTIONS:
        if name in FLAGS.skip:
            continue
        t = time.time()
        try:
            res["sections"][name] = {"figures": jobs[name]()}
        except Exception as e:   # one section's failure is a figure too; the others still run
            res["sections"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                                     "traceback": traceback.format_exc()[-3000:]}
        res["sections"][name]["seconds"] = round(time.time() - t, 1)
        print(f"{name}: {res['sections'][name]['seconds']} s", flush=True)
        res["seconds"] = round(time.time() - t0, 1)
        # Written after every section, so a run cut off by its time limit keeps what it measured.
        with open(os.path.join(FLAGS.out, "device_check.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(FLAGS.out, "device_check.md"), "w") as f:
            f.write(markdown(res))
    failed = [n for n, s in res["sections"].items() if "error" in s or s["figures"].get("returncode", 0) != 0]
    print(json.dumps({"device": res["device"]["kind"], "seconds": res["seconds"], "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(main)
