import numpy as np

from tests import helpers
from wa import models, parallel
from wa.esa import superweights
from wa.parallel import rules as rules_lib


def test_planted_super_weight_is_found(tmp_path):
    d, model, params = helpers.write_checkpoint(tmp_path, "llama")
    # Plant one: intermediate channel 7 of layer 1 fires hard, and W_down[7, 19] turns it into a
    # massive output on channel 19.
    mlp = params["model"]["layers"]["1"]["mlp"]
    mlp["gate_proj"]["kernel"] = np.asarray(mlp["gate_proj"]["kernel"]).copy()
    mlp["up_proj"]["kernel"] = np.asarray(mlp["up_proj"]["kernel"]).copy()
    mlp["down_proj"]["kernel"] = np.asarray(mlp["down_proj"]["kernel"]).copy()
    mlp["gate_proj"]["kernel"][:, 7] *= 40
    mlp["up_proj"]["kernel"][:, 7] *= 40
    mlp["down_proj"]["kernel"][7, 19] = 30.0
    model.save_pretrained(d, params=params)
    loaded = models.load(d)
    ids = np.random.default_rng(0).integers(3, 96, size=(4, 12)).astype(np.int32)
    batches = list(parallel.iter_batches(loaded.mesh, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, 2))
    flat = rules_lib.flatten(loaded.params)
    downs = superweights.down_paths(loaded, list(flat))
    assert downs == ["model/layers/0/mlp/down_proj/kernel", "model/layers/1/mlp/down_proj/kernel"]
    cands = superweights.candidates(loaded, flat, superweights.spikes(loaded, loaded.params, batches, downs))
    top = cands[0]
    assert top["path"] == "model/layers/1/mlp/down_proj/kernel" and top["coordinates"] == [7, 19]
    assert top["value"] == 30.0 and top["flat_index"] == 7 * 32 + 19
    assert top["out_over_median"] > 50 and top["in_over_median"] > 20
    big = superweights.largest_magnitude(flat, downs, 1)
    assert {p: v.tolist() for p, v in big.items()} == {"model/layers/1/mlp/down_proj/kernel": [7 * 32 + 19]}
