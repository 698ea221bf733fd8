import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.data import tokenizers


def _train(workdir, *overrides):
    return subprocess.run([sys.executable, "-m", "launch.train_lm", "--config", "configs/train_lm.py:smoke",
                           "--workdir", str(workdir), *overrides], cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_train_save_load_and_resume(tmp_path):
    # Preempted after step 6 of 9 ...
    r = _train(tmp_path / "a", "--config.steps=9", "--config.halt_at=6")
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.load(open(tmp_path / "a" / "train.json"))
    assert t["steps_done"] == 6 and t["resumed_from"] == 0 and t["n_params"] == 34_752
    assert [v["step"] for v in t["history"]["val"]] == [3, 6]
    # ... a re-run continues from the checkpoint and ends exactly where one uninterrupted run ends.
    r = _train(tmp_path / "a", "--config.steps=9")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.load(open(tmp_path / "a" / "train.json"))
    assert resumed["resumed_from"] == 6 and resumed["steps_done"] == 9
    assert [v["step"] for v in resumed["history"]["val"]] == [3, 6, 9]
    r = _train(tmp_path / "b", "--config.steps=9")
    assert r.returncode == 0, r.stderr[-3000:]
    straight = json.load(open(tmp_path / "b" / "train.json"))
    np.testing.assert_allclose(resumed["val_nll"], straight["val_nll"], rtol=1e-5)
    # The output is an ordinary HF checkpoint that wa loads, with its tokenizer beside it.
    hf = str(tmp_path / "a" / "hf")
    m = models.load(hf)
    assert m.config.model_type == "gpt2" and m.config.vocab_size == 258
    assert isinstance(tokenizers.get(hf), tokenizers.Bytes)
    for f in ("report.md", "training_curve.png", "history.json"):
        assert os.path.getsize(tmp_path / "a" / f) > 0


def test_a_mixtral_trains_with_its_router_balance_loss_and_loads_back(tmp_path):
    from configs import train_lm as configs
    from wa.train import lm
    cfg = configs.get_config("smoke_moe")
    cfg.steps, cfg.warmup, cfg.eval_every, cfg.checkpoint_every = 4, 1, 4, 4
    r = lm.train(cfg, str(tmp_path), progress=False)
    # 4 experts of 3 × 32 × 16 in each of 2 layers, 2 of them routed per token.
    assert (r["n_params"], r["n_active_params"]) == (37_408, 37_408 - 2 * 2 * 3 * 32 * 16)
    last = r["history"]["train"][-1]
    # The logged loss is the cross entropy alone; the balance loss (k = 2 when routing is uniform) beside it.
    assert last["step"] == 4 and 1.5 < last["balance"] < 4 and last["loss"] > 5
    m = models.load(r["hf_dir"])
    assert m.config.model_type == "mixtral" and m.model.experts == 4 and m.config.router_aux_loss_coef == 0.01
    assert m.config.rope_parameters["rope_theta"] == 10000.0
    # A dense model's run folder is fingerprinted without the MoE settings it never reads (older runs resume).
    assert "experts" in lm.fingerprint(cfg)["config"]
    assert "experts" not in lm.fingerprint(configs.get_config("smoke"))["config"]
