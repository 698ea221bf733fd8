"""A few hundred mutations of a tiny valid GGUF file (llama.cpp's own conversion of the Qwen2 fixture): truncations
anywhere, and bytes changed in the header, metadata and tensor infos. Each must end in one of wa's errors or in a
load of what the mutated file says — never another exception, a hang, or a read outside the file."""

import os
import random
import signal

from flax import serialization

from wa import errors, models
from wa.models import gguf_io
from wa.parallel import rules

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "decoders", "qwen2", "model.gguf")


def _read(path, expected):
    """What models.load reads from a GGUF file before placing anything: config, tensor map, every tensor."""
    f = gguf_io.GGUFFile(path)
    f.config()
    for src in f.mapping(expected).values():
        f.array(src.name)


def test_mutated_gguf_files_end_in_a_wa_error_or_a_load(tmp_path):
    data = open(SOURCE, "rb").read()
    header = gguf_io.GGUFFile(SOURCE).reader.data_offset
    model, _ = models.build_model(models.read_config(SOURCE))
    expected = rules.flatten(serialization.to_state_dict(model.params_shape_tree))
    rng = random.Random(0)

    def too_long(*_):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, too_long)
    outcomes, unexpected = {"error": 0, "load": 0}, []
    try:
        for i in range(300):
            b = bytearray(data)
            if i < 60:
                b = b[:rng.randrange(0, len(data))]
            else:
                for _ in range(rng.choice((1, 1, 2, 4))):
                    b[rng.randrange(0, header)] = rng.randrange(256)
            path = tmp_path / f"m{i}.gguf"
            path.write_bytes(bytes(b))
            signal.alarm(10)
            try:
                _read(str(path), expected)
                outcomes["load"] += 1
            except errors.WaError:
                outcomes["error"] += 1
            except Exception as e:  # noqa: BLE001 - what the test looks for
                unexpected.append((i, f"{type(e).__name__}: {e}"[:200]))
            finally:
                signal.alarm(0)
            path.unlink()
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not unexpected, unexpected[:5]
    assert outcomes["error"] > 200 and sum(outcomes.values()) == 300
