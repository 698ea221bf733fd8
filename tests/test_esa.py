"""The ESA pipeline end to end, its config errors, and sharded = unsharded scores."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import esa as esa_configs
from tests import helpers
from wa import errors, models, runs
from wa.data import paths
from wa.esa import job, pipeline
from wa.parallel import rules as rules_lib

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _esa(tmp_path, *overrides, variant="smoke", env=None, runner=()):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", *runner, "launch.esa", "--config", f"configs/esa.py:{variant}",
                           "--workdir", str(tmp_path), *overrides], cwd=helpers.REPO, env=e, capture_output=True,
                          text=True, timeout=900)


def test_esa_smoke_writes_every_output(tmp_path):
    """Every stage and output, run as on an accelerator: the whole-model steps where the scores live, the model on
    two (CPU) devices; no score or weight tensor of the model is copied to the host whole. (Replicated over the
    two, data-parallel: a copy of a multi-device array is what the recorder sees, and XLA's in-process CPU
    collectives inside the steps' loops could stall on two cores; the 8-device sharded test covers sharded
    scores.)"""
    copies = tmp_path / "host_copies.json"
    r = _esa(tmp_path, "--config.metric=magnitude,grad_x_weight,act_mag", "--config.perturb=sign_flip,bit_flip",
             "--config.save_plots=True", "--config.control_doses=largest", "--config.apart=embed|norm",
             "--config.prune_owl=True", "--config.mesh=data:2,fsdp:1",
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "WA_DEVICE_STEPS": "1",
                  "WA_HOST_COPIES": str(copies)}, runner=("tests.host_copies",))
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.load(open(copies))["copies"]
    # The heavy-tail histograms (2^20 bins and 2^12 codes) come home; the superweight search's per-token
    # activations of one batch, (tokens, channels); nothing shaped like a kernel, an embedding or their scores.
    shapes = {(64, 64), (64, 32), (64, 172), (172, 64), (64, 512), (512, 64)}
    assert not [c for c in got if tuple(c[1]) in shapes], got
    assert any(c[1] == [1 << 20] for c in got), got
    s = json.load(open(tmp_path / "summary.json"))
    for k in ("model", "n_params", "metrics", "mode", "topk", "seeds", "ppl_base"):
        assert k in s
    assert s["n_params"] == 292_800 and s["metrics"] == ["magnitude", "grad_x_weight", "act_mag"]
    assert s["seeds"] == [1, 2] and s["ppl_base"] > 1
    # topk 0.002 per matrix: ceil(0.002 * n) for the 36 kernels of stories260K.
    sizes = [64 * 64, 64 * 32, 64 * 32, 64 * 64, 64 * 172, 64 * 172, 172 * 64] * 5 + [64 * 512]
    assert s["k_selected"] == sum(-(-2 * n // 1000) for n in sizes)
    for m in s["metrics"]:
        e = s["per_metric"][m]
        # Magnitude reads no data: every seed picks the same set, one sample under a perturbation that draws
        # nothing, and no stability across data.
        seeds = 2 if m != "magnitude" else 1
        assert e["reads_data"] == (m != "magnitude") and e["heavy_tail_ratio"] > 1
        assert 0 <= e["jaccard_mean"] <= 1 if seeds == 2 else np.isnan(e["jaccard_mean"])
        for kind in ("sign_flip", "bit_flip"):
            block = e["perturb"][kind]["1.0"]
            assert set(block) >= {"topk", "random_k", "bottom_k", "p_value_topk_vs_random"}
            assert len(block["topk"]["values"]) == seeds == len(block["bottom_k"]["values"])
            assert len(block["random_k"]["values"]) == 4
            # control_doses=largest: below the largest dose only the top-k (the dose-response curve).
            low = e["perturb"][kind]["0.5"]
            assert set(low) == {"topk"} and len(low["topk"]["values"]) == seeds
            lo, hi = block["topk"]["ci95"]
            assert lo <= block["topk"]["dppl_mean"] <= hi
        sign = e["perturb"]["sign_flip"]["1.0"]
        assert sign["topk"]["dppl_mean"] > sign["random_k"]["dppl_mean"] > 0
        # Flipping float32 bit 30 (the exponent's top bit) of weights below 2 makes them ~1e38:
        # the forward pass overflows, which counts as a destroyed model (ΔPPL = +inf).
        assert e["perturb"]["bit_flip"]["1.0"]["topk"]["dppl_mean"] == float("inf")
    counts = s["per_metric"]["act_mag"]["topk_counts"]
    assert sum(counts["component"].values()) == s["k_selected"] == sum(counts["layer"].values())
    assert counts["component"]["head"] == -(-2 * 64 * 512 // 1000)
    report = open(tmp_path / "report.md").read()
    assert "| top-k stable across seeds | Jaccard > 0.4 | magnitude |" not in report
    assert "| top-k stable across seeds | Jaccard > 0.4 | grad_x_weight |" in report
    assert "magnitude reads no data" in report and "largest dose" in report
    assert "`python -m launch.attack --config configs/attack.py --config.model=stories260k --config.corpus=" \
           "tinystories`" in report
    # Pruning half of the weights (of every matrix, or of all) hurts more than flipping 0.2% of them, and the
    # gains are relative to magnitude pruning in the same mode.
    pr = s["pruning_ppl"]["0.5"]
    plain = {"magnitude", "taylor", "wanda", "sparsegpt"}
    assert set(pr) == plain | {f"{n}+owl" for n in plain}
    assert all(set(v) == {"per_layer", "global", "per_output"} for n, v in pr.items() if n in plain - {"sparsegpt"})
    assert all(set(v) == {"per_layer", "per_output"} for n, v in pr.items() if n.endswith("+owl") and "gpt" not in n)
    assert set(pr["sparsegpt"]) == set(pr["sparsegpt+owl"]) == {"per_layer"}
    assert min(x for v in pr.values() for x in v.values()) > s["ppl_base"]
    nm = s["pruning_ppl"]["2:4"]
    assert set(nm) == plain and all(set(v) == {"per_output"} for v in nm.values())
    assert all(np.isfinite(v["per_output"]) and v["per_output"] > s["ppl_base"] for v in nm.values())
    assert "| 2:4 | per_output |" in report and "sparsegpt" in report
    gain = s["pruning_gain_vs_magnitude"]["0.5"]["wanda"]["global"]
    assert gain == pytest.approx((pr["magnitude"]["global"] - pr["wanda"]["global"]) / pr["magnitude"]["global"])
    sw = s["super_weights"]
    assert sw["n"] == 5 and [c["layer"] for c in sw["candidates"]] != [] and sw["candidates"][0]["max_out"] > 0
    # smoke: bits 31 and 30 of float32, 14 of bfloat16, in the magnitude top-k and 2 random-k draws.
    f32, bf16 = s["faults"]["float32"], s["faults"]["bfloat16"]
    assert set(f32) == {"31", "30"} and set(bf16) == {"14"} and f32["31"]["field"] == "sign"
    assert len(f32["31"]["random_k"]) == 2 and set(f32["31"]["topk"]) == {"magnitude"}
    # Every weight of stories260K is below 2 in magnitude: an exponent-MSB flip overflows, in either encoding.
    assert f32["30"]["topk"]["magnitude"] == float("inf") == bf16["14"]["topk"]["magnitude"]
    assert 0 < f32["31"]["topk"]["magnitude"] < float("inf")
    arch = s["architecture"]["grad_x_weight"]
    assert sum(g["selected"] for g in arch["component"].values()) == arch["k"] == -(-2 * arch["n_scored"] // 1000)
    assert arch["n_scored"] == sum(sizes) and set(arch["progression"]["layers"]) == {0, 1, 2, 3, 4}
    assert arch["attention_vs_mlp"]["mean_score_ratio"] == pytest.approx(
        arch["component"]["attention"]["mean_score"] / arch["component"]["mlp"]["mean_score"])
    _check_apart(s, sizes)
    _check_spectral(s, report)
    _check_family_figures(tmp_path, s)
    rows = open(tmp_path / "topk.csv").read().splitlines()
    assert rows[0] == "metric,rank,path,flat_index,coordinates,layer,component,role,value,score"
    assert len(rows) == 1 + 3 * s["k_selected"]
    metric, rank, path, idx, *_ = rows[1].split(",")
    assert metric == "magnitude" and rank == "0" and path.endswith("kernel")
    for f in ("report.md", "config.json", "score_histograms.png", "layer_role_heatmap.png", "dppl_sign_flip.png",
              "dppl_bit_flip.png", "dose_response_sign_flip.png", "jaccard.png", "architecture.png",
              "bit_flips.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert runs.complete(str(tmp_path), "esa")
    done = json.load(open(tmp_path / "DONE.json"))["files"]
    assert {"summary.json", "topk.csv", "report.md", "config.json", "jaccard.png"} <= set(done)
    # Another analysis in this folder is refused before any compute: its plots would sit beside these.
    other = esa_configs.get_config("smoke")
    other.topk, other.apart = 0.01, "embed|norm"
    with pytest.raises(errors.RunError, match=r"holds another run, so it cannot be resumed: config.control_doses: "
                                              r".*; config.metric: .*; config.perturb: .*; "
                                              r"config.topk: 0.002 in the folder, 0.01 now\."):
        job.run(other, str(tmp_path))
    report = open(tmp_path / "report.md").read()
    assert "## Verdict against the ESA success criteria" in report and "DESIGN" not in report
    assert f"{s['ppl_base']:.4f}" in report
    assert "| saliency pruning vs magnitude pruning at equal sparsity | > 15% lower perplexity | " \
           "taylor (per_layer) at 50% |" in report
    assert "## Architecture: where the top-k land model-wide" in report and "## Fault tolerance" in report
    assert "| zeroing the super-weight candidates vs the same number of largest-magnitude weights | ΔPPL larger |" \
        in report


def _check_apart(s, sizes):
    """The embedding and norms reported apart: scored by every metric but act_mag, read with and without them."""
    flat = {p: np.asarray(v) for p, v in rules_lib.flatten(models.load(paths.checkpoint("stories260k")).params).items()}
    norms = [p for p in flat if p.endswith("norm/weight")]
    assert s["apart_paths"] == ["model/embed_tokens/embedding"] + norms and len(norms) == 11
    ap = s["apart"]
    assert set(ap) == {"magnitude", "grad_x_weight"}       # act_mag scores linear-layer inputs only
    n_apart = 512 * 64 + 11 * 64
    for m, e in ap.items():
        assert e["weights"] == n_apart and e["matrices_weights"] == sum(sizes)
        emb = e["groups"]["embedding/token"]
        assert (emb["tensors"], emb["weights"]) == (1, 512 * 64) and e["groups"]["norm/attn_norm"]["tensors"] == 5
        arch = e["architecture"]
        # With them competing: the model-wide top-k of all 292,800 weights, the apart share read off its tables.
        assert arch["n_scored"] == 292_800 and arch["k"] == -(-2 * 292_800 // 1000)
        comp = arch["component"]
        assert e["global_topk_share"] * arch["k"] == pytest.approx(comp["embedding"]["selected"]
                                                                   + comp["norm"]["selected"])
        rows = e["rows"]["model/embed_tokens/embedding"]
        assert rows["k"] == e["k"] == -(-2 * 512 * 64 // 1000) and 1 <= rows["rows_holding"] <= rows["k"]
        assert rows["rows"] == 512 and 0 < rows["seen_rows_share"] < 1
        pt = e["perturb"]
        assert pt["kind"] == "sign_flip" and pt["dose"] == 1.0 and pt["random_k"]["n"] == 4
        assert pt["topk"]["n"] == (1 if m == "magnitude" else 2)
    # Magnitude's group figures from the weights themselves: mean |w| of the group over that of the matrices.
    kept_mean = np.mean(np.concatenate([np.abs(v).ravel() for p, v in flat.items() if p.endswith("kernel")]))
    mag = ap["magnitude"]
    assert mag["groups"]["embedding/token"]["mean_score_vs_matrices"] == pytest.approx(
        np.abs(flat["model/embed_tokens/embedding"]).mean() / kept_mean, rel=1e-5)
    final = mag["groups"]["norm/final_norm"]
    assert final["mean_score_vs_matrices"] == pytest.approx(np.abs(flat["model/norm/weight"]).mean() / kept_mean,
                                                            rel=1e-5)
    assert np.isnan(mag["jaccard_mean"]) and 0 <= ap["grad_x_weight"]["jaccard_mean"] <= 1
    # stories260K's head is untied, so only rows of tokens the calibration windows hold get a gradient: every selected
    # entry lies in a seen row (a tied head would give every row a softmax term).
    assert ap["grad_x_weight"]["rows"]["model/embed_tokens/embedding"]["seen_share_of_topk"] == 1.0


def _check_family_figures(workdir, s):
    """experiments/esa_families.py's reading of one finished analysis: its per-layer statistics and claims."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("esa_families", os.path.join(helpers.REPO, "experiments",
                                                                               "esa_families.py"))
    fam = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fam)
    fig = fam.family_figures(fam.load(str(workdir)), [])   # [] = every layer of one type
    prog = s["architecture"]["grad_x_weight"]["progression"]
    avm = fig["attention_vs_mlp"]["grad_x_weight"]
    assert avm["layers"] == 5 and avm["layers_attention_higher"] == sum(
        a > m for a, m in zip(prog["attention"]["mean_score"], prog["mlp"]["mean_score"], strict=True))
    assert avm["mean_score_ratio"] == s["architecture"]["grad_x_weight"]["attention_vs_mlp"]["mean_score_ratio"]
    d = fig["depth"]["grad_x_weight"]
    layer = s["architecture"]["grad_x_weight"]["layer"]
    scores_by_layer = [layer[str(i)]["mean_score"] for i in range(5)]
    assert d["first_rank"] == 1 + sum(v > scores_by_layer[0] for v in scores_by_layer)
    assert fig["sliding_vs_global"] is None and fig["sign_flip"]["magnitude"]["n"] == 1
    rows = {r["claim"]: r for r in fam.claims({"stories260k": fig})}
    norm = rows["every norm weight group scores higher per weight than the matrices (grad_x_weight)"]
    lowest = min(v["mean_score_vs_matrices"] for g, v in s["apart"]["grad_x_weight"]["groups"].items()
                 if g.startswith("norm/"))
    assert norm["verdict"] == ("holds in all" if lowest > 1 else "holds in none")
    sliding = next(r for c, r in rows.items() if c.startswith("global-attention layers differ"))
    assert sliding["verdict"] == "–" and sliding["stories260K"] == "only global layers"


def _check_spectral(s, report):
    """Every scored matrix's spectral metrics, as computed from the checkpoint's own weights, beside its scores."""
    from wa import models
    from wa.weights import spectral
    sp = s["spectral"]
    assert len(sp["matrices"]) == 36 and set(sp["by_layer"]) == {"0", "1", "2", "3", "4"}
    from wa.parallel import rules
    flat = rules.flatten(models.load("third_party/stories260k/hf").params)
    head = next(r for r in sp["matrices"] if r["path"] == "lm_head/kernel")
    for f, v in spectral.layer(np.asarray(flat["lm_head/kernel"], np.float32)).items():
        assert head[f] == pytest.approx(v, rel=1e-6, nan_ok=True)
    # Relative mean score per weight: its size-weighted mean over the scored matrices (all of them 2-D here) is 1.
    size = np.array([np.prod(flat[r["path"]].shape) for r in sp["matrices"]])
    for m in s["metrics"]:
        rel = np.array([r[f"score/{m}"] for r in sp["matrices"]])
        assert (size * rel).sum() / size.sum() == pytest.approx(1.0, rel=1e-6)
    assert set(sp["correlation"]) == set(s["metrics"])
    assert "## The weights' spectra, read without data, beside the scores" in report


def test_a_refused_run_leaves_its_workdir_as_it_found_it(tmp_path):
    # --config.seq_len past the model's 512 positions: refused before the folder is claimed, so the corrected
    # command on the same --workdir is not met with "holds another run".
    cfg = esa_configs.get_config("smoke")
    cfg.seq_len = 4096
    with pytest.raises(errors.ConfigError, match=r"--config.seq_len=4096 exceeds the model's "
                                                 r"max_position_embeddings=512"):
        job.run(cfg, str(tmp_path / "esa"))
    assert not (tmp_path / "esa").exists() or not os.listdir(tmp_path / "esa")


@pytest.mark.parametrize("fields,message", [
    ({"topk": 0}, "--config.topk=0.0: topk must be positive, got 0.0"),
    ({"topk": -5}, "topk must be positive, got -5.0"),
    ({"perturb_scale": "0.5,-1"}, "--config.perturb_scale='0.5,-1': scales must be >= 0"),
    ({"perturb": "melt"}, "unknown perturbation 'melt'"),
    ({"perturb": "bit_flip", "bit_flip_bits": "40"}, "bits [40] do not exist in float32"),
    ({"prune_sparsity": "1.5"}, "--config.prune_sparsity: sparsity '1.5': a fraction must lie in (0, 1)"),
    ({"prune_sparsity": "0.5,4:4"}, "--config.prune_sparsity: sparsity 4:4: N:M needs 0 < N < M"),
    ({"prune_modes": "per_row"}, "--config.prune_modes: ['per_row']; expected some of per_layer, global, per_output"),
    ({"window_bos": True}, "--config.bos and --config.window_bos: choose one"),
])
def test_bad_config_is_refused_by_check(fields, message):
    # launch.esa calls pipeline.check before devices, files or compute: checked in-process here, and the
    # one-line form of such an error once below, through the launcher.
    cfg = esa_configs.get_config("smoke")
    for k, v in fields.items():
        cfg[k] = v
    with pytest.raises(errors.ConfigError) as e:
        pipeline.check(cfg)
    assert message in str(e.value)


@pytest.mark.parametrize("override,message", [
    ("--config.metric=fisher", "unknown metric ['fisher']"),
    ("--config.seq_len=4096", "--config.seq_len=4096 exceeds the model's max_position_embeddings=512"),
    ("--config.param_filter=attn_out$", "param_filter 'attn_out$' matches no parameter"),
    ("--config.prune_sparsity=3:7", "inputs per row, not a multiple of 7"),
    ("--config.corpus=/nonexistent.txt", "corpus '/nonexistent.txt' is neither a known corpus"),
])
def test_bad_config_fails_before_compute(tmp_path, override, message):
    r = _esa(tmp_path / "w", override)
    helpers.one_line_error(r, message)
    assert "gradients" not in r.stderr and "base perplexity" not in r.stderr


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    r = _esa(tmp_path / "w", f"--config.corpus={tmp_path / 'empty.txt'}")
    helpers.one_line_error(r, "empty.txt is empty")


def _scores(ckpt, mesh, out, env=None):
    helpers.run_python(f"from tests import esa_worker; esa_worker.main({ckpt!r}, {mesh!r}, {out!r})", env)
    return np.load(out, allow_pickle=True)


def _same(a, b):
    keys = [k for k in a.files if ":" in k]
    assert keys == [k for k in b.files if ":" in k]
    for k in keys:
        if k.endswith(":topk"):
            assert a[k].tolist() == b[k].tolist(), k
        else:
            # Sums of v * Hv cancel; reduction order differs across shardings.
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4 * float(np.abs(b[k]).max()), err_msg=k)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A tiny Llama checkpoint and its scores on one device, computed in this process (the reference)."""
    from tests import esa_worker
    tmp = tmp_path_factory.mktemp("micro")
    d, _, _ = helpers.write_checkpoint(tmp, "llama_micro", "pt_safetensors")
    esa_worker.main(d, "data:1,fsdp:-1", str(tmp / "one.npz"))
    one = np.load(tmp / "one.npz", allow_pickle=True)
    assert int(one["n_devices"]) == 1
    return d, one


@pytest.mark.slow
def test_sharded_scores_equal_unsharded(tmp_path, micro):
    d, one = micro
    eight = _scores(d, "data:2,fsdp:4", str(tmp_path / "eight.npz"), EIGHT)
    assert int(eight["n_devices"]) == 8
    _same(one, eight)


@pytest.mark.slow
def test_two_processes_give_the_same_scores(tmp_path, micro):
    d, one = micro
    out = str(tmp_path / "two.npz")
    helpers.two_processes("tests.esa_worker", [d, "data:2,fsdp:4", out])
    two = np.load(out, allow_pickle=True)
    assert int(two["n_processes"]) == 2 and int(two["n_devices"]) == 8
    _same(one, two)


def test_apart_paths_are_outside_the_competing_ones_and_a_regex_matching_nothing_is_one_error():
    from wa.esa import apart
    flat = {"e/embedding": np.zeros((4, 2)), "l/kernel": np.zeros((2, 2)), "l/norm/weight": np.zeros(2)}
    kept = ["l/kernel"]
    assert apart.paths(flat, kept, "") == []
    assert apart.paths(flat, kept, "embed|norm|kernel") == ["e/embedding", "l/norm/weight"]
    assert apart.matrices(flat, ["e/embedding", "l/norm/weight"]) == ["e/embedding"]
    assert apart.paths(flat, kept, "kernel") == []     # what competes is not apart (param_filter=. and the default)
    with pytest.raises(errors.ConfigError, match=r"--config.apart='bias' matches no parameter; paths look like "
                                                 r"\['e/embedding', "):
        apart.paths(flat, kept, "bias")
    with pytest.raises(errors.ConfigError, match=r"--config.apart='\(' is not a valid regex"):
        apart.paths(flat, kept, "(")


def test_embedding_rows_are_read_by_vocabulary_row_and_seen_rows_apart():
    from wa.esa import apart
    # 4 rows of 3: rows 0 and 2 seen (counts 5 and 1), rows 1 and 3 unseen with zero score (an untied head).
    score = np.array([[3., 2., 1.], [0., 0., 0.], [1., 1., 1.], [0., 0., 0.]], np.float32)
    counts = np.array([5, 0, 1, 0])
    r = apart._rows(score.shape, score.mean(axis=1), np.array([0, 1, 6]), counts, lambda i: f"t{i}")
    assert (r["rows"], r["k"], r["rows_holding"], r["seen_rows"]) == (4, 3, 2, 2)
    assert r["top_rows"][0] == {"row": 0, "token": "t0", "selected": 2, "calibration_count": 5}
    assert r["seen_share_of_topk"] == 1.0 and r["seen_rows_share"] == 0.5
    assert r["seen_over_unseen_mean_score"] == float("inf")
    # The whole table's mean (9/12) over the matrices' mean 0.5 is 1.5; its seen rows' mean (9/6) over it is 3.
    assert apart.seen_rows_vs_matrices(1.5, r) == pytest.approx(3.0)
    r2 = dict(r, seen_over_unseen_mean_score=2.0)   # mean = f·m_s + (1 - f)·m_s/2 -> m_s = mean / 0.75
    assert apart.seen_rows_vs_matrices(1.5, r2) == pytest.approx(2.0)
    # Apart vectors only (no matrix of their own): no own top-k, no stability, no crash.
    out = apart.summarize({"magnitude": {"groups": {}}}, {}, [1, 2], None, {"magnitude": False})
    assert out["magnitude"]["k"] == 0 and np.isnan(out["magnitude"]["jaccard_mean"])


def test_esa_on_a_mixture_of_experts_reads_routing_and_each_expert(tmp_path):
    # llama.cpp's conversion of the tiny Mixtral fixture (4 experts, 2 per token), read with its own vocabulary.
    import csv

    from flax import traverse_util

    from wa.esa import evaluate
    cfg = esa_configs.get_config("smoke")
    cfg.model = os.path.join(helpers.REPO, "tests", "fixtures", "decoders", "mixtral", "model.gguf")
    cfg.corpus, cfg.doc_split, cfg.seq_len = "tinyshakespeare", "blank_lines", 32
    cfg.metric, cfg.perturb_scale, cfg.seeds, cfg.stability_check = "grad_x_weight,act_mag", "1.0", "1", False
    cfg.mode = "global"
    cfg.prune_sparsity, cfg.fault_metrics, cfg.super_weights = "", "", False
    a, s = job.run(cfg, str(tmp_path))
    ex = s["experts"]
    assert (ex["experts"], ex["experts_per_token"]) == (4, 2)
    # Every real calibration token of the first seed sends 2 (token, slot) pairs through every layer.
    batches = a.scores.batches
    tokens = int(sum(np.asarray(b["attention_mask"]).sum() for b in batches))
    assert ex["routing"]["tokens"] == tokens
    assert [sum(row) for row in ex["routing"]["pairs"]] == [2 * tokens] * 2
    np.testing.assert_allclose(np.sum(ex["routing"]["share"], axis=1), 1.0)
    np.testing.assert_allclose(np.sum(ex["routing"]["prob_mean"], axis=1), 1.0, rtol=1e-6)
    # An ablation cell is the held-out ΔPPL with that expert's w2 zeroed, as a direct evaluation gives it.
    flat = dict(a.setup.flat)
    path = "model/layers/1/block_sparse_moe/experts/2/w2/kernel"
    flat[path] = 0 * flat[path]
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    r = evaluate.evaluate(a.setup.loaded, tree, a.setup.data.eval_ids, a.setup.data.eval_mask, cfg.batch_size,
                          progress=False)
    assert ex["ablation"]["dppl"][1][2] == pytest.approx(r["ppl"] - s["ppl_base"], rel=1e-5, abs=1e-9)
    for m in ("grad_x_weight", "act_mag"):
        pm = ex["per_metric"][m]
        arch = s["architecture"][m]
        assert set(arch["expert"]) == {"-", "0", "1", "2", "3"} and len(arch["layer_expert"]) == 9
        assert pm["topk_share_in_experts"] == pytest.approx(sum(v["share"] for g, v in arch["expert"].items()
                                                                if g != "-"))
        assert pm["router"] == arch["component"]["router"]
        assert np.asarray(pm["mean_score"]).shape == (2, 4)
        counts = s["per_metric"][m]["topk_counts"]["expert"]
        assert sum(counts.values()) == s["k_selected"]
    rows = list(csv.DictReader(open(tmp_path / "topk.csv")))
    assert rows and all((r["expert"] == r["path"].split("/experts/")[1].split("/")[0]) if "/experts/" in r["path"]
                        else r["expert"] == "" for r in rows)
    text = open(tmp_path / "report.md").read()
    assert "## Experts: routing, where the top-k sits, and each expert removed" in text
    assert os.path.exists(tmp_path / "experts.png")
    # experiments/esa_moe.py's reading of it: the MoE-only claims come from these figures.
    import importlib.util
    spec = importlib.util.spec_from_file_location("esa_moe", os.path.join(helpers.REPO, "experiments", "esa_moe.py"))
    moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moe)
    fig = moe.expert_figures(moe.fam.load(str(tmp_path)))
    assert fig["routing_share"] == ex["routing"]["share"] and fig["ablation"] == ex["ablation"]
    one = moe.fam.family_figures(moe.fam.load(str(tmp_path)), [])
    rows = {r["claim"]: r for r in moe.claims({"dense": one, "moe": one}, {"dense": {}, "moe": {}}, fig)}
    busy = rows["removing a busier expert costs more (held-out ΔPPL vs routing share, Spearman)"]
    r = ex["ablation"]["vs_routing"]
    assert busy["verdict"] == ("holds" if r["rho"] > 0 and r["p_value"] < 0.05 else "does not hold")
