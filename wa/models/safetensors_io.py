"""Lazy, torch-free reading of safetensors files.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets) and one flat byte buffer. The header is validated by the
``safetensors`` library (offsets ordered, contiguous and inside the buffer) before anything is read.
``read`` fetches the rows a slice needs with one positioned read into a fresh buffer, so each process
touches only the bytes its devices hold and nothing stays resident after the slice is on its device (a
memory map would keep every touched page in the process's resident set). bfloat16, which
numpy lacks, comes through ``ml_dtypes``.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import safetensors

from wa import errors

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(errors.CheckpointError):
    pass


MAX_HEADER_BYTES = 100_000_000   # the limit the safetensors library itself enforces


def _declared_end(raw: bytes):
    """The largest end offset a header names, or None if it cannot be read: tells truncation from damage."""
    try:
        header = json.loads(raw)
        return max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"), default=0)
    except Exception:  # noqa: BLE001 - a malformed header is reported by the caller
        return None


class SafetensorsFile:
    """Header of one .safetensors file; tensors or slices of them are read on demand."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short to be a safetensors file")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{path}: header claims {n} bytes; the format allows at most "
                                       f"{MAX_HEADER_BYTES >> 20} MiB, so this is not a safetensors file")
            if 8 + n > size:
                raise SafetensorsError(
                    f"{path}: header claims {n} bytes but the file has {size - 8} after the length; "
                    "the file is truncated or not safetensors")
            raw = f.read(n)
        # The format's own validator (offsets in order, contiguous, inside the buffer, shapes and dtypes
        # well formed) runs first, so the checks below only see headers the format accepts.
        try:
            with safetensors.safe_open(path, framework="numpy"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, or OSError from the memory map
            data_end = _declared_end(raw)
            hint = ("the file is truncated" if data_end is not None and 8 + n + data_end > size
                    else "the file is damaged or not safetensors")
            raise SafetensorsError(f"{path}: invalid safetensors file ({' '.join(str(e).split())}); {hint}") from e
        header = json.loads(raw)
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = header
        for name, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which wa does not read "
                                       f"(expected one of {', '.join(_DTYPES)})")

    def keys(self):
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._entries[name]["dtype"]])

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """``tensor[index]`` for an index of slices, reading only the rows it spans."""
        e = self._entries[name]
        shape, dtype = tuple(e["shape"]), np.dtype(_DTYPES[e["dtype"]])
        begin, end = e["data_offsets"]
        if not shape:
            lo, hi, rest = 0, 1, ()
        else:
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            lo, hi, step = index[0].indices(shape[0])
            if step != 1:
                raise ValueError(f"{self.path}: strided read of {name!r} is not supported")
            hi = max(hi, lo)
            rest = (slice(None),) + index[1:]
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        with open(self.path, "rb") as f:
            buf = os.pread(f.fileno(), (hi - lo) * row, self._data_start + begin + lo * row)
        if len(buf) != (hi - lo) * row:
            raise SafetensorsError(f"{self.path}: short read of tensor {name!r}; the file is truncated")
        arr = np.frombuffer(buf, dtype=dtype).reshape((hi - lo,) + shape[1:] if shape else ())
        return arr[rest] if shape else arr
