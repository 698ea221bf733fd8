"""Sharded = unsharded: 8 forced CPU devices in a subprocess, and two local processes."""

import numpy as np
import pytest

from tests import helpers

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _worker(ckpt, mesh, out, env=None):
    helpers.run_python(f"from tests import sharded_worker; sharded_worker.main({ckpt!r}, {mesh!r}, {out!r})",
                       env)
    return np.load(out)


def _compare(a, b, tol=1e-5):
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=tol, atol=tol)
    keys = [k for k in a.files if k.startswith("g:")]
    assert keys and keys == [k for k in b.files if k.startswith("g:")]
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_sharded_loss_and_grad_equal_unsharded(tmp_path, name):
    d, _, _ = helpers.write_checkpoint(tmp_path, name, "pt_safetensors")
    single = _worker(d, "data:1,fsdp:-1", str(tmp_path / "one.npz"))
    assert int(single["n_devices"]) == 1
    for mesh in ("data:2,fsdp:4", "fsdp:2,model:4"):
        sharded = _worker(d, mesh, str(tmp_path / f"{mesh}.npz"), EIGHT)
        assert int(sharded["n_devices"]) == 8
        assert "fsdp" in str(sharded["specs"])
        _compare(single, sharded)


def test_rule_that_does_not_divide_a_dimension(tmp_path):
    out = helpers.run_python(
        "import jax; from jax.sharding import PartitionSpec as P\n"
        "from wa import parallel\n"
        "m = parallel.make_mesh('data:1,fsdp:8')\n"
        "t = {'model': {'layers': {'0': {'mlp': {'up_proj': {'kernel': jax.ShapeDtypeStruct((64, 172), 'f4')}}}}}}\n"
        "try:\n"
        "    parallel.specs_for(t, [(r'up_proj/kernel$', P(None, 'fsdp'))], m)\n"
        "except parallel.PartitionError as e:\n"
        "    print(e)\n", EIGHT)
    assert ("rule 'up_proj/kernel$' -> P(None, 'fsdp') puts dimension 1 (size 172) of parameter "
            "'model/layers/0/mlp/up_proj/kernel' (shape (64, 172)) on mesh axes ('fsdp',) of total size 8; "
            "172 is not divisible by 8") in out


@pytest.mark.parametrize("name", ["llama"])
def test_two_processes_equal_one(tmp_path, name):
    d, _, _ = helpers.write_checkpoint(tmp_path, name, "pt_safetensors")
    single = _worker(d, "data:1,fsdp:-1", str(tmp_path / "one.npz"))
    out = str(tmp_path / "two.npz")
    helpers.two_processes("tests.sharded_worker", [d, "data:2,fsdp:4", out])
    two = np.load(out)
    assert int(two["n_processes"]) == 2 and int(two["n_devices"]) == 8
    _compare(single, two)
