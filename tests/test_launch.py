"""The entry points, run as a user runs them."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from tests import helpers


def _run(*args, env=None, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", *args], cwd=helpers.REPO, env=e, capture_output=True, text=True,
                       timeout=timeout)
    return r


def test_main_smoke_writes_report(tmp_path):
    wd = tmp_path / "run"
    r = _run("launch.main", "--config", "configs/main.py:smoke", "--workdir", str(wd))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.load(open(wd / "summary.json"))
    assert s["model_type"] == "llama" and s["n_params"] == 292_800
    assert s["windows"] == 4 and s["target_tokens"] == 4 * 127
    assert 1.0 < s["nll_nats_per_token"] < 2.5
    assert abs(s["ppl"] - 2.718281828 ** s["nll_nats_per_token"]) < 1e-6 * s["ppl"]
    assert json.load(open(wd / "config.json"))["seq_len"] == 128
    report = open(wd / "report.md").read()
    assert f"{s['nll_nats_per_token']:.4f} nats/token" in report and "## Greedy continuation of BOS" in report
    assert len(json.load(open(wd / "params.json"))["rows"]) == 48


def test_main_rejects_bad_config_before_loading(tmp_path):
    r = _run("launch.main", "--config", "configs/main.py:smoke", "--config.seq_len=1024", "--workdir",
             str(tmp_path / "x"))
    helpers.one_line_error(r, "--config.seq_len=1024 exceeds the model's max_position_embeddings=512")
    r = _run("launch.main", "--config", "configs/main.py:smoke", "--config.dtype=int4", "--workdir",
             str(tmp_path / "y"))
    helpers.one_line_error(r, "--config.dtype='int4': expected one of")
    assert not (tmp_path / "y").exists()
    # A config file refusing its variant: the config's own message, not ml_collections' traceback.
    r = _run("launch.main", "--config", "configs/main.py:nosuch", "--workdir", str(tmp_path / "z"))
    helpers.one_line_error(r, "configs/main.py: unknown variant 'nosuch'; use default, smoke, smollm2 or gemma3")


def test_inspect_stories260k_with_json(tmp_path):
    out = tmp_path / "p.json"
    r = _run("launch.inspect", "--checkpoint", "stories260k", "--host_devices", "4", "--mesh",
             "data:1,fsdp:-1", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "layer", "component", "role", "spec",
                                "bytes_per_device"]
    # Matrices split 4 ways; the 704 norm weights are replicated: (292,800 - 704) + 704 * 4 bytes.
    assert lines[-1].startswith("total: 48 tensors, 292,800 parameters, 1,171,200 bytes; 294,912 bytes per device")
    row = [x for x in lines if x.startswith("model/layers/2/mlp/down_proj/kernel")][0].split()
    assert row[1:] == ["(172,", "64)", "float32", "2", "mlp", "down", "P(None,", "'fsdp')", "11008"]
    data = json.load(open(out))
    assert data["mesh"] == {"data": 1, "fsdp": 4} and data["totals"]["params"] == 292_800


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny"])
def test_plan_prints_one_json_line(variant):
    r = _run("launch.plan", "--config", f"configs/plan.py:{variant}")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    p = json.loads(lines[0])
    assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8}
    assert p["n_params"] == 106_816
    # Every tiny matrix divides 8 ways; the norms (2 * 64 * 2 + 64 floats) are replicated.
    assert p["params_bytes_per_device"] == (106_816 - 320) * 4 // 8 + 320 * 4
    assert p["compiled_argument_bytes_per_device"] == p["params_bytes_per_device"] + 2 * 8 * 32 * 4 // 8
    assert p["temp_bytes_per_device"] > 0
    # wa's own Llama, scanned and rematerialized, and ESA's two other steps planned beside the gradient step.
    assert p["scan"] is True and p["remat"] == "full"
    assert p["hvp"]["probes"] == 1 and p["hvp"]["temp_bytes_per_device"] > 0
    # The capture pass needs no logits, so the compiled pass drops lm_head (64 × 256 floats over 8 devices).
    assert p["capture"]["compiled_argument_bytes_per_device"] == p["compiled_argument_bytes_per_device"] - 8192


def test_plan_of_a_mixture_of_experts():
    # In process on this one device (the 8-device split of experts and router is test_decoders'): the grouped
    # gradient step and the dense capture pass plan; the HVP step, whose probes vmap the dense path every ESA test's
    # per-window gradients vmap too, is left out (15 s of compile).
    from configs import plan as plan_configs
    from wa.esa import plan
    from wa.parallel import mesh as mesh_lib
    c = plan_configs.get_config("tiny_moe")
    p = plan.plan(plan.hf_config(c.hf_config.to_dict()), mesh_lib.make_mesh("data:1,fsdp:-1"), c.batch_size,
                  c.seq_len, remat=c.remat, scan=c.scan, loss_chunk=c.loss_chunk, capture=True, moe=c.moe,
                  param_dtype=jnp.float32, compute_dtype=jnp.float32)
    assert p["n_params"] == 107_328 and p["experts"] == 4 and p["params_bytes_per_device"] == 107_328 * 4
    assert (p["moe_gradient_step"], p["moe_hvp_and_capture_steps"]) == ("grouped", "dense")
    assert p["temp_bytes_per_device"] > 0 and p["capture"]["temp_bytes_per_device"] > 0 and "hvp" not in p
