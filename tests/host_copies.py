"""Runs a module as ``python -m`` would, recording every copy of a multi-device array to host memory.

  WA_HOST_COPIES=out.json python -m tests.host_copies launch.esa --config ...

On CPU a single-device array is host memory already and numpy reads it without a copy, so the run should use
several (forced) devices: then every conversion to numpy (``__array__``) and every ``device_get`` or scalar read
(``_value``) of a sharded array is recorded, with its shape and the innermost ``wa`` frame that asked for it.
At exit, {"copies": [[where, shape, count], ...]} of arrays of 1,000 entries or more is written to WA_HOST_COPIES.
"""

import atexit
import collections
import json
import os
import runpy
import sys
import traceback

from jax._src import array as jax_array

_seen: collections.Counter = collections.Counter()
_value, _array = jax_array.ArrayImpl._value, jax_array.ArrayImpl.__array__


def _record(x) -> None:
    if x.size >= 1000:
        frames = [f for f in traceback.extract_stack()[:-2] if f"{os.sep}wa{os.sep}" in f.filename]
        where = f"{os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
        _seen[where, tuple(int(d) for d in x.shape)] += 1


def _spy_value(self):
    _record(self)
    return _value.fget(self)


def _spy_array(self, *args, **kwargs):
    _record(self)
    return _array(self, *args, **kwargs)


def _write() -> None:
    with open(os.environ["WA_HOST_COPIES"], "w") as f:
        json.dump({"copies": [[w, list(s), n] for (w, s), n in sorted(_seen.items())]}, f)


if __name__ == "__main__":
    jax_array.ArrayImpl._value = property(_spy_value)
    jax_array.ArrayImpl.__array__ = _spy_array
    atexit.register(_write)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
