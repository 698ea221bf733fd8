import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wa import parallel
from wa.parallel import mesh as mesh_lib
from wa.parallel import rules as rules_lib


def test_parse_and_resolve_axes():
    assert mesh_lib.parse_axes("data:1, fsdp:-1") == {"data": 1, "fsdp": -1}
    assert mesh_lib.parse_axes({"data": 2, "model": 4}) == {"data": 2, "model": 4}
    assert mesh_lib.resolve_axes("data:2,fsdp:-1,model:2", 8) == {"data": 2, "fsdp": 2, "model": 2}
    assert mesh_lib.resolve_axes("data:-1", 8) == {"data": 8}
    with pytest.raises(parallel.MeshError, match="only one axis may be -1"):
        mesh_lib.resolve_axes("data:-1,fsdp:-1", 8)
    with pytest.raises(parallel.MeshError, match="expected 'axis:size' pairs"):
        mesh_lib.parse_axes("data=2")
    with pytest.raises(parallel.MeshError, match="size of axis 'data' must be an integer"):
        mesh_lib.parse_axes("data:two")
    with pytest.raises(parallel.MeshError, match="axis 'fsdp' has size 0"):
        mesh_lib.resolve_axes("fsdp:0", 8)


def test_rules_first_match_wins_and_unmatched_are_replicated_and_logged(caplog):
    mesh = parallel.make_mesh("data:1,fsdp:-1")
    tree = {"a": {"kernel": jax.ShapeDtypeStruct((4, 6), np.float32)},
            "b": {"kernel": jax.ShapeDtypeStruct((4, 6), np.float32)},
            "c": {"scale": jax.ShapeDtypeStruct((4,), np.float32)}}
    rules = [(r"a/kernel$", P(None, "fsdp")), (r"kernel$", P("fsdp", "model")), (r"a/", P())]
    with caplog.at_level(logging.INFO):
        specs = rules_lib.specs_for(tree, rules, mesh)
    assert specs["a"]["kernel"] == P(None, "fsdp")
    assert specs["b"]["kernel"] == P("fsdp")  # 'model' is not a mesh axis: dropped
    assert specs["c"]["scale"] == P()
    assert "matched no rule for 1 parameters (replicated): c/scale" in caplog.text


def test_bytes_per_device_and_fit_spec():
    mesh = parallel.make_mesh("fsdp:1")
    assert rules_lib.fit_spec(P(("fsdp", "model"), None), mesh, 2) == P("fsdp")
    assert rules_lib.bytes_per_device((8, 4), np.float32, P("fsdp"), mesh) == 128


def test_distributed_flags_must_come_together():
    with pytest.raises(parallel.DistributedError, match="needs all of --coordinator_address"):
        parallel.initialize("127.0.0.1:1234", None, None)
    with pytest.raises(parallel.DistributedError, match=r"--process_id=2 must lie in \[0, --num_processes=2\)"):
        parallel.initialize("127.0.0.1:1234", 2, 2)
    assert parallel.initialize() is False
