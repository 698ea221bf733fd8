"""Greedy decoding for causal LMs (a correctness probe, not a serving path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def greedy(loaded, params, prompt, new_tokens: int, stop_ids=()) -> list[int]:
    """``prompt`` followed by up to ``new_tokens`` greedily chosen tokens.

    The whole fixed-length buffer is re-run each step: causal attention makes position t
    blind to the (unfilled) positions after it, so one compiled step serves every length.
    """
    prompt = list(prompt)
    if not prompt or new_tokens < 1:
        raise ValueError(f"need a non-empty prompt and new_tokens >= 1, got {len(prompt)} and {new_tokens}")
    steps = len(prompt) + new_tokens
    buf = jnp.zeros((1, steps), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt, jnp.int32))

    # The parameters are an argument, not a closure: closed over, a jitted step embeds every weight in the
    # program as a constant (Gemma-3-270M: a gigabyte of constants, minutes before the first token).
    @jax.jit
    def step(params, buf, t):
        logits = loaded.forward(params, buf)[0]
        return buf.at[0, t + 1].set(jnp.argmax(logits[0, t]).astype(jnp.int32))

    out = prompt
    for t in range(len(prompt) - 1, steps - 1):
        buf = step(params, buf, t)
        nxt = int(buf[0, t + 1])
        out.append(nxt)
        if nxt in stop_ids:
            break
    return [int(x) for x in np.asarray(out)]
