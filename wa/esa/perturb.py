"""Perturbations applied to exactly the selected weights.

Every kind takes a ``scale`` s (the dose, for dose-response curves); each is one ``Perturbation`` record in
``PERTURBATIONS`` (its function, formula and what the dose means), which the checks, the pipeline and the
reports read:

- ``sign_flip``   w -> w (1 - 2s): s = 1 flips the sign, s = 0.5 zeroes, s = 0 leaves w.
- ``zero``        w -> w (1 - s): s = 1 sets to zero.
- ``gauss_noise`` w -> w + s σ ε, ε ~ N(0, 1), σ the standard deviation of the whole tensor the
                  weight belongs to (the layer's std; ``noise_ref="weight"`` uses |w| instead).
- ``bit_flip``    flips bits of the stored number: the listed ``bits`` (0 = least significant;
                  for float32 30 is the exponent's top bit, for bfloat16 14), or, with
                  ``bits=()``, every bit independently with probability ``prob``. ``scale`` is
                  not used. ``encoding="bfloat16"`` flips the bit of the weight's bfloat16 encoding
                  (the weight rounded to bfloat16, flipped, and stored back in the parameters' dtype):
                  how a fault hits a model stored in bfloat16.

Indices are flat indices into each tensor (``wa.esa.select``); the result keeps the
parameters' shardings. Adding a perturbation is one ``Perturbation`` record here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from wa import errors

_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


class PerturbError(errors.ConfigError):
    pass


def _flip_bits(x, key, bits, prob):
    nbits = x.dtype.itemsize * 8
    u = _UINT[x.dtype.itemsize]
    raw = jax.lax.bitcast_convert_type(x, u)
    if bits:
        mask = np.uint64(0)
        for b in bits:
            mask |= np.uint64(1) << np.uint64(b)
        flip = jnp.full(raw.shape, mask, dtype=u)
    else:
        draws = jax.random.bernoulli(key, prob, raw.shape + (nbits,))
        weights = (jnp.ones((), u) << jnp.arange(nbits, dtype=u))
        flip = jnp.sum(jnp.where(draws, weights, jnp.zeros((), u)), axis=-1, dtype=u)
    return jax.lax.bitcast_convert_type(raw ^ flip, x.dtype)


ENCODINGS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def bit_field(bit: int, encoding: str) -> str:
    """Which part of an IEEE-754 number bit ``bit`` is (0 = least significant)."""
    mantissa = {"float32": 23, "bfloat16": 7}[encoding]
    top = jnp.dtype(ENCODINGS[encoding]).itemsize * 8 - 1
    if bit == top:
        return "sign"
    if bit >= mantissa:
        return f"exponent {'MSB' if bit == top - 1 else 'LSB' if bit == mantissa else bit - mantissa}"
    return f"mantissa {'MSB' if bit == mantissa - 1 else bit}"


@dataclasses.dataclass(frozen=True)
class Args:
    """What a perturbation function may read besides the selected values."""
    scale: float
    prob: float
    bits: tuple[int, ...]
    noise_ref: str
    encoding: str | None


@dataclasses.dataclass(frozen=True)
class Perturbation:
    name: str
    # (selected values, the whole tensor, key, Args) -> new values, traced inside jit.
    fn: Callable
    formula: str        # for reports, in the dose s
    dose: str           # what s means
    uses_bits: bool = False   # reads ``bits`` / ``prob`` (and takes ``encoding``) instead of the dose
    random: bool = False      # draws from its key (always; a bit flip only with a per-bit probability)


def _gauss(sel, flat, key, a: Args):
    ref = jnp.std(flat.astype(jnp.float32)) if a.noise_ref == "layer_std" else jnp.abs(sel.astype(jnp.float32))
    return sel + (a.scale * ref * jax.random.normal(key, sel.shape)).astype(sel.dtype)


def _bits(sel, flat, key, a: Args):
    enc = ENCODINGS[a.encoding] if a.encoding else sel.dtype
    return _flip_bits(sel.astype(enc), key, a.bits, a.prob)


PERTURBATIONS = {p.name: p for p in (
    Perturbation("sign_flip", lambda sel, flat, key, a: sel * (1 - 2 * a.scale), "w(1-2s)",
                 "s = 1 flips the sign, 0.5 zeroes, 0 leaves w"),
    Perturbation("zero", lambda sel, flat, key, a: sel * (1 - a.scale), "w(1-s)", "s = 1 sets to zero"),
    Perturbation("gauss_noise", _gauss, "w + s·σ_layer·ε", "noise of s standard deviations of the layer (or of |w|)",
                 random=True),
    Perturbation("bit_flip", _bits, "the chosen bits flipped", "not used: the bits (or a per-bit probability) decide",
                 uses_bits=True),
)}


def uses_key(kind: str, bits=()) -> bool:
    """Whether ``kind`` draws from its key: a deterministic perturbation of one set gives one result, whatever
    the key (so seeds that pick the same set measure it once)."""
    p = PERTURBATIONS[kind]
    return p.random or (p.uses_bits and not bits)


def _one(w, idx, key, kind, scale, prob, bits, noise_ref, encoding=None):
    # By coordinates, not on a flattened copy: a sharded tensor keeps its layout (a reshape would gather it whole
    # onto every device); the functions read the tensor itself only through reductions (its std).
    at = jnp.unravel_index(idx, w.shape)
    new = PERTURBATIONS[kind].fn(w[at], w, key, Args(scale, prob, bits, noise_ref, encoding))
    return w.at[at].set(new.astype(w.dtype))


def formulas(bits=()) -> str:
    """Every perturbation's formula, for reports (``bits``: the bit_flip bits in use)."""
    return "; ".join(f"{p.name}: {p.formula}" + (f" (bits {', '.join(map(str, bits))})" if p.uses_bits and bits
                                                 else "") for p in PERTURBATIONS.values())


def check(kind: str, scale: float = 1.0, prob: float = 0.0, bits=(), dtype=jnp.float32, noise_ref="layer_std",
          encoding: str | None = None):
    if kind not in PERTURBATIONS:
        raise PerturbError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")
    if scale < 0:
        raise PerturbError(f"perturb_scale must be >= 0, got {scale}")
    if not 0 <= prob <= 1:
        raise PerturbError(f"perturb_prob must lie in [0, 1], got {prob}")
    if noise_ref not in ("layer_std", "weight"):
        raise PerturbError(f"noise_ref must be 'layer_std' or 'weight', got {noise_ref!r}")
    if encoding is not None:
        if encoding not in ENCODINGS:
            raise PerturbError(f"bit_flip encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
        dtype = ENCODINGS[encoding]
    nbits = jnp.dtype(dtype).itemsize * 8
    bad = [b for b in bits if not 0 <= int(b) < nbits]
    if bad:
        raise PerturbError(f"bit_flip bits {bad} do not exist in {jnp.dtype(dtype).name} ({nbits} bits)")
    if PERTURBATIONS[kind].uses_bits and not bits and prob == 0:
        raise PerturbError(f"{kind} needs bits to flip or perturb_prob > 0")


def apply(params_flat: dict, selection: dict, kind: str, scale: float = 1.0, key=None, prob: float = 0.0,
          bits=(), noise_ref: str = "layer_std", encoding: str | None = None) -> dict:
    """A new flat parameter dict with ``selection`` perturbed; other tensors are shared."""
    some = next(iter(params_flat.values()))
    check(kind, scale, prob, bits, some.dtype, noise_ref, encoding)
    key = jax.random.key(0) if key is None else key
    out = dict(params_flat)
    for n, (p, idx) in enumerate(sorted(selection.items())):
        if len(idx):
            new = _jitted(params_flat[p], jnp.asarray(idx), jax.random.fold_in(key, n), kind,
                          float(scale), float(prob), tuple(int(b) for b in bits), noise_ref, encoding)
            out[p] = jax.device_put(new, params_flat[p].sharding)
    return out


_jitted = jax.jit(_one, static_argnums=(3, 5, 6, 7, 8))
