"""pytorch_model.bin read without torch, against checkpoints torch itself wrote (tests/fixtures)."""

import os
import shutil
import zipfile

import numpy as np
import pytest
import transformers

from tests import helpers
from wa import models
from wa.models import CheckpointError

FIXTURES = os.path.join(helpers.REPO, "tests", "fixtures")


@pytest.mark.parametrize("name,cls", [("gpt2", "FlaxGPT2LMHeadModel"), ("llama_bf16", "FlaxLlamaForCausalLM")])
def test_bin_equals_transformers_conversion_of_safetensors(name, cls):
    d = os.path.join(FIXTURES, f"torch_{name}")
    from_bin = helpers.flat(models.load(os.path.join(d, "bin")).params)
    from_st = helpers.flat(models.load(os.path.join(d, "safetensors")).params)
    ref = helpers.flat(getattr(transformers, cls).from_pretrained(os.path.join(d, "safetensors"), from_pt=True).params)
    assert from_bin.keys() == from_st.keys() == ref.keys()
    for k in ref:
        want = np.asarray(ref[k], np.float32)
        np.testing.assert_array_equal(np.asarray(from_bin[k]), want, err_msg=k)
        np.testing.assert_array_equal(np.asarray(from_st[k]), want, err_msg=k)


def test_bin_loader_never_imports_torch():
    out = helpers.run_python(
        "import sys; from wa import models\n"
        f"m = models.load({os.path.join(FIXTURES, 'torch_gpt2', 'bin')!r})\n"
        "print('torch' in sys.modules, len(m.params['transformer']['h']))\n")
    assert out.strip().splitlines()[-1] == "False 1"


def test_truncated_bin(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "torch_gpt2", "bin"), d)
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not a torch zip archive, or truncated"):
        models.load(str(d))


def test_bin_with_code_in_its_pickle_is_refused(tmp_path):
    d = tmp_path / "evil"
    shutil.copytree(os.path.join(FIXTURES, "torch_gpt2", "bin"), d)
    with zipfile.ZipFile(d / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", b"cos\nsystem\n(S'touch /tmp/wa-pwned'\ntR.")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle os.system"):
        models.load(str(d))
    assert not os.path.exists("/tmp/wa-pwned")
