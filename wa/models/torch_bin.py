"""Read ``pytorch_model.bin`` (torch.save's zip format) without torch.

The file is a zip archive: ``<name>/data.pkl`` pickles the state dict, each tensor as a call
to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose storage is a
persistent id ``('storage', <dtype>Storage, key, location, numel)`` naming the entry
``<name>/data/<key>`` that holds the raw little-endian bytes. The unpickler below resolves only
those few globals (anything else is refused, so a checkpoint cannot run code) and returns lazy
tensors.

The file may be hostile, so nothing in it is trusted before it is checked: every tensor's offset, shape and
stride must stay inside its storage, every storage must match the size its zip entry declares, and a tensor
reads only the bytes its own elements span (a storage that claims gigabytes costs nothing unless a tensor
of that size is asked for, and the caller checks shapes against the model's config first).
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import pickle
import zipfile

import ml_dtypes
import numpy as np

from wa import errors

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchBinError(errors.CheckpointError):
    pass


MAX_PICKLE_BYTES = 64 << 20   # a state dict's pickle holds names and shapes only: ~100 kB for an 8B model


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

    @property
    def span(self) -> int:
        """Storage elements from ``offset`` up to and including the tensor's last element (0 if empty)."""
        if any(n == 0 for n in self.shape):
            return 0
        return 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride, strict=True))

    def numpy(self) -> np.ndarray:
        raw = self.archive.read_elements(self.storage, self.offset, self.span)
        flat = np.frombuffer(raw, dtype=self.storage.dtype)
        if not self.shape:
            return flat.reshape(())
        item = flat.itemsize
        if not len(flat):
            return np.zeros(self.shape, self.storage.dtype)
        # Bounds were checked when the archive was opened: offset + span <= numel, strides >= 0.
        view = np.lib.stride_tricks.as_strided(flat, shape=self.shape, strides=tuple(s * item for s in self.stride))
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
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchBinError(f"{self.path}: unexpected persistent id {str(pid)[:200]}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise TorchBinError(f"{self.path}: unsupported storage type {str(stype)[:100]}")
        if not isinstance(key, (str, int)) or not _is_count(numel):
            raise TorchBinError(f"{self.path}: malformed storage entry {str(pid)[:200]}")
        return _Storage(str(key), stype.dtype, int(numel))


def _is_count(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0


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
        info = self._zip.getinfo(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise TorchBinError(f"{path}: {pkl[0]} declares {info.file_size} bytes; a state dict's pickle holds "
                                f"only names and shapes (expected under {MAX_PICKLE_BYTES >> 20} MiB)")
        try:
            with self._zip.open(pkl[0]) as f:
                state = _Unpickler(f, path).load()
        except TorchBinError:
            raise
        except Exception as e:  # noqa: BLE001 - a crafted pickle raises anything; none of it may escape raw
            raise TorchBinError(f"{path}: cannot unpickle the state dict ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict):
            raise TorchBinError(f"{path}: holds a {type(state).__name__}, not a state dict")
        self.tensors: dict[str, LazyTensor] = {}
        for k, v in state.items():
            if isinstance(v, tuple) and v and v[0] == "tensor":
                self.tensors[str(k)] = self._checked(str(k), *v[1:])

    def _checked(self, name, storage, offset, shape, stride) -> LazyTensor:
        """The tensor, once its offset, shape and stride are known to stay inside a storage the file holds."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(storage, _Storage):
            raise TorchBinError(f"{where}: its storage is {type(storage).__name__}, not a storage record")
        if not (_is_count(offset) and all(map(_is_count, shape)) and all(map(_is_count, stride))
                and len(shape) == len(stride)):
            raise TorchBinError(f"{where}: offset {offset}, shape {shape}, stride {stride}: expected "
                                "non-negative integers and one stride per dimension")
        t = LazyTensor(self, storage, int(offset), tuple(int(n) for n in shape), tuple(int(s) for s in stride))
        end = t.offset + t.span
        if t.span and end > storage.numel:
            raise TorchBinError(f"{where}: shape {t.shape}, stride {t.stride} at offset {t.offset} reaches element "
                                f"{end} of a storage of {storage.numel}; the file is damaged or crafted")
        entry = self._entry(storage)
        want = storage.numel * storage.dtype.itemsize
        if entry.file_size != want:
            raise TorchBinError(f"{where}: storage {entry.filename} holds {entry.file_size} bytes but declares "
                                f"{storage.numel} elements of {storage.dtype} ({want} bytes)")
        return t

    def _entry(self, storage: _Storage) -> zipfile.ZipInfo:
        name = f"{self._prefix}data/{storage.key}"
        try:
            return self._zip.getinfo(name)
        except KeyError:
            raise TorchBinError(f"{self.path}: storage {name} is missing from the archive; the file is truncated "
                                "or damaged") from None

    def read_elements(self, storage: _Storage, offset: int, count: int) -> bytes:
        """``count`` elements of ``storage`` from ``offset``: never more bytes than those."""
        entry = self._entry(storage)
        item = storage.dtype.itemsize
        try:
            with self._zip.open(entry) as f:
                f.seek(offset * item)
                raw = f.read(count * item)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TorchBinError(f"{self.path}: cannot read {entry.filename} ({e}); the file is truncated or "
                                "damaged") from e
        if len(raw) != count * item:
            raise TorchBinError(f"{self.path}: {entry.filename} ends before its element {offset + count}")
        return raw
