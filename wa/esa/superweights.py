"""Super weights (Yu et al. 2024, "The Super Weight in Large Language Models").

A super weight sits in an MLP down-projection and produces a massive activation: on some token
the projection's output has one channel far larger than any other (the *row* of the weight), and
that output comes from one input channel that is itself spiking (the *column*). For each
down-projection we record, over the calibration tokens, the largest |output| (its channel o* and
token t*) and the largest |input| on that token (channel i*); the candidate is W[i*, o*] (Flax
Dense kernels are [in, out]; GPT-2's Conv1D kernels [out, in] are handled). Candidates are ranked
by their output spike. Zeroing a candidate is compared with zeroing the same number of the
largest-magnitude weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wa.esa import select, tally


def down_paths(loaded, kernels) -> list[str]:
    return [p for p in kernels if p.endswith("/kernel") and loaded.describe(p).role == "down"]


def spikes(loaded, params, batches, paths) -> dict:
    """Per down-projection: largest |output| (token, channel) and the largest |input| on that token."""
    wanted = {p[: -len("/kernel")] for p in paths}

    def build():
        @jax.jit
        def step(params, batch):
            out = {}
            mask = batch["attention_mask"]

            def interceptor(next_fun, args, kwargs, context):
                y = next_fun(*args, **kwargs)
                name = "/".join(context.module.path)
                if context.method_name == "__call__" and name in wanted:
                    x = args[0].astype(jnp.float32) * mask[..., None]
                    yy = jnp.abs(y.astype(jnp.float32)) * mask[..., None]
                    flat_y = yy.reshape(-1, yy.shape[-1])
                    t = jnp.argmax(flat_y.max(-1))
                    o = jnp.argmax(flat_y[t])
                    xa = jnp.abs(x.reshape(-1, x.shape[-1])[t])
                    i = jnp.argmax(xa)
                    # The medians are taken on the host: XLA's CPU sort made jnp.median of every [tokens,
                    # channels] output cost three forward passes per batch.
                    out[name + "/kernel"] = (flat_y[t, o], o, xa[i], i, flat_y, xa)
                return y

            with nn.intercept_methods(interceptor):
                loaded.forward(params, batch["input_ids"], mask)
            return out
        return step

    step = loaded.compiled(("esa/superweights", tuple(sorted(wanted))), build)
    best: dict = {}
    for batch in batches:
        for p, v in step(params, batch).items():
            y, o, x, i = float(v[0]), int(v[1]), float(v[2]), int(v[3])
            # The median over the tokens the layer computed on: padding (masked to zero) and, for an MoE expert,
            # the tokens the router sent elsewhere (zero input, zero output) are not outputs of the layer.
            ys = np.asarray(v[4])
            ys = ys[ys.max(axis=-1) > 0]
            ymed = float(np.median(ys)) if ys.size else 0.0
            xmed = float(np.median(np.asarray(v[5])))
            if p not in best or y > best[p]["max_out"]:
                best[p] = {"max_out": y, "out_channel": o, "max_in": x, "in_channel": i,
                           "input_axis": loaded.family.input_axis(p), "out_over_median": y / max(ymed, 1e-30),
                           "in_over_median": x / max(xmed, 1e-30)}
    return best


def candidates(loaded, params_flat, spk: dict) -> list[dict]:
    """One candidate per down-projection, strongest output spike first, with its flat index."""
    rows = []
    for p, s in spk.items():
        w = params_flat[p]
        # Dense kernels are [in, out]; GPT-2's Conv1D kernels are [out, in].
        coords = ((s["in_channel"], s["out_channel"]) if s["input_axis"] == 0
                  else (s["out_channel"], s["in_channel"]))
        flat_index = int(np.ravel_multi_index(coords, w.shape))
        info = loaded.describe(p)
        rows.append({"path": p, "layer": info.layer, "coordinates": list(coords), "flat_index": flat_index,
                     "value": float(tally.at(w, [flat_index])[0]), **s})
    rows.sort(key=lambda r: -r["max_out"])
    return rows


def largest_magnitude(params_flat: dict, paths: list[str], n: int) -> dict:
    """The control: the ``n`` largest-|w| weights among ``paths``, model-wide (``select.top_k`` global: ties to
    the earlier tensor, then the lower index)."""
    return select.top_k({p: params_flat[p] for p in paths}, n, "global", "", signed=True)[0]
