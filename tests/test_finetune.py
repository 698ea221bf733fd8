"""Sparse fine-tuning: a mask trains exactly its entries, LoRA starts at the pretrained model, and the launcher's
table on a tiny config."""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs import finetune as finetune_configs
from tests import helpers
from wa import models
from wa.data import paths, tokenizers
from wa.parallel import rules as rules_lib
from wa.train import finetune


@pytest.fixture(scope="module")
def setup():
    cfg = finetune_configs.get_config("smoke")
    cfg.steps = 3
    ckpt = paths.checkpoint(cfg.model)
    loaded = models.load(ckpt)
    data = finetune.corpora(cfg, tokenizers.get(ckpt))
    return cfg, loaded, data, rules_lib.flatten(loaded.params)


def test_a_mask_trains_exactly_its_entries(setup):
    cfg, loaded, data, flat0 = setup
    kept = [p for p in flat0 if p.endswith("kernel")]
    sel = {kept[0]: np.array([0, 5, 17]), kept[-1]: np.array([3])}
    trainable = finetune.masks_for(flat0, kept, sel)
    out = finetune.train(loaded, flat0, data, cfg, trainable)["flat"]
    for p, v in flat0.items():
        moved = np.flatnonzero(np.asarray(out[p]).ravel() != np.asarray(v).ravel())
        assert moved.tolist() == sorted(sel.get(p, np.array([], int)).tolist()), p


def test_lora_starts_at_the_pretrained_model_and_moves_only_matrices(setup):
    cfg, loaded, data, flat0 = setup
    kept = [p for p in flat0 if p.endswith("kernel")]
    r, count = finetune.lora_rank(flat0, kept, 5000, loaded.family.input_axis)
    per_rank = sum(flat0[p].shape[0] + flat0[p].shape[1] for p in kept)
    assert r == max(1, round(5000 / per_rank)) and count == r * per_rank
    c = cfg.copy_and_resolve_references()
    c.steps = 2
    out = finetune.train(loaded, flat0, data, c, None, {p: r for p in kept})["flat"]
    changed = {p for p in flat0 if not np.array_equal(np.asarray(out[p]), np.asarray(flat0[p]))}
    assert changed and changed <= set(kept)
    c.lr = 1e-12                       # B starts at zero: the adapted model is the pretrained one
    out = finetune.train(loaded, flat0, data, c, None, {p: r for p in kept})["flat"]
    for p in kept:
        np.testing.assert_allclose(np.asarray(out[p]), np.asarray(flat0[p]), atol=1e-9)


def test_launch_finetune_writes_its_table(tmp_path):
    r = subprocess.run([sys.executable, "-m", "launch.finetune", "--config", "configs/finetune.py:smoke", "--workdir",
                        str(tmp_path), "--config.methods=topk:grad_squared,freeze:grad_squared",
                        "--config.fractions=0.05"],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "finetune.json"))
    rows = {x["method"]: x for x in res["runs"]}
    assert set(rows) == {"topk:grad_squared", "freeze:grad_squared"}
    k = round(0.05 * res["n_weights_matrices"])
    assert rows["topk:grad_squared"]["trainable"] == k
    assert rows["freeze:grad_squared"]["trainable"] == res["n_params"] - k
    # The source model's critical set, perturbed in the pretrained and in the protected model.
    for who in (res["base_perturbed_source_ppl"], rows["freeze:grad_squared"]["perturbed_source_ppl"]):
        assert set(who) == {"grad_squared@0.05"} and set(who["grad_squared@0.05"]) == {"sign_flip", "bit_flip_23"}
    assert all(np.isfinite(x["target_ppl"]) and np.isfinite(x["source_ppl"]) for x in rows.values())
    md = open(tmp_path / "finetune.md").read()
    assert "## What it says" in md and "| topk:grad_squared | 5.0% |" in md
    assert "## Protecting the source model's critical weights" in md and "| freeze:grad_squared | 5.0% |" in md
    assert (tmp_path / "finetune.png").exists() and (tmp_path / "DONE.json").exists()
