"""pytorch_model.bin read without torch, against checkpoints torch itself wrote (tests/fixtures)."""

import os
import shutil
import zipfile

import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.models import CheckpointError

FIXTURES = os.path.join(helpers.REPO, "tests", "fixtures")


@pytest.mark.parametrize("name", ["gpt2", "llama_bf16"])
def test_bin_equals_safetensors_tensor_for_tensor(name):
    # Both written by torch from one model; every tensor read from the .bin equals the safetensors one, and each
    # parameter is its PyTorch tensor in the Flax layout (2-D kernels transposed; GPT-2's Conv1D [in, out] too).
    from wa.models.safetensors_io import SafetensorsFile
    d = os.path.join(FIXTURES, f"torch_{name}")
    from_bin = helpers.flat(models.load(os.path.join(d, "bin")).params)
    from_st = helpers.flat(models.load(os.path.join(d, "safetensors")).params)
    assert from_bin.keys() == from_st.keys()
    for k in from_st:
        np.testing.assert_array_equal(np.asarray(from_bin[k]), np.asarray(from_st[k]), err_msg=k)
    raw = SafetensorsFile(os.path.join(d, "safetensors", "model.safetensors"))
    stored = {k: np.asarray(raw.read(k, tuple(slice(None) for _ in raw.shape(k))), np.float32) for k in raw.keys()}
    prefix = "transformer." if name == "gpt2" else ""
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias", "weight": "weight"}
    for k, v in from_st.items():
        parts = k.split("/")
        key = ".".join(parts[:-1] + [leaf[parts[-1]]])
        key = key if key in stored else prefix + key
        want = stored[key].T if parts[-1] == "kernel" else stored[key]
        np.testing.assert_array_equal(np.asarray(v, np.float32), want, err_msg=k)


def test_torch_gpt2_logits_equal_transformers():
    ref = np.load(os.path.join(FIXTURES, "torch_gpt2", "reference.npz"))
    m = models.load(os.path.join(FIXTURES, "torch_gpt2", "bin"))
    logits = np.asarray(m.forward(m.params, ref["ids"], ref["mask"])[0])
    real = ref["mask"].astype(bool)
    np.testing.assert_allclose(logits[real], ref["logits"][real], rtol=1e-5, atol=1e-5)
    total, count = m.token_nll(m.params, {"input_ids": ref["ids"], "attention_mask": ref["mask"]})
    assert float(total / count) == pytest.approx(float(ref["loss"]), rel=1e-6)


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
