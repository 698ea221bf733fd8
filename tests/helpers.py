"""Tiny random checkpoints of every family, written the way HF writes them."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import numpy as np
import transformers as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dimensions divide 4 so that 2x4 meshes shard every matrix.
CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64),
    "gpt_neo": lambda: tf.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=96,
                                       max_position_embeddings=64, window_size=8,
                                       attention_types=[[["global", "local"], 1]]),
    "opt": lambda: tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                vocab_size=96, max_position_embeddings=64, word_embed_proj_dim=32),
    "llama": lambda: tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=64, vocab_size=96,
                                    max_position_embeddings=64, tie_word_embeddings=False),
    # Small enough for an exact Hessian by columns (~600 parameters).
    "llama_micro": lambda: tf.LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=8, vocab_size=12,
                                          max_position_embeddings=16, tie_word_embeddings=False),
    "mistral": lambda: tf.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=96,
                                        max_position_embeddings=64, sliding_window=16,
                                        tie_word_embeddings=False),
    "bert": lambda: tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=96, max_position_embeddings=64),
    "roberta": lambda: tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=96, max_position_embeddings=70),
}


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat(v, p))
        else:
            out[p] = np.asarray(v)
    return out


def reference(name: str, seed: int = 0):
    """wa's model of family ``name`` with random parameters (HF's initialization: normal kernels and embeddings)."""
    import jax

    from wa.models import checkpoint
    model = checkpoint.build_model(CONFIGS[name]())[0]
    return model, jax.device_get(model.init_weights(jax.random.key(seed), (1, 8)))


def write_pt_safetensors(path: str, params: dict, prefix: str | None = None):
    """Writes params in PyTorch layout (names and [out, in] matrices) as safetensors.

    The inverse of transformers' PT->Flax renaming, written independently of wa's loader:
    kernel -> weight (2-D transposed), scale -> weight, embedding -> weight.
    """
    tensors = {}
    for p, a in flat(params).items():
        parts = p.split("/")
        leaf = parts[-1]
        if leaf == "kernel":
            parts[-1], a = "weight", a.T
        elif leaf in ("scale", "embedding"):
            parts[-1] = "weight"
        if prefix:
            parts = [prefix] + parts
        tensors[".".join(parts)] = np.ascontiguousarray(a, np.float32)
    header, offset = {}, 0
    for k, a in tensors.items():
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in tensors.values():
            f.write(a.tobytes())


def write_checkpoint(tmpdir: str, name: str, fmt: str = "msgpack", seed: int = 0):
    """Writes a tiny checkpoint of family ``name``; returns (dir, reference model, params)."""
    model, params = reference(name, seed)
    d = os.path.join(str(tmpdir), f"{name}-{fmt}-{seed}")
    if fmt == "msgpack":
        model.save_pretrained(d, params=params)
    elif fmt == "safetensors":
        model.save_pretrained(d, params=params, safe_serialization=True)
    elif fmt == "pt_safetensors":
        model.config.save_pretrained(d)
        write_pt_safetensors(os.path.join(d, "model.safetensors"), params)
    else:
        raise ValueError(fmt)
    return d, model, params


def run_python(code: str, env_extra: dict | None = None, timeout: int = 600) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=timeout)
    if r.returncode:
        raise AssertionError(f"subprocess failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(module: str, args: list[str], devices_per_process: int = 4, timeout: int = 300,
                  env_extra: dict | None = None):
    """Runs ``python -m module *args COORD 2 PROCESS_ID`` as two local processes (gloo on CPU)."""
    coord = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = REPO
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    procs = [subprocess.Popen([sys.executable, "-m", module, *args, coord, "2", str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        finally:
            p.kill()
    if any(p.returncode for p in procs):
        raise AssertionError("\n\n".join(x[-4000:] for x in logs))


def run_launch(module: str, *args: str, env_extra: dict | None = None, timeout: int = 900, rc: int = 0):
    """``python -m module args`` from the repository root; asserts the exit status is ``rc``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=timeout)
    if r.returncode != rc:
        raise AssertionError(f"{module} exited {r.returncode}, expected {rc}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def one_line_error(r, message: str) -> str:
    """The process ended on one ``error: ...`` line holding ``message`` (exit 2, no traceback)."""
    assert r.returncode == 2, f"exit {r.returncode}:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    return last
