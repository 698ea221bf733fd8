"""One row per parameter: where it sits in the model and how it is laid out on the mesh."""

from __future__ import annotations

import numpy as np

from wa.parallel import rules as rules_lib


def param_rows(loaded) -> list[dict]:
    specs = rules_lib.flatten(loaded.shardings)
    rows = []
    for path, arr in rules_lib.flatten(loaded.params).items():
        info = loaded.family.classify(path)
        spec = specs[path].spec
        rows.append({
            "path": path,
            "shape": tuple(int(s) for s in arr.shape),
            "dtype": str(arr.dtype),
            "layer": info.layer,
            "component": info.component,
            "role": info.role,
            "spec": str(spec),
            "numel": int(np.prod(arr.shape)),
            "bytes_per_device": rules_lib.bytes_per_device(arr.shape, arr.dtype, spec, loaded.mesh),
        })
    return rows


def totals(rows: list[dict]) -> dict:
    by_component: dict[str, int] = {}
    for r in rows:
        by_component[r["component"]] = by_component.get(r["component"], 0) + r["numel"]
    return {
        "tensors": len(rows),
        "params": sum(r["numel"] for r in rows),
        "bytes": sum(r["numel"] * np.dtype(r["dtype"]).itemsize for r in rows),
        "bytes_per_device": sum(r["bytes_per_device"] for r in rows),
        "params_by_component": by_component,
    }


def format_table(rows: list[dict], tot: dict) -> str:
    cols = ["path", "shape", "dtype", "layer", "component", "role", "spec", "bytes_per_device"]
    cells = [[str(r[c]) if r[c] is not None else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths, strict=True))  # noqa: E731
    out = [line(cols), line(["-" * w for w in widths])] + [line(x) for x in cells]
    comp = ", ".join(f"{k} {v:,}" for k, v in sorted(tot["params_by_component"].items()))
    out.append(f"total: {tot['tensors']} tensors, {tot['params']:,} parameters, {tot['bytes']:,} bytes; "
               f"{tot['bytes_per_device']:,} bytes per device; by component: {comp}")
    return "\n".join(out)
