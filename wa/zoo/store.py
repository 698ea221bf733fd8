"""The zoo on disk: tensorstore zarr weight arrays plus pandas tables.

```
<root>/zoo.json                     format, config, data set, evaluation spec, plan hash, and per layout:
                                    array shape, chunking and the parameter layout (path -> offset, size, shape)
<root>/plan.parquet                 one row per model: architecture, hyperparameters, data characteristics,
                                    generation, parent, root, unit, row in its layout's array
<root>/weights/<layout_id>/         zarr [rows x checkpoints x parameters] float32, chunks [chunk_models, 1, P]
<root>/metadata/unit-<u>.parquet    one row per model and checkpoint of training unit u, with every property
```

Commit protocol (what makes writes resumable and safe for several writers): a unit's weights are written
checkpoint by checkpoint while it trains; its metadata file is written last, atomically (temporary file +
rename). A unit is done exactly when its metadata file exists; a restarted run retrains every unit that is
not, rewriting the same array regions with the same (deterministic) values. Readers see only models whose
unit is done, so a killed run never shows a half-written model. Units start on chunk boundaries
(``plan.assign_rows``), so processes writing different units never touch the same zarr chunk.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os

import numpy as np
import pandas as pd
import tensorstore as ts
from flax import traverse_util

from wa import errors, report

FORMAT = "wa-zoo/1"


class StoreError(errors.DataError):
    pass


# ---- parameter layouts ---------------------------------------------------------------------------------
def layout_of(params) -> list[dict]:
    """Flat layout of one model's parameter pytree: sorted paths, offsets, sizes and shapes."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out, off = [], 0
    for path in sorted(flat):
        shape = list(np.shape(flat[path]))
        size = int(np.prod(shape, dtype=np.int64))
        out.append({"path": path, "offset": off, "size": size, "shape": shape})
        off += size
    return out


def n_params(layout: list[dict]) -> int:
    return layout[-1]["offset"] + layout[-1]["size"] if layout else 0


def to_flat(params, layout: list[dict], batched: bool = True) -> np.ndarray:
    """[N, P] from a population pytree (leaves [N, ...]); [P] from one model's when not ``batched``."""
    flat = traverse_util.flatten_dict(params, sep="/")
    if not batched:
        return np.concatenate([np.asarray(flat[e["path"]], np.float32).reshape(-1) for e in layout])
    return np.concatenate([np.asarray(flat[e["path"]], np.float32).reshape(np.shape(flat[e["path"]])[0], -1)
                           for e in layout], axis=1)


def from_flat(vec: np.ndarray, layout: list[dict]):
    """One model's parameter pytree from its flat vector [P] (or a population's from [N, P])."""
    lead = vec.shape[:-1]
    flat = {e["path"]: vec[..., e["offset"]: e["offset"] + e["size"]].reshape(*lead, *e["shape"]) for e in layout}
    return traverse_util.unflatten_dict(flat, sep="/")


def plan_hash(plan: pd.DataFrame) -> str:
    return hashlib.sha256(plan.to_json(orient="records", double_precision=15).encode()).hexdigest()[:16]


def _write_parquet(df: pd.DataFrame, path: str) -> None:
    with report.atomic(path) as tmp:
        df.to_parquet(tmp, index=False)


def _array_spec(path: str) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


class Zoo:
    """A zoo folder. ``Zoo.open(path)`` to read; ``Zoo.create`` (the builder's) to start or resume one."""

    def __init__(self, path: str):
        self.path = path
        info_path = os.path.join(path, "zoo.json")
        if not os.path.exists(info_path):
            raise StoreError(f"{path} is not a zoo: {info_path} does not exist")
        with open(info_path) as f:
            self.info = json.load(f)
        if self.info.get("format") != FORMAT:
            raise StoreError(f"{info_path}: format {self.info.get('format')!r}, expected {FORMAT!r}")
        self.plan = pd.read_parquet(os.path.join(path, "plan.parquet")).set_index("model_id", drop=False)
        self._arrays: dict[str, ts.TensorStore] = {}

    # ---- creating ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, plan: pd.DataFrame, layouts: dict[str, list[dict]], n_checkpoints: int,
               chunk_models: int, info: dict) -> Zoo:
        """Creates the zoo, or checks that the one at ``path`` has this very plan (then it resumes)."""
        h = plan_hash(plan)
        if os.path.exists(os.path.join(path, "zoo.json")):
            zoo = cls(path)
            if zoo.info["plan_hash"] != h:
                raise StoreError(f"{path} holds a zoo built from a different plan (hash {zoo.info['plan_hash']}, this "
                                 f"config gives {h}); use another --workdir, or delete {path} to start over")
            return zoo
        os.makedirs(os.path.join(path, "metadata"), exist_ok=True)
        arrays = {}
        for lid, layout in layouts.items():
            rows = int(plan.loc[plan["layout_id"] == lid, "row"].max()) + 1
            rows = -(-rows // chunk_models) * chunk_models
            p = n_params(layout)
            ts.open(dict(_array_spec(os.path.join(path, "weights", lid)), metadata={
                "shape": [rows, n_checkpoints, p], "chunks": [chunk_models, 1, p], "dtype": "<f4",
                "fill_value": "NaN", "compressor": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}}),
                create=True, delete_existing=True).result()
            arrays[lid] = {"rows": rows, "n_checkpoints": n_checkpoints, "n_params": p, "chunk_models": chunk_models,
                           "layout": layout}
        _write_parquet(plan.reset_index(drop=True), os.path.join(path, "plan.parquet"))
        info = dict(info, format=FORMAT, plan_hash=h, n_models=len(plan), arrays=arrays)
        report.write_json(os.path.join(path, "zoo.json"), info)  # last: a zoo.json means the zoo is fully set up
        return cls(path)

    # ---- writing (builder) -----------------------------------------------------------------------------
    def array(self, layout_id: str) -> ts.TensorStore:
        if layout_id not in self._arrays:
            if layout_id not in self.info["arrays"]:
                raise StoreError(f"{self.path}: no weight array {layout_id!r}; it has {sorted(self.info['arrays'])}")
            self._arrays[layout_id] = ts.open(_array_spec(os.path.join(self.path, "weights", layout_id)),
                                              open=True).result()
        return self._arrays[layout_id]

    def write(self, layout_id: str, row_start: int, checkpoint: int, flat: np.ndarray) -> None:
        self.array(layout_id)[row_start: row_start + len(flat), checkpoint, :].write(
            np.asarray(flat, np.float32)).result()

    def commit(self, unit: int, records: list[dict]) -> None:
        _write_parquet(pd.DataFrame(records), self._unit_path(unit))
        self.__dict__.pop("metadata", None)

    def _unit_path(self, unit: int) -> str:
        return os.path.join(self.path, "metadata", f"unit-{unit:05d}.parquet")

    def done_units(self) -> set[int]:
        parts = glob.glob(os.path.join(self.path, "metadata", "unit-*.parquet"))
        return {int(os.path.basename(p)[5:10]) for p in parts}

    # ---- reading -----------------------------------------------------------------------------------
    @functools.cached_property
    def metadata(self) -> pd.DataFrame:
        """One row per finished model and checkpoint: properties joined with the model's plan row."""
        parts = sorted(glob.glob(os.path.join(self.path, "metadata", "unit-*.parquet")))
        if not parts:
            return pd.DataFrame(columns=["model_id", "checkpoint", "epoch"])
        props = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        plan = self.plan.reset_index(drop=True)
        df = props.merge(plan, on="model_id", how="left", validate="many_to_one")
        return df.sort_values(["model_id", "checkpoint"], kind="stable").reset_index(drop=True)

    def final(self) -> pd.DataFrame:
        """The metadata row of every finished model's last checkpoint."""
        md = self.metadata
        return md.loc[md.groupby("model_id")["checkpoint"].idxmax()]

    def layout(self, layout_id: str) -> pd.DataFrame:
        return pd.DataFrame(self.info["arrays"][layout_id]["layout"])

    def _locate(self, model_id: int, step: int | None) -> tuple[str, int, int]:
        md = self.metadata
        rows = md[md["model_id"] == model_id]
        if rows.empty:
            known = model_id in self.plan.index
            raise StoreError(f"{self.path}: model {model_id} " + ("is planned but not finished yet" if known else
                             f"does not exist (ids 0..{len(self.plan) - 1})"))
        if step is None:
            r = rows.iloc[-1]
        else:
            hit = rows[rows["epoch"] == step]
            if hit.empty:
                raise StoreError(f"model {model_id} has no checkpoint at epoch {step}; it has {rows['epoch'].tolist()}")
            r = hit.iloc[0]
        return r["layout_id"], int(r["row"]), int(r["checkpoint"])

    def load_flat(self, model_id: int, step: int | None = None) -> np.ndarray:
        lid, row, ck = self._locate(model_id, step)
        return self.array(lid)[row, ck, :].read().result()

    def load(self, model_id: int, step: int | None = None):
        """The model's parameter pytree at epoch ``step`` (default: its last checkpoint)."""
        lid, row, ck = self._locate(model_id, step)
        return from_flat(self.array(lid)[row, ck, :].read().result(), self.info["arrays"][lid]["layout"])

    def weights(self, layout_id: str, rows, checkpoint: int) -> np.ndarray:
        """[len(rows), P] flat weights of many models of one layout at one checkpoint index."""
        rows = np.asarray(rows, np.int64)
        arr = self.array(layout_id)
        if len(rows) and np.all(np.diff(rows) == 1):
            return arr[int(rows[0]): int(rows[-1]) + 1, checkpoint, :].read().result()
        return arr[rows, checkpoint, :].read().result()

    def select(self, query: str) -> pd.DataFrame:
        """Metadata rows matching a pandas query, e.g. ``'family == "cnn" and test_acc > 0.9'``."""
        return self.metadata.query(query)

    @classmethod
    def open(cls, path: str) -> Zoo:
        return cls(path)
