"""Bad input fails before any compute, with a message naming the file, parameter or value."""

import json
import os

import numpy as np
import pytest
from flax import serialization

from tests import helpers
from wa import models, parallel
from wa.models import CheckpointError


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.*does not exist"):
        models.load(str(tmp_path / "nope"))


def test_a_missing_checkpoint_has_no_identity_either(tmp_path):
    # Run folders record a checkpoint's identity before loading it (launch.esa --config.model=/nonexistent).
    with pytest.raises(CheckpointError, match=r"checkpoint '.*nope' does not exist$"):
        models.identity(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"weights.bin' is a file; give the directory that holds config.json, "
                                              r"or a .gguf file$"):
        models.identity(str(tmp_path / "weights.bin"))


def test_config_sizes_past_int32_are_refused(tmp_path):
    d, _, _ = helpers.write_checkpoint(tmp_path, "gpt2")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["vocab_size"] = 2**31
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config.json: vocab_size=2147483648; expected an integer in "
                                              r"\[1, 2\*\*31 - 1\]$"):
        models.load(d)


def test_heads_that_do_not_divide_the_hidden_size_are_one_error(tmp_path):
    d, _, _ = helpers.write_checkpoint(tmp_path, "gpt2")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["n_head"] = 3
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config.json: num_attention_heads=3 does not divide hidden_size=32$"):
        models.load(d)
    # stories260K's config with 7 heads (its head_dim 8 is explicit, so only its 4 K/V heads no longer divide
    # them): refused before transformers reads it (5.x would refuse it in words of its own, 4.x not at all).
    import shutil

    from wa.data import paths
    s = tmp_path / "stories7"
    shutil.copytree(paths.checkpoint("stories260k"), s)
    cfg = json.load(open(s / "config.json"))
    cfg["num_attention_heads"] = 7
    json.dump(cfg, open(s / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"num_key_value_heads=4 does not divide num_attention_heads=7$"):
        models.load(str(s))


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        models.load(str(tmp_path))


def test_directory_without_weights(tmp_path):
    d, _, _ = helpers.write_checkpoint(tmp_path, "gpt2")
    os.remove(os.path.join(d, "flax_model.msgpack"))
    with pytest.raises(CheckpointError, match=r"no weights found; expected one of flax_model.msgpack"):
        models.load(d)


@pytest.mark.parametrize("fmt,file", [("msgpack", "flax_model.msgpack"), ("safetensors", "model.safetensors")])
def test_truncated_weights(tmp_path, fmt, file):
    d, _, _ = helpers.write_checkpoint(tmp_path, "llama", fmt)
    path = os.path.join(d, file)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=f"{file}.*truncated"):
        models.load(d)


def test_shape_mismatch(tmp_path):
    d, _, _ = helpers.write_checkpoint(tmp_path, "llama")
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 48
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=r"flax_model.msgpack: parameter 'model/layers/0/mlp/down_proj/kernel'"
                                              r".*shape \(64, 32\) but config.json implies \(48, 32\)"):
        models.load(d)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights(tmp_path, bad):
    d, _, params = helpers.write_checkpoint(tmp_path, "gpt2")
    params = serialization.to_state_dict(params)
    params["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"] = np.asarray(
        params["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"]).copy()
    params["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"][5, 7] = bad
    with open(os.path.join(d, "flax_model.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(params))
    with pytest.raises(CheckpointError, match=r"'transformer/h/1/mlp/c_fc/kernel'.*1 NaN/Inf values, first at "
                                              r"index \(5, 7\)"):
        models.load(d)


def test_unknown_family(tmp_path):
    d, _, _ = helpers.write_checkpoint(tmp_path, "gpt2")
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'mamba' is not a family wa knows; "
                                              r"known model types: bert, gemma, gemma2, gemma3_text, gpt2, gpt_neo, "
                                              r"gpt_neox, llama, mistral, mixtral, opt, phi3, qwen2, qwen3, roberta$"):
        models.load(d)


def test_missing_parameter(tmp_path):
    d, _, params = helpers.write_checkpoint(tmp_path, "opt")
    params = serialization.to_state_dict(params)
    del params["model"]["decoder"]["layers"]["1"]["fc2"]
    with open(os.path.join(d, "flax_model.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(params))
    with pytest.raises(CheckpointError, match=r"2 parameters of the opt model are missing.*layers/1/fc2/bias"):
        models.load(d)


def test_mesh_that_does_not_match_device_count():
    with pytest.raises(parallel.MeshError, match=r"mesh 'data:3' has 3 devices but 1 are available"):
        parallel.make_mesh("data:3")
    with pytest.raises(parallel.MeshError, match=r"'data:4,fsdp:-1': the fixed axes use 4 devices"):
        parallel.make_mesh("data:4,fsdp:-1")


def test_corpus_and_tokenizer_errors(tmp_path):
    from wa.data import text, tokenizers
    with pytest.raises(text.DataError, match="neither a known corpus"):
        text.read(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(text.DataError, match="empty.txt is empty"):
        text.read(str(tmp_path / "empty.txt"))
    with pytest.raises(text.DataError, match="tokenizer 'nope'"):
        tokenizers.get("nope")
