"""Lazy, torch-free reading of safetensors files.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets) and one flat byte buffer. ``read`` fetches the rows a
slice needs with one positioned read into a fresh buffer, so each process touches only the
bytes its devices hold and nothing stays resident after the slice is on its device (a
memory map would keep every touched page in the process's resident set). bfloat16, which
numpy lacks, comes through ``ml_dtypes``.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

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


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Header of one .safetensors file; tensors or slices of them are read on demand."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short to be a safetensors file")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise SafetensorsError(
                    f"{path}: header claims {n} bytes but the file has {size - 8} after the length; "
                    "the file is truncated or not safetensors")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = header
        data_len = size - self._data_start
        for name, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}")
            begin, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(_DTYPES[e["dtype"]]).itemsize
            if end - begin != want:
                raise SafetensorsError(
                    f"{path}: tensor {name!r} spans {end - begin} bytes, shape {e['shape']} needs {want}")
            if end > data_len:
                raise SafetensorsError(
                    f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds only "
                    f"{data_len}; the file is truncated")

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
