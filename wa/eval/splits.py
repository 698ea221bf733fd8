"""Splits of a zoo that never put two checkpoints of one model (or, with ``group='root_id'``, two members of
one family tree) on different sides."""

from __future__ import annotations

import numpy as np
import pandas as pd

from wa import errors


class SplitError(errors.ConfigError):
    pass


def by_group(metadata: pd.DataFrame, fractions=(0.7, 0.15, 0.15), seed: int = 0, group: str = "model_id"
             ) -> dict[str, np.ndarray]:
    """Row indices of ``metadata`` for train / val / test, whole groups at a time."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) < 0:
        raise SplitError(f"fractions {fractions} must be three non-negative numbers summing to 1")
    if group not in metadata:
        raise SplitError(f"no column {group!r} to split by; columns: {list(metadata.columns)[:12]}...")
    keys = np.sort(metadata[group].unique())
    keys = np.random.default_rng(seed).permutation(keys)
    n_train, n_val = int(round(fractions[0] * len(keys))), int(round(fractions[1] * len(keys)))
    parts = {"train": keys[:n_train], "val": keys[n_train:n_train + n_val], "test": keys[n_train + n_val:]}
    g = metadata[group].to_numpy()
    return {k: np.flatnonzero(np.isin(g, v)) for k, v in parts.items()}


def cross_architecture(metadata: pd.DataFrame, held_out: str, column: str = "family", val_fraction: float = 0.15,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Train/val on every ``column`` value but ``held_out``; test on ``held_out``."""
    values = metadata[column].to_numpy()
    if held_out not in set(values):
        raise SplitError(f"{column} {held_out!r} is not in the zoo; it has {sorted(set(values))}")
    rest = metadata[values != held_out]
    s = by_group(rest, (1 - val_fraction, val_fraction, 0.0), seed)
    idx = np.flatnonzero(values != held_out)
    return {"train": idx[s["train"]], "val": idx[s["val"]], "test": np.flatnonzero(values == held_out)}


def by_column(metadata: pd.DataFrame, column: str) -> dict[str, np.ndarray]:
    """A fixed split recorded with the zoo: rows whose ``column`` is "train", "val" or "test" (others are left out),
    e.g. NFN's split of the Small CNN Zoo (``wa.zoo.imports``, column ``nfn_split``)."""
    if column not in metadata:
        raise SplitError(f"split column {column!r} is not in the zoo's metadata (an imported zoo has it where its "
                         "split file was given)")
    v = metadata[column].astype(str).to_numpy()
    out = {k: np.flatnonzero(v == k) for k in ("train", "val", "test")}
    empty = [k for k, idx in out.items() if not len(idx)]
    if empty:
        raise SplitError(f"split column {column!r} marks no row {empty[0]!r}; its values: {sorted(set(v))[:6]}")
    return out
