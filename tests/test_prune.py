"""launch.prune end to end on the smoke config: the table, the protocol's windows, and a saved pruned model that
loads, holds exactly the pattern it claims and scores the perplexity the table gives it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import prune as prune_configs
from tests import helpers
from wa import models
from wa.data import paths, text, tokenizers
from wa.esa import evaluate, saliency
from wa.parallel import rules as rules_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune")
    r = subprocess.run([sys.executable, "-m", "launch.prune", "--config", "configs/prune.py:smoke", "--workdir",
                        str(out), "--config.save_pruned=wanda/2:4/per_output"], cwd=helpers.REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.load(open(out / "prune.json"))


def test_prune_table_and_protocol(run):
    out, res = run
    cfg = prune_configs.get_config("smoke")
    table = res["pruning_ppl"]
    assert set(table) == {"0.5", "2:4"}
    assert set(table["0.5"]) == {"magnitude", "wanda", "sparsegpt", "magnitude+owl", "wanda+owl", "sparsegpt+owl"}
    assert set(table["0.5"]["wanda"]) == {"per_layer", "per_output"} and set(table["2:4"]["wanda"]) == {"per_output"}
    assert all(p > res["ppl_dense"] for row in table.values() for by in row.values() for p in by.values())
    # The test file's first windows of seq_len, cut without overlap (the papers' eval_ppl), 63 targets each.
    tok = tokenizers.get(paths.checkpoint(cfg.model))
    stream = text.token_stream([text.read("wikitext2_test")], tok, bos=cfg.bos)
    p = res["protocol"]
    assert p["eval_windows"] == cfg.eval_windows and p["eval_tokens"] == cfg.eval_windows * (cfg.seq_len - 1)
    assert len(stream) // cfg.seq_len > cfg.eval_windows
    f = res["findings"]["0.5"]
    assert f["wanda_per_output"] == table["0.5"]["wanda"]["per_output"]
    assert f["sparsegpt"] == table["0.5"]["sparsegpt"]["per_layer"]
    md = open(out / "prune.md").read()
    assert "| 2:4 | per_output |" in md and "## What it says" in md
    assert os.path.exists(out / "DONE.json")


def test_saved_pruned_model_is_what_the_table_scored(run):
    out, res = run
    cfg = prune_configs.get_config("smoke")
    # The PyTorch layout transformers' classes read: PyTorch names, [out, in] matrices.
    from safetensors import safe_open
    with safe_open(str(out / "pruned" / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [64, 172]
        assert "model.embed_tokens.weight" in f.keys() and "model.norm.weight" in f.keys()
    loaded = models.load(str(out / "pruned"))
    flat = rules_lib.flatten(loaded.params)
    dense = rules_lib.flatten(models.load(paths.checkpoint(cfg.model)).params)
    kernels = [k for k in flat if k.endswith("kernel")]
    assert kernels
    for k in kernels:
        w = saliency.rows(np.asarray(flat[k]), loaded.family.input_axis(k))
        # 2:4: exactly two zeros in every four consecutive inputs of every output; the rest untouched.
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all(), k
        d = saliency.rows(np.asarray(dense[k]), loaded.family.input_axis(k))
        np.testing.assert_array_equal(w[w != 0], d[w != 0])
    tok = tokenizers.get(paths.checkpoint(cfg.model))
    ids, mask = text.disjoint_windows(text.token_stream([text.read("wikitext2_test")], tok, bos=cfg.bos),
                                      cfg.seq_len)
    got = evaluate.evaluate(loaded, loaded.params, ids[:cfg.eval_windows], mask[:cfg.eval_windows],
                            cfg.batch_size, progress=False)
    assert got["ppl"] == pytest.approx(res["pruning_ppl"]["2:4"]["wanda"]["per_output"], rel=1e-5)


@pytest.mark.parametrize("value", ["wanda/0.6/per_output", "obd_fisher/0.5/per_layer", "wanda/0.5",
                                   "wanda/0.5/global", "wanda+owl/2:4/per_output", "sparsegpt/0.5/per_output",
                                   "wanda/x/per_layer"])
def test_save_pruned_must_name_a_cell_of_the_table(value):
    from wa.esa import pipeline, prune_report
    cfg = prune_configs.get_config("smoke")
    cfg.save_pruned = value
    with pytest.raises(pipeline.ConfigError, match="expected <pruner>/<sparsity>/<mode> from the table"):
        prune_report.check_save(cfg, pipeline.check(cfg))
