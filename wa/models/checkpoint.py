"""Load a local HF checkpoint directory straight onto its sharding, tensor by tensor.

Weights come from, in this order of preference: ``flax_model.msgpack`` (or its sharded
index), ``model.safetensors`` (or its index; Flax- or PyTorch-layout), ``pytorch_model.bin``
(read without torch by ``wa.models.torch_bin``). Every tensor is checked (name, shape,
finiteness) as it is placed, before any computation; errors name the file and the parameter.

Memory: from safetensors each process reads only the slices its own devices hold
(``jax.make_array_from_callback`` + positioned reads), so no host copy of the model is ever
made, only one transient slice at a time. A msgpack
file is one serialized tree: it is unpacked once (one host copy) and each tensor is freed as
soon as it is on its devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from absl import logging
from flax import serialization, traverse_util
from jax.sharding import Mesh

from wa import errors, runs
from wa.models import bert, gguf_io, gpt, layers, llama
from wa.models import families as fam
from wa.models.safetensors_io import SafetensorsError, SafetensorsFile
from wa.models.torch_bin import TorchBin, TorchBinError
from wa.parallel import mesh as mesh_lib
from wa.parallel import rules as rules_lib

WEIGHT_FILES = ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")


CheckpointError = errors.CheckpointError


@dataclasses.dataclass(eq=False)
class Loaded:
    """A loaded checkpoint: ``model(ids, params=params)`` runs it; ``module`` is its linen module."""
    model: layers.Model
    params: dict
    config: transformers.PretrainedConfig
    family: fam.Family
    mesh: Mesh
    shardings: dict
    path: str
    weights_files: list[str]
    # Tensor type -> {tensors, weights} when the file stored quantized weights (GGUF), else None: magnitudes
    # and bit patterns are then those of the dequantized values (e.g. Q4_1: 16 levels per block of 32).
    quantization: dict | None = None
    licence: str = ""   # the weights' licence where the file states one (GGUF general.license)
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    def compiled(self, key, build):
        """A jitted function built once per model: analyses over many seeds compile once."""
        if key not in self._compiled:
            self._compiled[key] = build()
        return self._compiled[key]

    @property
    def module(self):
        return self.model.module

    def loss(self, params, batch, rng=None):
        return self.family.loss(self.model, params, batch, rng)

    def token_nll(self, params, batch, rng=None):
        return self.family.token_nll(self.model, params, batch, rng)

    def forward(self, params, input_ids, attention_mask=None, train=False, rng=None):
        return self.family.forward(self.model, params, input_ids, attention_mask, train, rng)

    def describe(self, path: str) -> fam.ParamInfo:
        return self.family.classify(path)

    def parts(self, path: str, shape: tuple):
        """(axis, role of each output unit) of a fused tensor (``Family.parts``), else None."""
        return self.family.parts(path, shape, self.config)


@dataclasses.dataclass
class _Tensor:
    """One parameter's source in the file, read lazily and in the Flax layout.

    ``fetch(index)`` returns ``stored[index]`` for an index of slices into the *stored* layout;
    ``transpose`` says the Flax tensor is the stored 2-D matrix transposed.
    """
    file: str
    key: str
    stored_shape: tuple
    fetch: Callable[[tuple], np.ndarray]
    dtype: np.dtype
    transpose: bool = False

    @property
    def shape(self) -> tuple:
        return tuple(self.stored_shape[::-1]) if self.transpose else tuple(self.stored_shape)

    def read(self, index: tuple) -> np.ndarray:
        """The Flax-layout tensor's ``[index]``; reads only what that slice needs."""
        if self.transpose:
            return self.fetch(tuple(index)[::-1]).T
        return self.fetch(tuple(index))


# --------------------------------------------------------------------------- config / model


# Sizes a config.json states: a zero or negative one would build a model with no layers (or fewer tensors than
# the weights hold) instead of failing.
SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "n_layer", "n_embd", "n_head", "n_positions", "n_inner",
               "ffn_dim", "head_dim")


def read_config(path: str) -> transformers.PretrainedConfig:
    path = gguf_io.find(path)
    if gguf_io.is_gguf(path):
        return _gguf_file(path).config()
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a file; give the directory that holds config.json")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.lexists(cfg_file):
        raise CheckpointError(f"{path}: no config.json; is this a HuggingFace checkpoint directory?")
    raw = _json(path, "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: holds a JSON {type(raw).__name__}, expected an object")
    model_type = raw.get("model_type")
    if fam.for_model_type(model_type) is None:
        raise CheckpointError(
            f"{cfg_file}: model_type {model_type!r} is not a family wa knows; known model types: "
            f"{', '.join(sorted(fam.model_types()))}")
    for key in SIZE_FIELDS:
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31):
            # Sizes become array dimensions and int32 token ids: 2**31 overflows a jitted argument.
            raise CheckpointError(f"{cfg_file}: {key}={v!r}; expected an integer in [1, 2**31 - 1]")
    heads = next((raw[k] for k in ("num_attention_heads", "n_head", "num_heads") if raw.get(k)), None)
    hidden = next((raw[k] for k in ("hidden_size", "n_embd") if raw.get(k)), None)
    if heads and hidden and hidden % heads and not raw.get("head_dim"):
        # Each family splits hidden states into heads by reshape (transformers 5 also refuses such a config, in
        # words of its own).
        raise CheckpointError(f"{cfg_file}: num_attention_heads={heads} does not divide hidden_size={hidden}")
    kv = raw.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise CheckpointError(f"{cfg_file}: num_key_value_heads={kv} does not divide num_attention_heads={heads}")
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- 5.x's validators raise huggingface_hub's own error types too
        raise CheckpointError(f"{cfg_file}: transformers cannot read it ({type(e).__name__}: {e})") from e


def build_model(config, dtype=None, family: fam.Family | None = None, scan: bool = False, remat: str = "none",
                loss_chunk: int = 512, mesh=None, moe: str = "dense"):
    """wa's own model for ``config``, no parameters materialised: the llama-like decoder
    (``wa.models.llama.MODEL_TYPES``: ``scan``, ``remat`` and ``moe``, the expert path, apply there), GPT-2, GPT-Neo
    and OPT (``wa.models.gpt``), BERT and RoBERTa (``wa.models.bert``); ``loss_chunk`` for every causal LM."""
    family = family or fam.for_model_type(config.model_type)
    if family is None:
        raise CheckpointError(f"model_type {config.model_type!r} is not a family wa knows; known: "
                              f"{', '.join(sorted(fam.model_types()))}")
    dtype = jnp.float32 if dtype is None else dtype
    if config.model_type in llama.MODEL_TYPES:
        return llama.Model(config, dtype, scan, remat, loss_chunk, mesh, moe), family
    if config.model_type in gpt.MODEL_TYPES:
        return gpt.model(config, dtype, loss_chunk), family
    return bert.model(config, dtype), family


# --------------------------------------------------------------------------- weight sources


def file_inside(root: str, name: str, missing_ok: bool = False) -> str | None:
    """``root/name``, if it resolves to a regular file inside ``root``; otherwise a ``CheckpointError``.

    Checkpoints come from strangers: a weights file may be a link to ``/dev/zero`` or a FIFO, and a shard
    index may name ``/dev/urandom`` or ``../../etc/passwd``. Only regular files whose resolved path stays
    inside the checkpoint directory are read. One exception keeps the Hugging Face cache usable: a
    ``.../snapshots/<revision>`` directory's files are links into the sibling ``blobs`` folder.
    """
    if not isinstance(name, str) or not name:
        raise errors.CheckpointError(f"{root}: file name {name!r} is not a relative path")
    path = os.path.join(root, name)
    real, top = os.path.realpath(path), os.path.realpath(root)
    allowed = [top]
    if os.path.basename(os.path.dirname(top)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(top)), "blobs"))
    if os.path.isabs(name) or not any(os.path.commonpath([real, a]) == a for a in allowed):
        raise errors.CheckpointError(f"{path}: resolves to {real}, outside the checkpoint directory {top}; "
                                     "wa reads only files inside it")
    if missing_ok and not os.path.exists(real):
        return None
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise errors.CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise errors.CheckpointError(f"{path}: is not a regular file (a directory, device, FIFO or socket); "
                                     "expected a file of the checkpoint")
    return path


MAX_JSON_BYTES = 64 << 20   # config.json and shard indexes are kilobytes


def _json(root: str, name: str):
    """A small JSON file of the checkpoint, read only if it is a regular file inside it."""
    file = file_inside(root, name)
    if os.path.getsize(file) > MAX_JSON_BYTES:
        raise CheckpointError(f"{os.path.join(root, name)}: {os.path.getsize(file)} bytes; expected a small JSON "
                              f"file (under {MAX_JSON_BYTES >> 20} MiB)")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{os.path.join(root, name)}: not valid JSON ({e})") from e


def find_weights(path: str) -> list[str]:
    """The weight files of checkpoint ``path``: resolved regular files inside it, index shards included."""
    gguf = gguf_io.find(path)
    if gguf_io.is_gguf(gguf):
        return [gguf]
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} " + ("is a file; give the directory that holds config.json, "
                                                         "or a .gguf file" if os.path.exists(path) else
                                                         "does not exist"))
    for name in WEIGHT_FILES:
        index = os.path.join(path, name + ".index.json")
        if os.path.lexists(index):
            weight_map = _json(path, name + ".index.json")
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: not a valid shard index (expected an object whose weight_map "
                                      "maps tensor names to shard file names)")
            shards = sorted(set(weight_map.values()))
            files = [file_inside(path, s, missing_ok=True) for s in shards]  # none may point outside
            missing = [s for s, f in zip(shards, files, strict=True) if f is None]
            if missing:
                raise CheckpointError(f"{index} lists shard files that are missing: {missing[:5]}")
            return files
        if os.path.lexists(os.path.join(path, name)):
            return [file_inside(path, name)]
    present = sorted(os.listdir(path))
    raise CheckpointError(
        f"{path}: no weights found; expected one of {', '.join(WEIGHT_FILES)} (or a sharded "
        f"*.index.json), the directory holds {present}")


def _gguf_file(path: str) -> gguf_io.GGUFFile:
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    file_inside(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    return gguf_io.open_file(path)


@dataclasses.dataclass
class _GGUFTensor:
    file: gguf_io.GGUFFile
    name: str

    def numpy(self) -> np.ndarray:
        return self.file.array(self.name)


def _from_gguf(file: gguf_io.GGUFFile, flax_paths) -> dict[str, _Tensor]:
    mapping = file.mapping(flax_paths)
    # Placement visits experts/0/w1, w2, w3, experts/1/w1, ...: holding a layer's three stacks dequantizes each
    # once for all its experts (Mixtral-8x7B: 96 stacks instead of 768 reads).
    fetch = _CurrentTensor(keep=3 if any(src.expert is not None for src in mapping.values()) else 1)
    tensors: dict[str, _GGUFTensor] = {}   # one per file tensor, so the fetch above recognises a stack
    out = {}
    for path, src in mapping.items():
        t = tensors.setdefault(src.name, _GGUFTensor(file, src.name))
        shape = file.stored_shape(src.name)
        # An expert reads its slice of the stack (file.mapping checked the stack holds exactly the model's experts).
        lead = () if src.expert is None else (src.expert,)
        out[path] = _Tensor(file.path, src.name, shape[len(lead):], (lambda idx, t=t, lead=lead: fetch(t, lead + idx)),
                            np.dtype(np.float32), src.transpose)
    return out


def identity(path: str) -> dict:
    """Which checkpoint a run read: its path and its weight files' digests (recorded in run folders)."""
    return {"path": os.path.abspath(path), "weights": runs.files_digest(find_weights(path))}


def _from_msgpack(file: str) -> dict[str, _Tensor]:
    try:
        with open(file, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on damaged input
        raise CheckpointError(f"{file}: cannot be read as a flax msgpack checkpoint "
                              f"(truncated or damaged: {type(e).__name__}: {e})") from e
    out = {}
    for p, leaf in rules_lib.flatten(tree).items():
        leaf = np.asarray(leaf)
        out[p] = _Tensor(file, p, leaf.shape, (lambda idx, a=leaf: a[idx]), leaf.dtype)
    return out


def _flax_key(key: tuple, ndim: int, known) -> tuple[tuple, bool]:
    """A PyTorch state-dict key's Flax path and whether its tensor is transposed, by the rules HF's PyTorch-to-Flax
    conversion uses: ``weight`` is a norm's ``scale``, an embedding's ``embedding``, or else a linear layer's
    ``kernel`` (2-D, transposed); the old ``gamma``/``beta`` names are a norm's ``scale``/``bias``. ``known(path)``
    says whether the model has that path (with or without its base-model prefix)."""
    head, last = key[:-1], key[-1]
    if last in ("weight", "gamma") and known(head + ("scale",)):
        return head + ("scale",), False
    if last == "weight" and known(head + ("embedding",)):
        return head + ("embedding",), False
    if last == "weight" and not known(key):
        return head + ("kernel",), ndim == 2
    if last in ("gamma", "beta"):
        return head + ({"gamma": "weight", "beta": "bias"}[last],), False
    return key, False


def torch_key(path: str, ndim: int) -> tuple[str, bool]:
    """``_flax_key``'s inverse: the PyTorch state-dict key of a Flax path ("a/b/kernel") and whether the tensor is
    stored transposed (every 2-D kernel: HF's conversion transposes them all, GPT-2's Conv1D included)."""
    *head, last = path.split("/")
    if last in ("scale", "embedding"):
        return ".".join(head + ["weight"]), False
    if last == "kernel":
        if ndim > 2:
            raise CheckpointError(f"{path}: a {ndim}-D kernel (stacked experts) has no PyTorch layout wa writes")
        return ".".join(head + ["weight"]), ndim == 2
    return ".".join(head + [last]), False


def save_torch_layout(config, params, out_dir: str) -> list[str]:
    """``params`` as an HF checkpoint in the PyTorch layout (config.json, model.safetensors with PyTorch names and
    [out, in] matrices), the files transformers' PyTorch classes and wa both load. Returns the files written."""
    from safetensors.numpy import save_file

    from wa.parallel import rules as rules_lib
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {}
    for p, v in rules_lib.flatten(params).items():
        a = np.asarray(jax.device_get(v))
        key, transpose = torch_key(p, a.ndim)
        tensors[key] = np.ascontiguousarray(a.T if transpose else a)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return ["config.json", "model.safetensors"]


def _pt_key_map(keys, shape_tree, family, prefix) -> tuple[dict, list]:
    """Maps PyTorch state-dict keys to Flax paths (``_flax_key``), adding or dropping the base-model prefix
    (``bert.``, ``transformer.``) as the checkpoint and the model differ."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(shape_tree)
    top = {k[0] for k in flat}
    pt_top = {k.split(".")[0] for k in keys}
    strip = prefix not in top and prefix in pt_top
    add = prefix in top and prefix not in pt_top

    def known(path):
        return path in flat or (prefix,) + path in flat

    mapping, ignored = {}, []
    for key, shape in keys.items():
        if any(re.search(r, key) for r in family.pt_buffers):
            continue
        t = tuple(key.split("."))
        if strip and t[0] == prefix:
            t = t[1:]
        fk, transpose = _flax_key(t, len(shape), known)
        if add and (prefix,) + fk in flat:
            fk = (prefix,) + fk
        if fk not in flat:
            ignored.append(key)
            continue
        if not transpose and len(shape) > 2 and fk[-1] == "kernel":
            raise CheckpointError(f"PyTorch tensor {key!r} needs a layout change wa does not support")
        mapping["/".join(fk)] = (key, transpose)
    return mapping, ignored


def _from_safetensors(files, shape_tree, family, prefix) -> tuple[dict[str, _Tensor], list]:
    readers = []
    for file in files:
        try:
            readers.append(SafetensorsFile(file))
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
    fmt = readers[0].metadata.get("format", "pt")
    out, ignored = {}, []
    if fmt == "flax":
        for r in readers:
            for k in r.keys():
                out[k.replace(".", "/")] = _Tensor(r.path, k, r.shape(k), (lambda idx, r=r, k=k: r.read(k, idx)),
                                                  r.dtype(k))
        return out, ignored
    where = {k: r for r in readers for k in r.keys()}
    mapping, ignored = _pt_key_map({k: r.shape(k) for k, r in where.items()}, shape_tree, family, prefix)
    for path, (key, transpose) in mapping.items():
        r = where[key]
        out[path] = _Tensor(r.path, key, r.shape(key), (lambda idx, r=r, k=key: r.read(k, idx)), r.dtype(key),
                            transpose)
    return out, ignored


class _CurrentTensor:
    """Placement visits tensors one at a time: read a storage once for all of its slices. ``keep`` > 1 holds that
    many recent storages: a GGUF file's expert stacks (gate, up, down) are visited interleaved, expert by expert."""

    def __init__(self, keep: int = 1):
        self.keep, self.arrays = keep, {}

    def __call__(self, tensor, index):
        key = id(tensor)
        if key not in self.arrays:
            while len(self.arrays) >= self.keep:
                self.arrays.pop(next(iter(self.arrays)))
            self.arrays[key] = tensor.numpy()
        return self.arrays[key][index]


def _from_torch_bin(files, shape_tree, family, prefix) -> tuple[dict[str, _Tensor], list]:
    state = {}
    for file in files:
        try:
            archive = TorchBin(file)
        except TorchBinError as e:
            raise CheckpointError(str(e)) from e
        for k, t in archive.tensors.items():
            state[k] = (file, t)
    mapping, ignored = _pt_key_map({k: t.shape for k, (_, t) in state.items()}, shape_tree, family, prefix)

    fetch = _CurrentTensor()
    out = {}
    for path, (key, transpose) in mapping.items():
        file, t = state[key]
        out[path] = _Tensor(file, key, t.shape, (lambda idx, t=t: fetch(t, idx)), t.dtype, transpose)
    return out, ignored


def tensor_sources(path: str, shape_tree, family, prefix) -> tuple[dict[str, _Tensor], list, list]:
    """The tensors of a checkpoint directory (GGUF files are read by ``load`` through ``_from_gguf``)."""
    files = find_weights(path)
    name = os.path.basename(files[0])
    if name.startswith("flax_model"):
        out = {}
        for f in files:
            out.update(_from_msgpack(f))
        return out, [], files
    if name.endswith(".safetensors"):
        return (*_from_safetensors(files, shape_tree, family, prefix), files)
    return (*_from_torch_bin(files, shape_tree, family, prefix), files)


# --------------------------------------------------------------------------- placement


def _place(path: str, src: _Tensor, shape, dtype, sharding) -> jax.Array:
    cache: dict = {}

    def cb(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            part = np.asarray(src.read(index))
            if _is_float(part.dtype):
                bad = ~np.isfinite(part.astype(np.float32))
                if bad.any():
                    raise CheckpointError(
                        f"{src.file}: parameter {path!r} (tensor {src.key!r}) holds "
                        f"{int(bad.sum())} NaN/Inf values, first at index "
                        f"{tuple(int(i) for i in np.argwhere(bad)[0])} of the slice {index}")
            cache[key] = np.ascontiguousarray(part, dtype=dtype)
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), sharding, cb)


def load(path: str, mesh: Mesh | str | None = None, rules=None, dtype=None,
         compute_dtype=None) -> Loaded:
    """Loads checkpoint ``path`` into sharded parameters.

    Args:
      path: local HF checkpoint directory (config.json plus weights), or a llama.cpp ``.gguf`` file (or a
        directory holding one and no config.json): dequantized to float32, see ``wa.models.gguf_io``.
      mesh: a Mesh or an axes string such as ``"data:1,fsdp:-1"``; default all devices on fsdp.
      rules: ordered (regex, PartitionSpec) pairs; default the family's rules.
      dtype: parameter dtype on device (e.g. ``jnp.bfloat16``); default the file's float dtype
        as float32.
      compute_dtype: activation dtype passed to the HF module; default float32.
    """
    path = gguf_io.find(path)
    gguf = _gguf_file(path) if gguf_io.is_gguf(path) else None
    config = gguf.config() if gguf else read_config(path)
    if not isinstance(mesh, Mesh):
        mesh = mesh_lib.make_mesh(mesh or "data:1,fsdp:-1")
    model, family = build_model(config, compute_dtype, mesh=mesh)
    shape_tree = serialization.to_state_dict(model.params_shape_tree)
    rules = family.partition_rules if rules is None else rules
    shardings = rules_lib.shardings_for(shape_tree, rules, mesh)

    expected = rules_lib.flatten(shape_tree)
    if gguf:
        sources, ignored, files = _from_gguf(gguf, expected), [], [path]
    else:
        sources, ignored, files = tensor_sources(path, shape_tree, family, model.base_model_prefix)
    missing = [p for p in expected if p not in sources]
    if missing:
        raise CheckpointError(
            f"{files[0]}: {len(missing)} parameters of the {config.model_type} model are missing from "
            f"the weights, e.g. {missing[:5]}")
    extra = sorted(set(sources) - set(expected)) + ignored
    if extra:
        logging.warning("%s: %d tensors are not parameters of %s and were ignored: %s", files[0],
                        len(extra), type(model).__name__, ", ".join(extra[:20]))
    for p, sd in expected.items():
        got = sources[p].shape
        if tuple(got) != tuple(sd.shape):
            raise CheckpointError(
                f"{sources[p].file}: parameter {p!r} (tensor {sources[p].key!r}) has shape "
                f"{tuple(got)} but config.json implies {tuple(sd.shape)}")
        if _is_float(sd.dtype) and not _is_float(sources[p].dtype):
            raise CheckpointError(
                f"{sources[p].file}: parameter {p!r} (tensor {sources[p].key!r}) is stored as "
                f"{np.dtype(sources[p].dtype).name}; a weight must be a floating-point type (f32, f16, bf16, f64)")

    flat_shardings = rules_lib.flatten(shardings)
    placed = {}
    for p, sd in expected.items():
        want = np.dtype(dtype) if dtype is not None else (
            np.float32 if np.issubdtype(sd.dtype, np.floating) else sd.dtype)
        placed[p] = _place(p, sources.pop(p), sd.shape, want, flat_shardings[p])
    params = traverse_util.unflatten_dict(placed, sep="/")
    logging.info("loaded %s (%s, %d tensors, %d parameters) from %s onto mesh %s",
                 path, config.model_type, len(placed),
                 sum(int(np.prod(a.shape)) for a in placed.values()), files, mesh_lib.describe(mesh))
    return Loaded(model, params, config, family, mesh, shardings, path, files,
                  gguf.quantization() if gguf else None, gguf.licence() if gguf else "")


def _is_float(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating) or np.dtype(dtype).name == "bfloat16"
