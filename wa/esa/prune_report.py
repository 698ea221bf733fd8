"""The pruning run's figures, its readable report and its saved pruned model (``launch.prune``)."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util

from wa import report
from wa.esa import pipeline, saliency, sparsegpt
from wa.esa import report as esa_report
from wa.models import checkpoint

# Saliencies built from ESA's data-dependent scores (the rest: magnitude, Wanda, SparseGPT, the field's anchors).
ESA_GUIDED = ("taylor", "obd_fisher", "obd_hessian")

# The published anchors the table is set beside (WikiText-2 test perplexity, 128 × 2,048 C4 calibration tokens).
ANCHORS = ("Llama-2-7B at 50% unstructured (Sun et al. 2023, Table 3): dense 5.12, magnitude 14.89, SparseGPT 6.51, "
           "Wanda 6.42; LLaMA-7B at 70% (Yin et al. 2024, Table 3): Wanda 85.8, OWL + Wanda 24.6, OWL + SparseGPT "
           "19.5")


def check_save(cfg, plan) -> tuple[str, str, str] | None:
    """``save_pruned`` as (pruner, sparsity label, mode), refused before any compute if the table lacks it."""
    if not cfg.save_pruned:
        return None
    parts = cfg.save_pruned.split("/")
    specs = [saliency.label(x) for x in pipeline.as_list(cfg.prune_sparsity, str, "prune_sparsity")]
    names = pipeline.saliency_pruners(plan)
    names += ["sparsegpt"] * plan.sparsegpt
    names += [f"{n}+owl" for n in names] if plan.owl else []
    ok = len(parts) == 3 and parts[0] in names
    try:
        sp = saliency.label(parts[1]) if ok else None
    except ValueError:
        sp = None
    if sp is not None and sp in specs:
        name, mode = parts[0], parts[2]
        if ":" in sp:
            modes = ("per_output",) if not name.endswith("+owl") else ()
        elif name.startswith("sparsegpt"):
            modes = ("per_layer",)
        else:
            modes = tuple(m for m in plan.prune_modes if not (name.endswith("+owl") and m == "global"))
        if mode in modes:
            return name, sp, mode
    raise pipeline.ConfigError(f"--config.save_pruned={cfg.save_pruned!r}: expected <pruner>/<sparsity>/<mode> "
                               f"from the table: pruners {', '.join(names)}; sparsities {', '.join(specs)}; modes "
                               f"{', '.join(plan.prune_modes)} (N:M: per_output; SparseGPT at a fraction: per_layer)")


def result(cfg, s, table: dict, seconds: dict) -> dict:
    ev = s.data.eval_ids
    return {"model": cfg.model, "ppl_dense": s.base["ppl"], "pruning_ppl": table, "seconds": seconds,
            "protocol": {"calibration_corpus": cfg.corpus, "calibration_windows": cfg.max_samples,
                         "seq_len": cfg.seq_len, "calibration_tokens": int(cfg.max_samples * cfg.seq_len),
                         "eval_corpus": cfg.eval_corpus, "eval_windows": int(len(ev)),
                         "eval_windows_available": int(s.data.eval_available or len(ev)),
                         "eval_tokens": int(s.base["tokens"]), "metrics": cfg.metric},
            "findings": findings(table, s.base["ppl"])}


def _best(row: dict, names) -> tuple[str, str, float] | None:
    cands = [(n, m, p) for n in names if n in row for m, p in row[n].items() if np.isfinite(p)]
    return min(cands, key=lambda c: c[2]) if cands else None


def findings(table: dict, dense: float) -> dict:
    """Per sparsity: the best ESA-guided pruner, Wanda as published (per output row), SparseGPT, magnitude per
    matrix, and which of them ESA-guided saliency beats."""
    out = {}
    for sp, row in table.items():
        esa = _best(row, [n for n in row if n.split("+")[0] in ESA_GUIDED])
        wanda = row.get("wanda", {}).get("per_output")
        gpt = row.get("sparsegpt", {})
        gpt = gpt.get("per_output" if ":" in sp else "per_layer")
        mag = row.get("magnitude", {}).get("per_output" if ":" in sp else "per_layer")
        best = _best(row, list(row)) or (None, None, None)
        f = {"esa_best": esa and {"pruner": esa[0], "mode": esa[1], "ppl": esa[2]}, "wanda_per_output": wanda,
             "sparsegpt": gpt, "magnitude": mag, "best": dict(zip(("pruner", "mode", "ppl"), best, strict=True))}
        if esa and wanda is not None:
            f["esa_beats_wanda"] = bool(esa[2] < wanda)
        if esa and gpt is not None:
            f["esa_beats_sparsegpt"] = bool(esa[2] < gpt)
        if mag and wanda is not None:
            # The published contrast: Wanda's perplexity excess over the dense model, against magnitude's.
            f["wanda_excess_over_magnitude_excess"] = (wanda - dense) / (mag - dense) if mag > dense else None
        out[sp] = f
    return out


def _says(out: dict) -> str:
    lines = []
    for sp, f in out["findings"].items():
        label = sp if ":" in sp else f"{float(sp):.0%}"
        parts = []
        if f.get("esa_best"):
            e = f["esa_best"]
            parts.append(f"best ESA-guided saliency {e['pruner']} ({e['mode']}) {report.number(e['ppl'])}")
        if f.get("wanda_per_output") is not None:
            parts.append(f"Wanda per output {report.number(f['wanda_per_output'])}")
        if f.get("sparsegpt") is not None:
            parts.append(f"SparseGPT {report.number(f['sparsegpt'])}")
        if f.get("magnitude") is not None:
            parts.append(f"magnitude {report.number(f['magnitude'])}")
        verdict = []
        if "esa_beats_wanda" in f:
            verdict.append("beats Wanda" if f["esa_beats_wanda"] else "does not beat Wanda")
        if "esa_beats_sparsegpt" in f:
            verdict.append("beats SparseGPT" if f["esa_beats_sparsegpt"] else "does not beat SparseGPT")
        b = f["best"]
        lines.append(f"- **{label}**: " + ", ".join(parts) + (f"; ESA-guided saliency {' and '.join(verdict)}"
                                                                if verdict else "")
                     + (f"; best overall {b['pruner']} ({b['mode']})" if b.get("pruner") else "") + ".")
        r = f.get("wanda_excess_over_magnitude_excess")
        if r is not None and sp == "0.5":
            lines.append(f"  Wanda's perplexity excess over dense is {r:.2f} of magnitude's (Llama-2-7B, published: "
                         f"(6.42 − 5.12) / (14.89 − 5.12) = 0.13).")
    return "\n".join(lines)


def write(workdir: str, out: dict) -> list[str]:
    """prune.json, prune.md and pruning.png; returns the file names."""
    report.write_json(os.path.join(workdir, "prune.json"), out)
    summary = {"pruning_ppl": out["pruning_ppl"], "ppl_base": out["ppl_dense"]}
    figures = esa_report.plot_pruning(summary, workdir)
    p = out["protocol"]
    whole = ("the whole" if p["eval_windows"] == p["eval_windows_available"] else
             f"the first {p['eval_windows']} of the {p['eval_windows_available']} windows of the")
    text = f"""# One-shot pruning of {out['model']}

Protocol: calibration on {p['calibration_windows']} windows of {p['seq_len']} tokens of `{p['calibration_corpus']}`
({p['calibration_tokens']:,} tokens); perplexity on {whole} `{p['eval_corpus']}` file cut into non-overlapping windows
of {p['seq_len']} ({p['eval_tokens']:,} predicted tokens), as SparseGPT's and Wanda's code evaluate.
Dense perplexity {out['ppl_dense']:.4f}. Scores: {p['metrics']}. Seconds: {out['seconds']}.

Published anchors for scale: {ANCHORS}.

## What it says
{_says(out)}

{esa_report.prune_section(summary, figures)}"""
    report.write_text(os.path.join(workdir, "prune.md"), text)
    return ["prune.json", "prune.md", *figures]


def save(s, sc, cfg, which: tuple[str, str, str], path: str) -> None:
    """The pruned model ``which`` = (pruner, sparsity label, mode) written as an HF checkpoint in the PyTorch
    layout (config.json and model.safetensors): transformers' PyTorch class for the family loads it, and so does
    wa."""
    name, sp, mode = which
    base, owl = name.removesuffix("+owl"), name.endswith("+owl")
    kept = list(sc.first[s.plan.metrics[0]])
    axes = {p: s.loaded.family.input_axis(p) for p in kept}
    spec = sp if ":" in sp else float(sp)
    weights = {p: s.flat[p] for p in kept}
    if owl:
        spec = pipeline.owl_sparsities(s.loaded, sc.first, weights, float(sp))
    flat = dict(s.flat)
    if base == "sparsegpt":
        hess = sparsegpt.grams(s.loaded, s.loaded.params, sc.batches, kept)
        pairs = sparsegpt.prune(s.flat, kept, hess, spec, axes.get)
    else:
        src = weights if base == "magnitude" else sc.first[saliency.SALIENCIES[base].metric]
        sal = saliency.compute(base, src, weights)
        pairs = saliency.prune(weights, sal, spec, mode, None, axes)
    for p, w, *_ in pairs:
        flat[p] = w
    params = traverse_util.unflatten_dict({tuple(k.split("/")): np.asarray(jax.device_get(v)) for k, v in flat.items()})
    checkpoint.save_torch_layout(s.loaded.config, params, path)
