"""Lazy, torch-free reading of safetensors files.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets) and one flat byte buffer. Reading it through
``numpy.memmap`` lets each process touch only the bytes of the slices its devices
hold, and lets bfloat16 (which numpy lacks) come through ``ml_dtypes``.
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
    """Header of one .safetensors file plus zero-copy views of its tensors."""

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
        self._mm = None

    def keys(self):
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._entries[name]["dtype"]])

    def view(self, name: str) -> np.ndarray:
        """A read-only memmap view: slicing it reads only the bytes asked for."""
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self._entries[name]
        begin, end = e["data_offsets"]
        raw = self._mm[self._data_start + begin:self._data_start + end]
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])
