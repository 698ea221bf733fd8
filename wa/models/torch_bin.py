"""Read ``pytorch_model.bin`` (torch.save's zip format) without torch.

The file is a zip archive: ``<name>/data.pkl`` pickles the state dict, each tensor as a call
to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose storage is a
persistent id ``('storage', <dtype>Storage, key, location, numel)`` naming the entry
``<name>/data/<key>`` that holds the raw little-endian bytes. The unpickler below resolves only
those few globals (anything else is refused, so a checkpoint cannot run code) and returns lazy
tensors whose bytes are read one storage at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchBinError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass
class LazyTensor:
    """One tensor of the archive; ``numpy()`` reads its storage."""
    archive: TorchBin
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple

    @property
    def dtype(self):
        return self.storage.dtype

    def numpy(self) -> np.ndarray:
        raw = self.archive.storage_bytes(self.storage)
        flat = np.frombuffer(raw, dtype=self.storage.dtype)
        if not self.shape:
            return flat[self.offset:self.offset + 1].reshape(())
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.shape,
                                               strides=tuple(s * item for s in self.stride))
        return np.array(view)  # owns its memory; the storage bytes can go


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return ("tensor", storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise TorchBinError(f"{self.path}: refusing to unpickle {module}.{name} (not a plain state dict)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchBinError(f"{self.path}: unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise TorchBinError(f"{self.path}: unsupported storage type {stype!r}")
        return _Storage(str(key), stype.dtype, int(numel))


class TorchBin:
    """A torch.save zip archive holding a state dict of tensors."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise TorchBinError(f"{path}: not a torch zip archive, or truncated ({e})") from e
        names = self._zip.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise TorchBinError(f"{path}: no data.pkl in the archive (legacy non-zip torch.save is not supported)")
        self._prefix = pkl[0][: -len("data.pkl")]
        try:
            with self._zip.open(pkl[0]) as f:
                state = _Unpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
            raise TorchBinError(f"{path}: cannot unpickle the state dict ({e})") from e
        if not isinstance(state, dict):
            raise TorchBinError(f"{path}: holds a {type(state).__name__}, not a state dict")
        self.tensors: dict[str, LazyTensor] = {}
        for k, v in state.items():
            if isinstance(v, tuple) and v and v[0] == "tensor":
                _, storage, offset, shape, stride = v
                self.tensors[k] = LazyTensor(self, storage, int(offset), shape, stride)

    def storage_bytes(self, storage: _Storage) -> bytes:
        name = f"{self._prefix}data/{storage.key}"
        try:
            raw = self._zip.read(name)
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise TorchBinError(f"{self.path}: cannot read {name} ({e}); the file is truncated or damaged") from e
        if len(raw) < storage.numel * storage.dtype.itemsize:
            raise TorchBinError(f"{self.path}: {name} is shorter than its {storage.numel} elements")
        return raw
