"""Checkpoints crafted to crash the reader, read outside the checkpoint or blow up memory: each is one clear error.

Every hostile file is built here, byte by byte where needed, and small.
"""

import json
import os
import shutil
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.models import CheckpointError
from wa.models.torch_bin import TorchBin, TorchBinError

FIXTURES = os.path.join(helpers.REPO, "tests", "fixtures")


# --------------------------------------------------------------------------- pytorch_model.bin, crafted


def _uni(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _tuple(xs) -> bytes:
    return b"(" + b"".join(_int(x) for x in xs) + b"t"


def _state_pickle(tensors: dict) -> bytes:
    """torch.save's pickle of {name: tensor} as opcodes; a tensor is (key, numel, offset, size, stride)."""
    out = b"\x80\x02}("
    for name, (key, numel, offset, size, stride) in tensors.items():
        storage = b"(" + _uni("storage") + b"ctorch\nFloatStorage\n" + _uni(key) + _uni("cpu") + _int(numel) + b"tQ"
        out += (_uni(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _int(offset) + _tuple(size)
                + _tuple(stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")
    return out + b"u."


def _bin(path, tensors, storages, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", _state_pickle(tensors))
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
    return str(path)


def test_crafted_pickle_matches_what_torch_writes(tmp_path):
    data = np.arange(12, dtype=np.float32)
    t = TorchBin(_bin(tmp_path / "ok.bin", {"w": ("0", 12, 2, (2, 3), (1, 2))}, {"0": data.tobytes()}))
    np.testing.assert_array_equal(t.tensors["w"].numpy(), np.lib.stride_tricks.as_strided(
        data[2:], shape=(2, 3), strides=(4, 8)))


@pytest.mark.parametrize("tensor,match", [
    (("0", 1, 0, (16, 8), (8, 1)), r"tensor 'w': shape \(16, 8\), stride \(8, 1\) at offset 0 reaches element 128 "
                                    r"of a storage of 1"),
    (("0", 4, 0, (2, 2), (-2, 1)), r"tensor 'w': offset 0, shape \(2, 2\), stride \(-2, 1\): expected non-negative"),
    (("0", 4, 9, (2,), (1,)), r"tensor 'w': shape \(2,\), stride \(1,\) at offset 9 reaches element 11"),
    (("0", 4, -1, (2,), (1,)), r"tensor 'w': offset -1"),
    (("0", 4, 0, (2, 2), (1,)), r"one stride per dimension"),
    (("0", 400, 0, (2,), (1,)), r"storage archive/data/0 holds 16 bytes but declares 400 elements"),
    (("9", 4, 0, (2,), (1,)), r"storage archive/data/9 is missing from the archive"),
])
def test_tensor_outside_its_storage_is_refused_before_reading(tmp_path, tensor, match):
    path = _bin(tmp_path / "bad.bin", {"w": tensor}, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(TorchBinError, match=match):
        TorchBin(path)


def test_inflating_storage_reads_only_the_tensors_bytes(tmp_path):
    # 64 MiB of zeros deflate to ~64 kB; a (16, 8) tensor over it must cost its 512 bytes, not the storage.
    n = 16 << 20
    path = _bin(tmp_path / "bomb.bin", {"w": ("0", n, 0, (16, 8), (8, 1))}, {"0": bytes(4 * n)},
                compress=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < 1 << 20
    t = TorchBin(path)
    tracemalloc.start()
    arr = t.tensors["w"].numpy()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert arr.shape == (16, 8) and not arr.any()
    assert peak < 1 << 20, peak


def test_oversized_pickle_is_refused(tmp_path):
    path = tmp_path / "big.bin"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", bytes(65 << 20))
    with pytest.raises(TorchBinError, match=r"data.pkl declares 68157440 bytes"):
        TorchBin(str(path))


def test_crafted_bin_through_load_names_file_and_tensor(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "torch_gpt2", "bin"), d)
    _bin(d / "pytorch_model.bin", {"transformer.wte.weight": ("0", 1, 0, (16, 8), (8, 1))},
         {"0": np.zeros(1, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: tensor 'transformer.wte.weight': shape"):
        models.load(str(d))


# --------------------------------------------------------------------------- paths


@pytest.fixture
def st_checkpoint(tmp_path):
    d, _, _ = helpers.write_checkpoint(tmp_path, "llama", "safetensors")
    return d


def _replace(path, make):
    os.remove(path)
    make(path)


@pytest.mark.parametrize("make,match", [
    (lambda p: os.symlink("/dev/zero", p), r"model.safetensors: resolves to /dev/zero, outside the checkpoint"),
    (os.mkfifo, r"model.safetensors: is not a regular file"),
    (os.mkdir, r"model.safetensors: is not a regular file"),
])
def test_weights_that_are_not_regular_files_inside_are_refused(st_checkpoint, make, match):
    _replace(os.path.join(st_checkpoint, "model.safetensors"), make)
    with pytest.raises(CheckpointError, match=match):
        models.load(st_checkpoint)


@pytest.mark.parametrize("shard", ["/dev/urandom", "../../etc/passwd", "../outside.safetensors"])
def test_index_naming_files_outside_is_refused(st_checkpoint, shard):
    if shard.startswith("../o"):
        shutil.copy(os.path.join(st_checkpoint, "model.safetensors"), os.path.join(st_checkpoint, shard))
    os.remove(os.path.join(st_checkpoint, "model.safetensors"))
    with open(os.path.join(st_checkpoint, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": shard}}, f)
    with pytest.raises(CheckpointError, match=r"outside the checkpoint directory"):
        models.load(st_checkpoint)


def test_config_json_that_is_a_device_is_refused(st_checkpoint):
    _replace(os.path.join(st_checkpoint, "config.json"), lambda p: os.symlink("/dev/zero", p))
    with pytest.raises(CheckpointError, match=r"config.json: resolves to /dev/zero"):
        models.load(st_checkpoint)


def test_hugging_face_cache_layout_still_loads(st_checkpoint, tmp_path):
    # models--org--name/snapshots/<rev>/<file> are links into models--org--name/blobs.
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in os.listdir(st_checkpoint):
        shutil.copy(os.path.join(st_checkpoint, name), repo / "blobs" / f"blob-{name}")
        os.symlink(f"../../blobs/blob-{name}", snap / name)
    ref = helpers.flat(models.load(st_checkpoint).params)
    got = helpers.flat(models.load(str(snap)).params)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)


# --------------------------------------------------------------------------- safetensors headers


def _rewrite_header(path, edit):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def _first(header):
    return next(k for k in header if k != "__metadata__")


def _overlap(h):
    a, b = [k for k in h if k != "__metadata__"][:2]
    h[b]["data_offsets"] = h[a]["data_offsets"]


def _int_dtype(h):
    k = _first(h)
    h[k]["dtype"] = "I32"


@pytest.mark.parametrize("edit,match", [
    (_overlap, r"model.safetensors: invalid safetensors file \(.*invalid offset"),
    (lambda h: h[_first(h)].update(data_offsets=[-4, 0]), r"invalid safetensors file \(.*-4"),
    (lambda h: h[_first(h)].pop("dtype"), r"invalid safetensors file \(.*missing field `dtype`"),
    (lambda h: h[_first(h)].update(shape="x"), r"invalid safetensors file \(.*invalid type"),
    (_int_dtype, r"model.safetensors: parameter '.*' \(tensor '.*'\) is stored as int32; a weight must be a "
                 r"floating-point type"),
])
def test_malformed_safetensors_header_is_one_clear_error(st_checkpoint, edit, match):
    _rewrite_header(os.path.join(st_checkpoint, "model.safetensors"), edit)
    with pytest.raises(CheckpointError, match=match):
        models.load(st_checkpoint)


def test_header_that_is_not_an_object(st_checkpoint):
    path = os.path.join(st_checkpoint, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 8) + b"[1, 2]  ")
    with pytest.raises(CheckpointError, match=r"invalid safetensors file \(.*sequence"):
        models.load(st_checkpoint)
