"""Sharded = unsharded: 8 forced CPU devices in a subprocess, and two local processes."""

import json
import os

import numpy as np
import pytest

from tests import helpers

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _workers(ckpt, meshes, tmp, env, tail=()):
    """Loss and gradients on each mesh, all in one subprocess with the forced devices; on the meshes in ``tail``
    also the gradients' heavy-tail figures computed where they live."""
    outs = [str(tmp / f"{m}.npz") for m in meshes]
    helpers.run_python("import os\nfrom tests import sharded_worker\n" + "".join(
        f"os.environ['WA_TEST_TAIL'] = {str(int(m in tail))!r}\nsharded_worker.main({ckpt!r}, {m!r}, {o!r})\n"
        for m, o in zip(meshes, outs, strict=True)), env)
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
            os.environ["WA_TEST_TAIL"] = "1"   # the heavy tail on one device: the reference
            try:
                sharded_worker.main(d, "data:1,fsdp:-1", str(tmp / "one.npz"))
            finally:
                del os.environ["WA_TEST_TAIL"]
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


def _same_tail(a, b):
    """The heavy-tail figures of the gradients computed where they live (histograms per local shard, replicas
    skipped, summed across processes): every entry counted once, the same figures as on one device."""
    assert b["ht"][0] == a["ht"][0] > 0
    np.testing.assert_allclose(b["ht"][1:4], a["ht"][1:4], rtol=1e-4)
    assert abs(b["ht"][4] - a["ht"][4]) <= 1e-4 + b["ht"][5] + a["ht"][5]


# One family in the quick lane; the others (another kernel layout, an encoder) in the slow one.
@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow),
                                  pytest.param("bert", marks=pytest.mark.slow)])
def test_sharded_loss_and_grad_equal_unsharded(tmp_path, name, single):
    d, one = single(name)
    # The heavy tail on the mesh whose data axis holds replicas of every gradient (each entry must count once).
    tail = ("data:2,fsdp:4",) if name == "llama" else ()
    for sharded in _workers(d, ("data:2,fsdp:4", "fsdp:2,model:4"), tmp_path, EIGHT, tail):
        assert int(sharded["n_devices"]) == 8
        assert "fsdp" in str(sharded["specs"])
        _compare(one, sharded)
        if len(sharded["ht"]):
            _same_tail(one, sharded)


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
    helpers.two_processes("tests.sharded_worker", [d, "data:2,fsdp:4", out], env_extra={"WA_TEST_TAIL": "1"})
    two = np.load(out)
    assert int(two["n_processes"]) == 2 and int(two["n_devices"]) == 8
    _compare(one, two)
    _same_tail(one, two)


def test_topk_of_sharded_scores_stays_on_device():
    """Scores sharded over 8 devices: top-k (per matrix, and global as on an accelerator) and the heavy-tail figures
    run where they live; only the winners, or histograms of a fixed size, reach the host (implicit device-to-host
    copies refused, explicit ones counted), and the results equal those of the same scores on one device."""
    out = helpers.run_python(
        "import json, jax, jax.numpy as jnp, numpy as np\n"
        "from jax.sharding import NamedSharding, PartitionSpec as P\n"
        "from wa import parallel\n"
        "from wa.esa import select\n"
        "m = parallel.make_mesh('data:1,fsdp:8')\n"
        "rng = np.random.default_rng(0)\n"
        "host = {'l0/kernel': rng.standard_normal((64, 256)).astype('f4'),\n"
        "        'l1/kernel': rng.integers(0, 50, (256, 64)).astype('f4'),\n"
        "        'head/kernel': rng.standard_normal((64, 512)).astype('f4')}\n"
        "dev = {p: jax.device_put(v, NamedSharding(m, P(None, 'fsdp'))) for p, v in host.items()}\n"
        "one = {p: jnp.asarray(v) for p, v in host.items()}\n"
        "fetched, get = [], jax.device_get\n"
        "def spy(x):\n"
        "    fetched.extend(int(np.size(v)) for v in jax.tree.leaves(x))\n"
        "    return get(x)\n"
        "res = {}\n"
        "for mode, k in (('global', 100), ('per_layer', 0.001), ('global', 0.3)):\n"
        "    fetched.clear()\n"
        "    jax.device_get = spy\n"
        "    with jax.transfer_guard_device_to_host('disallow'):\n"
        "        sel, val = select.top_k(dev, k, mode=mode, on_device=True)\n"
        "    jax.device_get = get\n"
        "    ref, rv = select.top_k(one, k, mode=mode)\n"
        "    res[f'{mode}/{k}'] = {'equal': {p: v.tolist() for p, v in sel.items()} == {p: v.tolist() for p, v in\n"
        "                                                                              ref.items()},\n"
        "                          'picked': select.size(sel), 'max_fetched': max(fetched), 'fetched': sum(fetched)}\n"
        "from wa.esa import tally\n"
        "fetched.clear()\n"
        "jax.device_get = spy\n"
        "with jax.transfer_guard_device_to_host('disallow'):\n"
        "    ht = select.heavy_tail(dev, on_device=True)\n"
        "jax.device_get = get\n"
        "ref = select.heavy_tail(one, on_device=False)\n"
        "res['heavy_tail'] = {'fetched': sum(fetched), 'transfers': len(fetched),\n"
        "    'equal': all(np.isclose(ht[k], ref[k], rtol=1e-6) for k in ('n', 'median', 'max', 'top01pct_share',\n"
        "                                                                'top1pct_mean_over_median')),\n"
        "    'gini': abs(ht['gini'] - ref['gini']) <= ht['gini_error'] + 1e-12,\n"
        "    'plot': ht['histogram'] == ref['histogram']}\n"
        "from wa.esa import saliency\n"
        "fetched.clear()\n"
        "jax.device_get = spy\n"
        "with jax.transfer_guard_device_to_host('disallow'):\n"
        "    pm = dict(saliency.device_masks(dev, 0.5, 'global'))\n"
        "    pr = dict(saliency.prune(dev, dev, 0.25, 'per_output', input_axes={'l1/kernel': 1}, on_device=True))\n"
        "jax.device_get = get\n"
        "hm = dict(saliency.masks(host, 0.5, 'global'))\n"
        "hr = dict(saliency.prune(host, host, 0.25, 'per_output', input_axes={'l1/kernel': 1}, on_device=False))\n"
        "res['prune'] = {'fetched': sum(fetched),\n"
        "    'masks': all((np.asarray(pm[p]).ravel() == hm[p]).all() for p in host),\n"
        "    'pruned': all((np.asarray(pr[p]) == hr[p]).all() for p in host),\n"
        "    'sharded': [len(v.sharding.device_set) for v in pr.values()]}\n"
        "print(json.dumps({'res': res, 'devices': [len(v.sharding.device_set) for v in dev.values()]}))\n", EIGHT)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["devices"] == [8, 8, 8]
    total = 64 * 256 * 2 + 64 * 512
    pr = r["res"].pop("prune")
    # Pruning masks and pruned copies made where the weights live: the threshold search's counts come home (a code
    # and two per matrix), nothing else; the same weights as the host path, and the copies stay sharded.
    assert pr["masks"] and pr["pruned"] and pr["fetched"] == 7 and pr["sharded"] == [8, 8, 8], pr
    ht = r["res"].pop("heavy_tail")
    # The heavy-tail figures from histograms of a fixed size, one per device (each of its local shards counted
    # where it lies, no collective); equal to a host sort's, the Gini coefficient within its stated bound. First
    # pass: four 2^20-bin arrays and two scalars per device; second: per device a 2^12-code histogram per distinct
    # bin of the eight order statistics, and the 80 plot bins.
    assert ht["equal"] and ht["gini"] and ht["plot"], ht
    one = 4 * (1 << 20) + 2
    assert 8 * (one + (1 << 12) + 80) <= ht["fetched"] <= 8 * (one + 8 * (1 << 12) + 80), ht
    for name, f in r["res"].items():
        assert f["equal"], name
        # Winners padded to a power of two, indices and values, plus the threshold search's per-matrix counts.
        assert f["fetched"] <= 4 * f["picked"] + 16, (name, f)
    assert r["res"]["global/0.3"]["picked"] == int(np.ceil(0.3 * total)) and r["res"]["global/100"]["picked"] == 100
