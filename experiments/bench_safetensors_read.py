r"""Resident memory of reading one device's slice of a safetensors tensor: wa's ranged reader vs the library's.

  python experiments/bench_safetensors_read.py [--mib 256] [--parts 4]

A process on a multi-device host reads only the rows its devices hold. This writes one float32 tensor of
``--mib`` MiB, then in a fresh process per method reads rows [0, n/parts) and reports how much the
process's resident set grew: ``ranged`` is ``wa.models.safetensors_io``
(one positioned read of the slice's bytes), ``library`` is ``safetensors.safe_open(..., "numpy")
.get_slice(name)[lo:hi]`` (a memory map; touched pages count as resident while it is open). Prints one
JSON line of figures measured in this run (resident memory growth while the slice is held, from
/proc/self/statm).
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

flags.DEFINE_integer("mib", 256, "Size of the tensor in MiB.")
flags.DEFINE_integer("parts", 4, "The slice read is the first 1/parts of the rows (one device's share).")
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(REPO, "wa", "models", "safetensors_io.py")

CHILD = r"""
import importlib.util, os, sys, numpy as np
path, method, rows, module = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import safetensors
# The reader's file alone: importing the wa.models package would pull in jax and transformers, whose start-up
# peak would hide the read's.
spec = importlib.util.spec_from_file_location("safetensors_io", module)
st = importlib.util.module_from_spec(spec)
spec.loader.exec_module(st)
def rss():  # resident bytes now (ru_maxrss would carry the parent's peak across fork and exec)
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
if method == "ranged":
    x = st.SafetensorsFile(path).read("w", (slice(0, rows),))
    held = rss()
else:
    with safetensors.safe_open(path, framework="numpy") as f:
        x = np.array(f.get_slice("w")[0:rows])
        held = rss()   # while the file is open its touched pages are mapped into this process
print((held - base) / 2**20, float(x.sum()))
"""


def main(argv):
    del argv
    from safetensors.numpy import save_file
    cols = 1024
    rows = FLAGS.mib * (1 << 20) // (4 * cols)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        save_file({"w": np.ones((rows, cols), np.float32)}, path)
        out = {"tensor_mib": FLAGS.mib, "slice_mib": FLAGS.mib / FLAGS.parts}
        sums = {}
        for method in ("ranged", "library"):
            r = subprocess.run([sys.executable, "-c", CHILD, path, method, str(rows // FLAGS.parts), MODULE],
                               check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
            mib, total = r.stdout.split()[-2:]
            out[f"{method}_resident_mib"] = round(float(mib), 1)
            sums[method] = float(total)
        assert sums["ranged"] == sums["library"] == (rows // FLAGS.parts) * cols
        out["library_over_ranged"] = round(out["library_resident_mib"] / out["ranged_resident_mib"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
