"""Sharded = unsharded: 8 forced CPU devices in a subprocess, and two local processes."""

import numpy as np
import pytest

from tests import helpers

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _workers(ckpt, meshes, tmp, env):
    """Loss and gradients on each mesh, all in one subprocess with the forced devices."""
    outs = [str(tmp / f"{m}.npz") for m in meshes]
    helpers.run_python("from tests import sharded_worker\n" + "".join(
        f"sharded_worker.main({ckpt!r}, {m!r}, {o!r})\n" for m, o in zip(meshes, outs, strict=True)), env)
    return [np.load(o) for o in outs]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """name -> (checkpoint, loss and gradients on one device, computed in this process)."""
    from tests import sharded_worker
    cache = {}

    def get(name):
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name)
            d, _, _ = helpers.write_checkpoint(tmp, name, "pt_safetensors")
            sharded_worker.main(d, "data:1,fsdp:-1", str(tmp / "one.npz"))
            cache[name] = (d, np.load(tmp / "one.npz"))
            assert int(cache[name][1]["n_devices"]) == 1
        return cache[name]
    return get


def _compare(a, b, tol=1e-5):
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=tol, atol=tol)
    keys = [k for k in a.files if k.startswith("g:")]
    assert keys and keys == [k for k in b.files if k.startswith("g:")]
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)


# One family in the quick lane; the others (another kernel layout, an encoder) in the slow one.
@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow),
                                  pytest.param("bert", marks=pytest.mark.slow)])
def test_sharded_loss_and_grad_equal_unsharded(tmp_path, name, single):
    d, one = single(name)
    for sharded in _workers(d, ("data:2,fsdp:4", "fsdp:2,model:4"), tmp_path, EIGHT):
        assert int(sharded["n_devices"]) == 8
        assert "fsdp" in str(sharded["specs"])
        _compare(one, sharded)


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama"])
def test_two_processes_equal_one(tmp_path, name, single):
    d, one = single(name)
    out = str(tmp_path / "two.npz")
    helpers.two_processes("tests.sharded_worker", [d, "data:2,fsdp:4", out])
    two = np.load(out)
    assert int(two["n_processes"]) == 2 and int(two["n_devices"]) == 8
    _compare(one, two)
