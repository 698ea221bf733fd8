"""The ESA experiment as stages, each returning a frozen record:

  setup -> Setup  ->  score -> (Scores, Selections)  ->  compare -> Agreement  ->  perturb_sets, prune_study,
  fault_study, super_weight_study -> Perturbations  ->  summarize (the statistics: summary.json's figures)
  ->  wa.esa.verdicts (the criteria)

``run(cfg)`` calls them in order and returns the ``Analysis``; ``wa.esa.job.run`` adds the run folder and
``wa.esa.report`` renders. Every config error is raised by ``check`` (no model needed) or ``setup`` before the
first gradient is taken.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from wa import errors, hostmem, models, parallel
from wa.data import paths, text, tokenizers
from wa.esa import apart as apart_lib
from wa.esa import (
    architecture,
    evaluate,
    perturb,
    saliency,
    scores,
    select,
    sparsegpt,
    spectra,
    stats,
    superweights,
    timing,
)
from wa.esa import experts as experts_lib
from wa.parallel import rules as rules_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONTROLS = ("random_k", "bottom_k")
CONTROL_DOSES = ("all", "largest")


class ConfigError(errors.ConfigError):
    pass


def as_list(value, cast=str, name="value") -> list:
    """'a,b' or ('a', 'b') -> list, each item cast."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    try:
        return [cast(v) for v in items]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{name}={value!r}: cannot read as a list of {cast.__name__} ({e})") from e


@dataclasses.dataclass
class Plan:
    """The config, read and checked."""
    metrics: list[str]
    seeds: list[int]
    kinds: list[str]
    scales: list[float]
    controls: list[str]
    bits: tuple[int, ...]
    prune_modes: tuple[str, ...] = ("per_layer",)
    sparsegpt: bool = False       # SparseGPT beside the saliencies in the pruning study
    owl: bool = False             # every pruner also at OWL's outlier-weighted layer sparsities
    fault_metrics: tuple[str, ...] = ()
    fault_bits: dict = dataclasses.field(default_factory=dict)   # encoding -> bits
    control_doses: str = "all"    # "all", or "largest": the controls at each perturbation's largest dose only


def check(cfg) -> Plan:
    """Every config error that needs no model or data."""
    metrics = as_list(cfg.metric, str, "metric")
    unknown = [m for m in metrics if m not in scores.SCORES]
    if not metrics or unknown:
        raise ConfigError(f"--config.metric: unknown metric {unknown or metrics!r}; known: {', '.join(scores.SCORES)}")
    seeds = as_list(cfg.seeds, int, "seeds")
    if not seeds:
        raise ConfigError("--config.seeds is empty; give at least one seed")
    check_bos(cfg)
    kinds = as_list(cfg.perturb, str, "perturb")
    for k in kinds:
        if k not in perturb.PERTURBATIONS:
            raise ConfigError(f"--config.perturb: unknown perturbation {k!r}; known: "
                              f"{', '.join(perturb.PERTURBATIONS)}")
    scales = as_list(cfg.perturb_scale, float, "perturb_scale")
    if not scales or any(s < 0 for s in scales):
        raise ConfigError(f"--config.perturb_scale={cfg.perturb_scale!r}: scales must be >= 0")
    controls = as_list(cfg.controls, str, "controls")
    for c in controls:
        if c not in CONTROLS:
            raise ConfigError(f"--config.controls: unknown control {c!r}; known: {', '.join(CONTROLS)}")
    if cfg.mode not in ("per_layer", "global"):
        raise ConfigError(f"--config.mode={cfg.mode!r}: expected per_layer or global")
    try:
        select.resolve_k(cfg.topk, 10**12)
    except select.SelectionError as e:
        raise ConfigError(f"--config.topk={cfg.topk!r}: {e}") from e
    if cfg.perturb_batching not in evaluate.BATCHING:
        raise ConfigError(f"--config.perturb_batching={cfg.perturb_batching!r}: expected one of "
                          f"{', '.join(evaluate.BATCHING)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--config.dtype={cfg.dtype!r}: expected one of {sorted(DTYPES)}")
    for k in ("max_samples", "seq_len", "batch_size", "eval_windows", "probes", "probe_chunk", "window_chunk",
              "perturb_group"):
        if cfg[k] < 1 and not (k == "eval_windows" and cfg.get("eval_corpus", "") and cfg[k] == 0):
            raise ConfigError(f"--config.{k}={cfg[k]}: must be positive")
    if cfg.get("super_weights_each", 0) < 0:
        raise ConfigError(f"--config.super_weights_each={cfg.super_weights_each}: must be >= 0 (0: every candidate)")
    if "random_k" in controls and cfg.random_draws < 1:
        raise ConfigError(f"--config.random_draws={cfg.random_draws}: the random_k control needs >= 1")
    for sp in as_list(cfg.prune_sparsity, str, "prune_sparsity"):
        try:
            saliency.pattern(sp)
        except ValueError as e:
            raise ConfigError(f"--config.prune_sparsity: {e}") from e
    if not 0 < cfg.heldout_fraction < 1:
        raise ConfigError(f"--config.heldout_fraction={cfg.heldout_fraction}: must lie in (0, 1)")
    bits = tuple(as_list(cfg.bit_flip_bits, int, "bit_flip_bits"))
    for k in kinds:
        try:
            perturb.check(k, max(scales), cfg.perturb_prob, bits if perturb.PERTURBATIONS[k].uses_bits else (),
                          DTYPES[cfg.dtype],
                          cfg.noise_ref)
        except perturb.PerturbError as e:
            raise ConfigError(f"--config.perturb={k}: {e}") from e
    modes = tuple(as_list(cfg.get("prune_modes", "per_layer"), str, "prune_modes"))
    bad = [m for m in modes if m not in saliency.MODES]
    if bad or not modes:
        raise ConfigError(f"--config.prune_modes: {bad or modes!r}; expected some of {', '.join(saliency.MODES)}")
    fault_metrics = tuple(as_list(cfg.get("fault_metrics", ""), str, "fault_metrics"))
    bad = [m for m in fault_metrics if m not in metrics]
    if bad:
        raise ConfigError(f"--config.fault_metrics: {bad} are not among --config.metric={cfg.metric!r}")
    fault_bits = {}
    for enc in perturb.ENCODINGS:
        fault_bits[enc] = tuple(as_list(cfg.get(f"fault_bits_{enc}", ""), int, f"fault_bits_{enc}"))
        try:
            perturb.check("bit_flip", bits=fault_bits[enc], encoding=enc, prob=0.0 if fault_bits[enc] else 1.0)
        except perturb.PerturbError as e:
            raise ConfigError(f"--config.fault_bits_{enc}: {e}") from e
    if fault_metrics and cfg.fault_random_draws < 0:
        raise ConfigError(f"--config.fault_random_draws={cfg.fault_random_draws}: must be >= 0")
    control_doses = cfg.get("control_doses", "all")
    if control_doses not in CONTROL_DOSES:
        raise ConfigError(f"--config.control_doses={control_doses!r}: expected one of {', '.join(CONTROL_DOSES)}")
    return Plan(metrics, seeds, kinds, scales, controls, bits, modes, bool(cfg.get("prune_sparsegpt", False)),
                bool(cfg.get("prune_owl", False)), fault_metrics, {e: b for e, b in fault_bits.items() if b},
                control_doses)


@dataclasses.dataclass
class Data:
    cal_ids: np.ndarray
    cal_mask: np.ndarray
    eval_ids: np.ndarray
    eval_mask: np.ndarray
    documents: int
    heldout_documents: int
    decode: object = None   # token id -> its text (the apart report names embedding rows by their token)
    eval_available: int = 0  # held-out windows there were before ``eval_windows`` cut them (eval_corpus)
    piece: object = None    # token id -> its text with the space that opens a word (``tokenizers.piece``)


def check_bos(cfg) -> None:
    """``bos`` (BOS before each document) and ``window_bos`` (before each window) exclude each other; the main job's
    config has both fields too."""
    if cfg.get("bos", True) and cfg.get("window_bos", False):
        raise ConfigError("--config.bos and --config.window_bos: choose one (BOS before each document, or before "
                          "each window of a stream without it)")


def window_start(cfg, tok, name: str) -> int | None:
    """The token every window starts with: BOS under ``window_bos`` (Gemma is trained always to see it first)."""
    if not cfg.get("window_bos", False):
        return None
    if tok.bos_id is None:
        raise ConfigError(f"--config.window_bos: the tokenizer of {name!r} has no BOS token")
    return tok.bos_id


def check_seq_len(config, seq_len: int) -> None:
    """``seq_len`` within the model config's ``max_position_embeddings``."""
    max_len = getattr(config, "max_position_embeddings", None)
    if max_len and seq_len > max_len:
        raise ConfigError(f"--config.seq_len={seq_len} exceeds the model's max_position_embeddings={max_len}")


def check_inputs(cfg) -> None:
    """What the files can refuse before a run folder is claimed: the checkpoint's config (the sequence length)
    and the corpus. A refused run leaves its --workdir as it found it."""
    check_seq_len(models.read_config(paths.checkpoint(cfg.model)), cfg.seq_len)
    text.read(cfg.corpus)
    if cfg.get("eval_corpus", ""):
        text.read(cfg.eval_corpus)


def prepare_data(cfg, loaded, ckpt) -> Data:
    """Calibration windows from ``corpus`` and held-out windows: its last documents, or with ``eval_corpus``
    that whole file as one stream in non-overlapping windows (the pruning papers' protocol; then every document
    of ``corpus`` calibrates, and ``eval_windows`` 0 keeps every window)."""
    check_seq_len(loaded.config, cfg.seq_len)
    docs = text.documents(text.read(cfg.corpus), cfg.doc_split)
    if cfg.get("eval_corpus", ""):
        tok = tokenizers.get(ckpt)
        bos, first = cfg.get("bos", True), window_start(cfg, tok, cfg.model)
        cal_ids, cal_mask = text.lm_windows(text.token_stream(docs, tok, bos=bos), cfg.seq_len, first)
        ev_ids, ev_mask = text.disjoint_windows(text.token_stream([text.read(cfg.eval_corpus)], tok, bos=bos),
                                                cfg.seq_len)
        keep = cfg.eval_windows or len(ev_ids)
        return Data(cal_ids, cal_mask, ev_ids[:keep], ev_mask[:keep], len(docs), 1, lambda i: tok.decode([i]),
                    len(ev_ids), functools.partial(tokenizers.piece, tok))
    n_eval = max(1, int(round(len(docs) * cfg.heldout_fraction)))
    if len(docs) - n_eval < 1:
        raise ConfigError(f"--config.corpus={cfg.corpus!r}: {len(docs)} documents cannot be split into "
                          "calibration and held-out parts")
    tok = tokenizers.get(ckpt)
    bos, first = cfg.get("bos", True), window_start(cfg, tok, cfg.model)
    cal_ids, cal_mask = text.lm_windows(text.token_stream(docs[:-n_eval], tok, bos=bos), cfg.seq_len, first)
    ev_ids, ev_mask = text.lm_windows(text.token_stream(docs[-n_eval:], tok, bos=bos), cfg.seq_len, first)
    return Data(cal_ids, cal_mask, ev_ids[:cfg.eval_windows], ev_mask[:cfg.eval_windows], len(docs), n_eval,
                lambda i: tok.decode([i]), piece=functools.partial(tokenizers.piece, tok))


def _deltas(loaded, kept, data, cfg, base_ppl, sets, bar=None, clock=None) -> list[float]:
    """ΔPPL for each perturbed flat parameter set ``sets`` yields (consumed lazily, as ``cfg.perturb_batching``
    evaluates them); each evaluation's time goes to ``clock``."""
    out = []
    for r in evaluate.evaluate_many(loaded, sets, kept, data.eval_ids, data.eval_mask, cfg.batch_size,
                                    cfg.perturb_group, progress=bar.update if bar is not None else None,
                                    how=cfg.perturb_batching):
        if clock is not None:
            clock.evaluated(r["seconds"])
        # A perturbation that overflows the forward pass (a flipped exponent bit) leaves a NaN or
        # infinite loss: the model is destroyed, the worst possible outcome, so ΔPPL = +inf.
        out.append(r["ppl"] - base_ppl if np.isfinite(r["ppl"]) else float("inf"))
    return out


def _applied(flat, jobs):
    """The perturbed parameter sets of ``jobs`` ``(selection, perturb.apply keywords)``, built one at a time."""
    return (perturb.apply(flat, sel, **kw) for sel, kw in jobs)


def stability_points(cfg) -> list[int]:
    """Calibration windows per seed at which the stability curve is read: every doubling of the batch size up to
    ``max_samples`` (batch ends), and ``max_samples`` itself; one point (no curve) without a stability check."""
    if not cfg.stability_check:
        return [cfg.max_samples]
    pts, n = [], cfg.batch_size
    while n < cfg.max_samples:
        pts.append(n)
        n *= 2
    return pts + [cfg.max_samples]


def seed_windows(n_windows: int, max_samples: int, seeds: list[int]) -> dict[int, np.ndarray]:
    """Disjoint sets of ``max_samples`` calibration windows, one per seed, from one shuffle of all windows.

    Disjoint, so agreement between seeds measures stability across data rather than shared windows.
    """
    need = max_samples * len(seeds)
    if n_windows < need:
        raise ConfigError(f"--config.max_samples={max_samples} × {len(seeds)} seeds = {need} disjoint calibration "
                          f"windows, but the calibration part holds {n_windows}; lower max_samples or seq_len, or "
                          "use fewer seeds")
    order = np.random.default_rng(seeds[0]).permutation(n_windows)
    return {s: np.sort(order[i * max_samples:(i + 1) * max_samples]) for i, s in enumerate(seeds)}


def calibration_batches(loaded, data, cfg, pick: np.ndarray) -> list[dict]:
    """Calibration windows ``pick`` as global batches."""
    return scores.window_batches(loaded, data.cal_ids[pick], data.cal_mask[pick], cfg.batch_size)


def super_weight_study(loaded, flat, kept, data, cfg, base_ppl, batches, clock=None) -> dict | None:
    """Zero each down-projection's super-weight candidate; control: the largest-|w| weight(s)."""
    downs = superweights.down_paths(loaded, kept)
    if not downs:
        return None
    cands = superweights.candidates(loaded, flat, superweights.spikes(loaded, loaded.params, batches, downs))
    every: dict = {}
    for c in cands:
        every.setdefault(c["path"], []).append(c["flat_index"])
    n = len(cands)
    zero = {"kind": "zero"}
    # One at a time: the strongest spikes first, as many as cfg.super_weights_each allows (0: every candidate).
    each = cands[:cfg.super_weights_each or n]
    jobs = [job for c in each for job in (({c["path"]: np.array([c["flat_index"]])}, zero),
                                          (superweights.largest_magnitude(flat, [c["path"]], 1), zero))]
    jobs += [({p: np.asarray(v) for p, v in every.items()}, zero),
             (superweights.largest_magnitude(flat, kept, n), zero)]
    d = _deltas(loaded, kept, data, cfg, base_ppl, _applied(flat, jobs), clock=clock)
    for i, c in enumerate(cands):
        c["dppl_zero"], c["dppl_zero_largest_in_matrix"] = (d[2 * i], d[2 * i + 1]) if i < len(each) else (None, None)
    return {"candidates": cands, "dppl_zero_all_candidates": d[-2], "dppl_zero_largest_magnitude": d[-1], "n": n,
            "ppl_base": base_ppl}


def fault_study(loaded, flat, kept, sels, data, cfg, base_ppl, plan, progress=True, clock=None) -> dict | None:
    """Fault tolerance: flip one bit, by position, of every weight of the first seed's top-k (per fault metric)
    and of same-size random-k draws, in each encoding; ΔPPL per (encoding, bit, set)."""
    if not plan.fault_metrics or not plan.fault_bits:
        return None
    seed = plan.seeds[0]
    rand = [select.random_k(flat, cfg.topk, cfg.mode, cfg.param_filter, seed * 1000 + 500 + r)
            for r in range(cfg.fault_random_draws)]
    cells, jobs = [], []
    for enc, bits in plan.fault_bits.items():
        for b in bits:
            kw = {"kind": "bit_flip", "bits": (b,), "encoding": enc}
            for m in plan.fault_metrics:
                cells.append((enc, b, m))
                jobs.append((sels[m, seed], kw))
            for r, sel in enumerate(rand):
                cells.append((enc, b, f"random_k/{r}"))
                jobs.append((sel, kw))
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="bit flips", disable=not progress or jax.process_index() > 0)
    deltas = _deltas(loaded, kept, data, cfg, base_ppl, _applied(flat, jobs), bar, clock)
    bar.close()
    out: dict = {}
    for (enc, b, who), d in zip(cells, deltas, strict=True):
        row = out.setdefault(enc, {}).setdefault(str(b), {"field": perturb.bit_field(b, enc), "topk": {},
                                                            "random_k": []})
        if who.startswith("random_k/"):
            row["random_k"].append(d)
        else:
            row["topk"][who] = d
    return out


def saliency_pruners(plan) -> list[str]:
    """The saliencies the pruning study runs: magnitude (the baseline, always) and those whose score is computed."""
    return ["magnitude"] + [n for n in saliency.available(plan.metrics) if n != "magnitude"]


def owl_sparsities(loaded, first: dict, weights: dict, fraction: float) -> dict:
    """OWL's {path: sparsity} around ``fraction`` for the matrices of ``weights``, the outlier shares read from
    Wanda's scores as in the paper (|W| where ``act_mag`` was not computed)."""
    src = first.get("act_mag") or weights   # owl reads |score|: |W| itself
    return saliency.owl(src, {p: loaded.family.classify(p).layer for p in weights}, fraction)


def prune_study(loaded, flat, first, data, cfg, base_ppl, plan, progress=True, clock=None, batches=()) -> dict:
    """Remove the weights with the lowest saliency (``wa.esa.saliency``: the estimated cost of removing each
    weight) at each sparsity — a fraction of every matrix, of the model or of every output row, or an N:M pattern
    along each row — and, with ``plan.sparsegpt``, prune by SparseGPT from the calibration ``batches``:
    perplexity at equal sparsity, {sparsity label: {pruner: {mode: ppl}}}. With ``plan.owl`` every pruner also
    runs at OWL's layer sparsities (``<pruner>+owl``; fractions, per matrix and per output row).

    Magnitude pruning is always included as the baseline; the other saliencies need their score among the
    metrics. Scores are the first seed's. One saliency and one pruned model exist at a time. SparseGPT chooses its
    mask per block of each matrix (the same share of every matrix: ``per_layer``; N:M: ``per_output``).
    """
    kept = list(first[plan.metrics[0]])
    weights = {p: flat[p] for p in kept}
    axes = {p: loaded.family.input_axis(p) for p in kept}
    names = saliency_pruners(plan)
    specs = [saliency.label(x) for x in as_list(cfg.prune_sparsity, str, "prune_sparsity")]
    fractions = [x for x in specs if ":" not in x]
    owl_modes = tuple(m for m in plan.prune_modes if m != "global") if plan.owl else ()
    layer_sparsity = {sp: owl_sparsities(loaded, first, weights, float(sp)) for sp in fractions} if owl_modes else {}

    def modes(sp):
        return ("per_output",) if ":" in sp else plan.prune_modes

    def at(sp):
        return sp if ":" in sp else float(sp)

    n_cells = (len(names) * (sum(len(modes(sp)) for sp in specs) + len(fractions) * len(owl_modes))
               + plan.sparsegpt * (len(specs) + (len(fractions) if owl_modes else 0)))
    cells = []   # (pruner, sparsity, mode) of each model, recorded as ``pruned`` yields it

    def model(cell, pairs):
        cells.append(cell)
        out = dict(flat)
        for p, w, *_ in pairs:
            out[p] = jax.device_put(w, flat[p].sharding)
        return out

    def pruned():
        for name in names:
            src = weights if name == "magnitude" else first[saliency.SALIENCIES[name].metric]
            sal = saliency.compute(name, src, weights)   # on an accelerator: where the scores live
            # On the host one partition serves every fraction; on device each threshold is searched in place.
            cuts = {mode: saliency.plans(sal, [float(f) for f in fractions], mode)
                    for mode in plan.prune_modes if fractions} if not select.device_steps() else {}
            for sp in specs:
                for mode in modes(sp):
                    cut = cuts[mode][float(sp)] if ":" not in sp and cuts else None
                    yield model((name, sp, mode), saliency.prune(weights, sal, at(sp), mode, cut, axes))
            for sp in fractions:
                for mode in owl_modes:
                    yield model((f"{name}+owl", sp, mode),
                                saliency.prune(weights, sal, layer_sparsity[sp], mode, None, axes))
            del sal, cuts
        if plan.sparsegpt:
            hess = sparsegpt.grams(loaded, loaded.params, batches, kept, progress)
            missing = [p for p in kept if p not in hess]
            if missing:
                logging.warning("sparsegpt: %d of %d matrices had no linear-layer call in the calibration pass and "
                                "stay dense (e.g. %s)", len(missing), len(kept), missing[0])
            for sp in specs:
                yield model(("sparsegpt", sp, "per_output" if ":" in sp else "per_layer"),
                            sparsegpt.prune(flat, kept, hess, at(sp), axes.get))
            for sp in fractions if owl_modes else ():
                yield model(("sparsegpt+owl", sp, "per_layer"),
                            sparsegpt.prune(flat, kept, hess, layer_sparsity[sp], axes.get))
            del hess

    from tqdm import tqdm
    bar = tqdm(total=n_cells, desc="pruning", disable=not progress or jax.process_index() > 0)
    deltas = _deltas(loaded, kept, data, cfg, base_ppl, pruned(), bar, clock)
    bar.close()
    out: dict = {}
    for (name, sp, mode), d in zip(cells, deltas, strict=True):
        out.setdefault(sp, {}).setdefault(name, {})[mode] = d + base_ppl
    return out


def _stage_done(what: str, t0: float, clock: timing.Clock | None = None, positions: float = 0.0) -> None:
    """Hands the stage's freed host memory back before the next stage allocates (see ``wa.hostmem``); with
    ``clock``, ends its stage ``what`` (``positions``: forward-pass work besides held-out evaluations)."""
    if clock is not None:
        clock.stage(what, positions)
    hostmem.release()
    rss = hostmem.rss_gib()
    logging.info("%s done at %.0f s%s", what, time.time() - t0, "" if rss is None else f"; host memory {rss:.2f} GiB")


def check_topk(cfg, sizes: dict) -> None:
    """A count that takes every weight makes top-k, random-k and bottom-k one set: the test would say nothing."""
    if cfg.topk < 1:  # a fraction in (0, 1)
        return
    limit = max(sizes.values()) if cfg.mode == "per_layer" else sum(sizes.values())
    if cfg.topk >= limit:
        where = "the largest matrix" if cfg.mode == "per_layer" else "all the selected matrices together"
        raise ConfigError(f"--config.topk={cfg.topk:g} selects every weight ({where} holds {limit}), so top-k, "
                          "random-k and bottom-k would be the same set; use a smaller count or a fraction in (0, 1)")


def check_patterns(cfg, inputs: dict) -> None:
    """An N:M sparsity groups each row's inputs by M: every pruned matrix's input count must divide."""
    for sp in as_list(cfg.prune_sparsity, str, "prune_sparsity"):
        spec = saliency.pattern(sp)
        if isinstance(spec, tuple):
            bad = [p for p, n in inputs.items() if n % spec[1]]
            if bad:
                raise ConfigError(f"--config.prune_sparsity={sp}: {bad[0]} has {inputs[bad[0]]} inputs per row, "
                                  f"not a multiple of {spec[1]} (and {len(bad) - 1} more); narrow "
                                  "--config.param_filter or use another pattern")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The checked config, the sharded model and its data, and the base perplexity: what every stage reads."""
    cfg: object
    plan: Plan
    loaded: models.Loaded
    flat: dict            # path -> sharded parameter
    kept: list            # the paths that compete for selection (``param_filter``)
    apart: list           # the paths scored and reported apart (``apart``; ``wa.esa.apart``)
    data: Data
    windows: dict         # seed -> its calibration windows (disjoint between seeds)
    base: dict            # ``evaluate.evaluate`` of the unperturbed model on the held-out windows
    t0: float             # when compute started (stage logs are relative to it)
    clock: timing.Clock   # each stage's seconds and work

    @property
    def n_kept(self) -> int:
        return sum(int(np.prod(self.flat[p].shape)) for p in self.kept)


@dataclasses.dataclass(frozen=True)
class Scores:
    """What is kept of the scores: the first seed's (plots, topk.csv, pruning and the architecture analysis read
    them) and per-seed figures; later seeds' scores are dropped once their top-k is taken."""
    first: dict       # metric -> {path: score array} of the first seed, on the kept paths
    heavy: dict       # metric -> [``select.heavy_tail`` figures, one per seed]
    seconds: dict     # metric -> seconds spent scoring it (a shared gradient pass split evenly)
    batches: list     # the first seed's calibration batches (the super-weight study reads their activations)
    apart_first: dict = dataclasses.field(default_factory=dict)  # metric -> ``apart.figures`` of the first seed
    apart_top: dict = dataclasses.field(default_factory=dict)    # (metric, seed) -> the apart matrices' own top-k


@dataclasses.dataclass(frozen=True)
class Selections:
    top: dict         # (metric, seed) -> top-k
    bottom: dict      # (metric, seed) -> bottom-k (with the bottom_k control)
    curve: dict       # (metric, seed) -> {windows: top-k after that many windows} (per-window metrics)
    points: list      # the stability curve's window counts
    k: int            # weights per set


@dataclasses.dataclass(frozen=True)
class Agreement:
    stability: dict   # metric -> mean top-k Jaccard over seed pairs (NaN without the stability check)
    curves: dict      # metric -> {"windows", "tokens_per_seed", "jaccard"}
    keys: list        # (metric, seed) rows and columns of ``jaccard``
    jaccard: list     # Jaccard of every pair of top-k sets in ``keys``
    overlap: dict     # "a|b" -> top-k overlap of metrics a and b, mean over seeds


@dataclasses.dataclass(frozen=True)
class Perturbations:
    results: dict             # (metric, kind, dose) -> {"topk", "random_k", "bottom_k": [ΔPPL, ...]}
    pruning: dict | None      # sparsity -> saliency -> mode -> perplexity
    faults: dict | None       # encoding -> bit -> {"field", "topk": {metric: ΔPPL}, "random_k": [ΔPPL]}
    super_weights: dict | None
    apart: dict | None = None  # metric -> {"kind", "dose", "topk": [ΔPPL], "random_k": [ΔPPL]} (apart matrices)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Every stage's result; ``summarize`` turns it into the figures, ``wa.esa.report`` renders both."""
    setup: Setup
    scores: Scores
    selections: Selections
    agreement: Agreement
    perturbations: Perturbations
    architecture: dict | None
    seconds_total: float
    experts: dict | None = None   # an MoE model: {"routing", "ablation"} (``wa.esa.experts``)
    spectra: dict | None = None   # every scored matrix's spectral metrics beside its scores (``wa.esa.spectra``)


def setup(cfg, progress: bool = True) -> Setup:
    """Checks the config, loads the model, prepares the data and measures the base perplexity; every error that
    needs the model or data is raised here, before the first gradient."""
    plan = check(cfg)
    clock = timing.Clock()
    ckpt = paths.checkpoint(cfg.model)
    models.read_config(ckpt)  # a missing or unknown checkpoint fails here, before loading weights
    loaded = models.load(ckpt, mesh=cfg.mesh, dtype=DTYPES[cfg.dtype])
    parallel.check_batch_size(loaded.mesh, cfg.batch_size)
    flat = rules_lib.flatten(loaded.params)
    kept = select.filter_paths(list(flat), cfg.param_filter)  # regex matching nothing fails here
    check_topk(cfg, {p: int(np.prod(flat[p].shape)) for p in kept})
    check_patterns(cfg, {p: flat[p].shape[loaded.family.input_axis(p)] for p in kept})
    apart = apart_lib.paths(flat, kept, cfg.get("apart", ""))
    data = prepare_data(cfg, loaded, ckpt)
    windows = seed_windows(len(data.cal_ids), cfg.max_samples, plan.seeds)  # before any compute
    t0 = time.time()
    base = evaluate.evaluate(loaded, loaded.params, data.eval_ids, data.eval_mask, cfg.batch_size,
                             progress=progress, desc="base perplexity")
    logging.info("base perplexity %.4f on %d held-out tokens", base["ppl"], base["tokens"])
    clock.eval_positions = -(-len(data.eval_ids) // cfg.batch_size) * cfg.batch_size * data.eval_ids.shape[1]
    clock.stage("load, data and base perplexity", clock.eval_positions, "reading and converting the checkpoint "
                "has no floor here; the one evaluation includes compiling it")
    return Setup(cfg, plan, loaded, flat, kept, apart, data, windows, base, t0, clock)


def score(s: Setup, progress: bool = True) -> tuple[Scores, Selections]:
    """Every metric on every seed's calibration windows, and its top-k (bottom-k, stability-curve points)."""
    cfg, plan, loaded, kept = s.cfg, s.plan, s.loaded, s.kept
    sels: dict = {}
    bottoms: dict = {}
    first: dict = {}
    heavy: dict = {}
    timing: dict = {m: 0.0 for m in plan.metrics}
    first_batches = None
    positions = 0.0   # forward-pass work, for the stage's floor
    points = stability_points(cfg)
    curve_sels: dict = {}
    apart_first: dict = {}
    apart_top: dict = {}
    apart_mats = apart_lib.matrices(s.flat, s.apart)
    counts = None
    if apart_lib.has_token_rows(loaded.describe, s.apart):
        vocab = max(s.flat[p].shape[0] for p in apart_mats if apart_lib.is_token_rows(loaded.describe, p))
        pick = s.windows[plan.seeds[0]]
        counts = apart_lib.token_counts(s.data.cal_ids[pick], s.data.cal_mask[pick], vocab)
    for seed in plan.seeds:
        batches = calibration_batches(loaded, s.data, cfg, s.windows[seed])
        first_batches = first_batches or batches
        cal = scores.Calibration(loaded, batches, jax.random.key(seed), cfg.probes, cfg.probe_chunk, progress,
                                 cfg.window_chunk)
        # The per-window metrics share one gradient pass; its time is split evenly between them.
        shared = [m for m in plan.metrics if m in scores.PER_WINDOW]
        # Wanda's input norms ride on the same forward passes (causal LMs: one window per gradient).
        ride = ["act_mag"] if shared and "act_mag" in plan.metrics and loaded.family.kind == "causal_lm" else []
        work = (scores.GRADIENT if shared else 0.0) + sum(
            scores.SCORES[m].passes(cal) for m in plan.metrics if m not in shared + ride
            and (scores.SCORES[m].needs_data or seed == plan.seeds[0]))
        positions += work * len(s.windows[seed]) * cfg.seq_len
        pass_scores: dict = {}
        if shared:
            t = time.time()

            def reduce(metric, n, means):
                # Earlier points keep only their top-k (the stability curve's input); the last, the scores (of the
                # apart tensors too).
                if n == cfg.max_samples:
                    return jax.block_until_ready({p: means[p] for p in kept + s.apart if p in means})
                means = {p: means[p] for p in kept if p in means}
                return select.top_k(means, cfg.topk, cfg.mode, cfg.param_filter, scores.SCORES[metric].signed)[0]

            if len(points) > 1:
                prefixes = scores.prefix_means(shared, loaded.params, cal, points, reduce, acts=bool(ride))
                for m in ride:
                    prefixes[m] = {cfg.max_samples: reduce(m, cfg.max_samples, prefixes[m][cfg.max_samples])}
            else:
                prefixes = {m: {cfg.max_samples: reduce(m, cfg.max_samples, v)}
                            for m, v in scores.window_means(shared, loaded.params, cal, acts=bool(ride)).items()}
            for metric in shared + ride:
                pass_scores[metric] = prefixes[metric].pop(cfg.max_samples)
                if len(points) > 1 and metric in shared:
                    curve_sels[metric, seed] = prefixes[metric]   # the last point's top-k is added below
            for metric in shared + ride:
                timing[metric] += (time.time() - t) / len(shared + ride)
            del prefixes
        for metric in plan.metrics:
            t = time.time()
            signed = scores.SCORES[metric].signed
            if not scores.SCORES[metric].needs_data and seed != plan.seeds[0]:
                # A score of the weights alone is the same for every seed: its sets and figures are the first's.
                sels[metric, seed] = sels[metric, plan.seeds[0]]
                if "bottom_k" in plan.controls:
                    bottoms[metric, seed] = bottoms[metric, plan.seeds[0]]
                if (metric, plan.seeds[0]) in apart_top:
                    apart_top[metric, seed] = apart_top[metric, plan.seeds[0]]
                continue
            if metric in pass_scores:
                sc = pass_scores.pop(metric)
            else:
                sc = scores.compute(metric, loaded.params, cal)
                sc = jax.block_until_ready({p: sc[p] for p in kept + s.apart if p in sc})
                timing[metric] += time.time() - t
            missing = [p for p in kept if p not in sc]
            if missing:
                raise ConfigError(f"metric {metric!r} does not score {missing[:3]}; narrow --config.param_filter")
            if s.apart and all(p in sc for p in s.apart):   # act_mag scores linear-layer inputs only
                t = time.time()
                if apart_mats:
                    apart_top[metric, seed] = apart_lib.top(sc, apart_mats, cfg.topk, signed)
                if seed == plan.seeds[0]:
                    apart_first[metric] = apart_lib.figures(sc, kept, s.apart, apart_top.get((metric, seed), {}),
                                                            cfg.topk, signed, loaded.describe, loaded.parts,
                                                            counts, s.data.decode)
                logging.info("%s: the apart tensors' figures in %.1f s", metric, time.time() - t)
            sc = {p: sc[p] for p in kept}
            sel = select.top_k(sc, cfg.topk, cfg.mode, cfg.param_filter, signed)[0]
            sels[metric, seed] = sel
            if (metric, seed) in curve_sels:
                curve_sels[metric, seed][cfg.max_samples] = sel
            if "bottom_k" in plan.controls:
                bottoms[metric, seed] = select.top_k(sc, cfg.topk, cfg.mode, cfg.param_filter, signed,
                                                     largest=False)[0]
            heavy.setdefault(metric, []).append(select.heavy_tail(sc, cfg.param_filter, signed))
            if metric not in first:
                first[metric] = dict(sc)   # where the scores live: every later reader reduces them there
            del sc
        _stage_done(f"scores of seed {seed}", s.t0)
    s.clock.stage(f"scores ({len(plan.seeds)} seeds)", positions)
    return (Scores(first, heavy, timing, first_batches, apart_first, apart_top),
            Selections(sels, bottoms, curve_sels, points, select.size(next(iter(sels.values())))))


def compare(s: Setup, sel: Selections) -> Agreement:
    """Stability across seeds (disjoint windows), its curve over calibration size, agreement across metrics."""
    cfg, plan = s.cfg, s.plan
    stability = {}
    for m in plan.metrics:
        pairs = [select.jaccard(sel.top[m, a], sel.top[m, b]) for a, b in itertools.combinations(plan.seeds, 2)]
        # A score that reads no data picks one set for every seed: its stability across data is undefined, not 1.
        stability[m] = (float(np.mean(pairs)) if pairs and cfg.stability_check and scores.SCORES[m].needs_data
                        else float("nan"))
    curves = {}
    for m in {m for m, _ in sel.curve}:
        curves[m] = {"windows": sel.points, "tokens_per_seed": [n * (cfg.seq_len - 1) for n in sel.points],
                     "jaccard": [float(np.mean([select.jaccard(sel.curve[m, a][n], sel.curve[m, b][n])
                                                for a, b in itertools.combinations(plan.seeds, 2)]))
                                 for n in sel.points]}
    keys = [(m, seed) for m in plan.metrics for seed in (plan.seeds if cfg.stability_check else plan.seeds[:1])]
    matrix = [[select.jaccard(sel.top[a], sel.top[b]) for b in keys] for a in keys]
    overlap = {f"{a}|{b}": float(np.mean([select.overlap(sel.top[a, seed], sel.top[b, seed])
                                          for seed in plan.seeds]))
               for a, b in itertools.combinations(plan.metrics, 2)}
    return Agreement(stability, curves, keys, matrix, overlap)


def perturb_sets(s: Setup, sel: Selections, progress: bool = True) -> dict:
    """ΔPPL of every perturbation × dose × metric × seed on the top-k and the controls. The random-k null
    depends only on sizes, so all metrics share it. With ``control_doses = "largest"`` the controls are measured
    at each perturbation's largest dose only (the dose the headline test and bar plots read), the top-k at every
    dose (the dose-response curve).

    A set is evaluated once per perturbation and dose: where seeds pick the same set (a metric that reads no data,
    such as magnitude) and the perturbation draws nothing, the seeds' evaluations would be one computation
    repeated, so the set is one sample, not one per seed. Every distinct evaluation is listed first, then run
    ``cfg.perturb_group`` parameter sets per compiled call."""
    cfg, plan, flat = s.cfg, s.plan, s.flat
    jobs: dict = {}    # fingerprint -> (selection, or a random-k draw to make; perturb.apply keywords)
    cells = []         # (kind, scale, group, metric (None: the shared random-k null), fingerprint)
    fps: dict = {}     # selection fingerprints, by (metric, seed, group)

    def set_fp(group, m, seed):
        if (m, seed, group) not in fps:
            fps[m, seed, group] = select.fingerprint((sel.top if group == "topk" else sel.bottom)[m, seed])
        return fps[m, seed, group]

    for kind, scale in itertools.product(plan.kinds, plan.scales):
        bits = plan.bits if perturb.PERTURBATIONS[kind].uses_bits else ()
        kw = dict(kind=kind, scale=scale, prob=cfg.perturb_prob, bits=bits, noise_ref=cfg.noise_ref)
        keyed = perturb.uses_key(kind, bits)
        controls = [c for c in plan.controls if plan.control_doses == "all" or scale == max(plan.scales)]
        for seed in plan.seeds:
            for r in range(cfg.random_draws if "random_k" in controls else 0):
                fp = ("random", seed * 1000 + r, kind, scale)
                cells.append((kind, scale, "random_k", None, fp))
                jobs[fp] = (("random", seed * 1000 + r), dict(kw, key=jax.random.key(seed * 1000 + r)))
        for m in plan.metrics:
            for seed in plan.seeds:
                for group in ["topk"] + (["bottom_k"] if "bottom_k" in controls else []):
                    fp = (set_fp(group, m, seed), kind, scale, seed if keyed else None)
                    cells.append((kind, scale, group, m, fp))
                    jobs.setdefault(fp, ((sel.top if group == "topk" else sel.bottom)[m, seed],
                                         dict(kw, key=jax.random.key(seed))))

    def materialize(todo):
        for one, kw in todo:
            if isinstance(one, tuple):  # a random-k draw, drawn when its group is evaluated
                one = select.random_k(flat, cfg.topk, cfg.mode, cfg.param_filter, one[1])
                assert select.size(one) == sel.k
            yield one, kw

    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="perturb", disable=not progress or jax.process_index() > 0)
    deltas = dict(zip(jobs, _deltas(s.loaded, s.kept, s.data, cfg, s.base["ppl"],
                                    _applied(flat, materialize(jobs.values())), bar, s.clock), strict=True))
    bar.close()
    results = {key: {"topk": [], "random_k": [], "bottom_k": []}
               for key in itertools.product(plan.metrics, plan.kinds, plan.scales)}
    rand: dict = {}   # (kind, dose) -> the random-k null every metric is compared with
    seen = set()
    for kind, scale, group, m, fp in cells:
        if group == "random_k":
            rand.setdefault((kind, scale), []).append(deltas[fp])
        elif (m, group, fp) not in seen:       # one sample per distinct evaluation
            seen.add((m, group, fp))
            results[m, kind, scale][group].append(deltas[fp])
    for (_, kind, scale), r in results.items():
        r["random_k"] = list(rand.get((kind, scale), []))
    return results


def apart_perturbations(s: Setup, sc: Scores, progress: bool = True) -> dict | None:
    """ΔPPL of the first perturbation at its largest dose on the apart matrices' own top-k of every metric and seed
    (a set evaluated once however many seeds pick it, as in ``perturb_sets``), against ``random_draws`` random-k
    draws per seed of the same per-tensor sizes within them."""
    mats = apart_lib.matrices(s.flat, s.apart)
    if not mats or not sc.apart_top:
        return None
    cfg, plan = s.cfg, s.plan
    kind, dose = plan.kinds[0], max(plan.scales)
    bits = plan.bits if perturb.PERTURBATIONS[kind].uses_bits else ()
    kw = dict(kind=kind, scale=dose, prob=cfg.perturb_prob, bits=bits, noise_ref=cfg.noise_ref)
    keyed = perturb.uses_key(kind, bits)
    jobs: dict = {}
    cells = []
    for (m, seed), sel in sc.apart_top.items():
        fp = (select.fingerprint(sel), seed if keyed else None)
        cells.append((m, fp))
        jobs.setdefault(fp, (sel, dict(kw, key=jax.random.key(seed))))
    for seed in plan.seeds:
        for r in range(cfg.random_draws):
            draw = seed * 1000 + 700 + r
            cells.append((None, ("random", draw)))
            jobs[("random", draw)] = (("random", draw), dict(kw, key=jax.random.key(draw)))
    k = select.size(next(iter(sc.apart_top.values())))

    def materialize(todo):
        for one, kw in todo:
            if isinstance(one, tuple):
                one = select.random_k({p: s.flat[p] for p in mats}, cfg.topk, "per_layer", r".", one[1])
                assert select.size(one) == k
            yield one, kw

    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="perturb apart", disable=not progress or jax.process_index() > 0)
    deltas = dict(zip(jobs, _deltas(s.loaded, mats, s.data, cfg, s.base["ppl"],
                                    _applied(s.flat, materialize(jobs.values())), bar, s.clock), strict=True))
    bar.close()
    out = {m: {"kind": kind, "dose": dose, "topk": [], "random_k": []} for m, _ in sc.apart_top}
    rand = [deltas[fp] for m, fp in cells if m is None]
    seen = set()
    for m, fp in cells:
        if m is not None and (m, fp) not in seen:
            seen.add((m, fp))
            out[m]["topk"].append(deltas[fp])
    for r in out.values():
        r["random_k"] = list(rand)
    return out


def run(cfg, progress: bool = True) -> Analysis:
    """Every stage, in order; host memory is handed back between them."""
    s = setup(cfg, progress)
    sc, sel = score(s, progress)
    super_w = None
    if cfg.super_weights:
        super_w = super_weight_study(s.loaded, s.flat, s.kept, s.data, cfg, s.base["ppl"], sc.batches, s.clock)
        # The activation pass over the first seed's calibration windows, then the evaluations.
        _stage_done("super weights", s.t0, s.clock, len(s.windows[s.plan.seeds[0]]) * cfg.seq_len)
    agreement = compare(s, sel)
    s.clock.stage("agreement")
    results = perturb_sets(s, sel, progress)
    _stage_done("perturbations", s.t0, s.clock)
    apart_results = apart_perturbations(s, sc, progress)
    if apart_results is not None:
        _stage_done("apart perturbations", s.t0, s.clock)
    pruning = None
    if cfg.prune_sparsity:
        pruning = prune_study(s.loaded, s.flat, sc.first, s.data, cfg, s.base["ppl"], s.plan, progress, s.clock,
                              sc.batches)
        _stage_done("pruning", s.t0, s.clock)
    faults = fault_study(s.loaded, s.flat, s.kept, sel.top, s.data, cfg, s.base["ppl"], s.plan, progress,
                         s.clock)
    if faults is not None:
        _stage_done("bit flips", s.t0, s.clock)
    arch = {m: architecture.analyze(sc.first[m], s.loaded.describe, cfg.topk, scores.SCORES[m].signed,
                                    s.loaded.parts)
            for m in s.plan.metrics} if cfg.get("architecture", True) else None
    if arch is not None:
        s.clock.stage("architecture")
    moe = expert_study(s, sc, progress) if experts_lib.count(s.loaded) else None
    spec = None
    if cfg.get("spectral", True):
        spec = spectra.study(s.flat, s.kept, s.loaded.describe, sc.first,
                             {m: scores.SCORES[m].signed for m in s.plan.metrics})
        s.clock.stage("spectral", note=f"{len(spec['matrices'])} matrices, an SVD each")
    return Analysis(s, sc, sel, agreement, Perturbations(results, pruning, faults, super_w, apart_results), arch,
                    time.time() - s.t0, moe, spec)


def expert_study(s: Setup, sc: Scores, progress: bool = True) -> dict:
    """An MoE model's routing on the first seed's calibration windows, and (``expert_ablation``) the held-out
    ΔPPL with each expert removed in turn."""
    route = experts_lib.routing(s.loaded, s.loaded.params, sc.batches)
    s.clock.stage("routing", len(s.windows[s.plan.seeds[0]]) * s.cfg.seq_len)
    ablation = None
    if s.cfg.get("expert_ablation", True):
        from tqdm import tqdm
        downs = experts_lib.down_paths(s.loaded, s.flat)
        bar = tqdm(total=len(downs), desc="expert ablation", disable=not progress or jax.process_index() > 0)
        deltas = _deltas(s.loaded, list(downs.values()), s.data, s.cfg, s.base["ppl"],
                         (experts_lib.zeroed(s.flat, p) for p in downs.values()), bar, s.clock)
        bar.close()
        grid = np.full((1 + max(L for L, _ in downs), experts_lib.count(s.loaded)), np.nan)
        for (layer, e), d in zip(downs, deltas, strict=True):
            grid[layer, e] = d
        ablation = {"dppl": grid.tolist(), "base_ppl": s.base["ppl"], "how": "w2 zeroed"}
        _stage_done("expert ablation", s.t0, s.clock)
    return {"routing": route, "ablation": ablation}


def summarize(a: Analysis) -> dict:
    """The statistics stage: summary.json's figures, per metric, with CIs and tests."""
    st, pt = a.setup, a.perturbations
    cfg, plan, loaded = st.cfg, st.plan, st.loaded
    n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(loaded.params)))
    out = {
        "model": cfg.model, "checkpoint": loaded.path, "model_type": loaded.config.model_type,
        "quantization": loaded.quantization, "licence": loaded.licence,
        "n_params": n_params, "n_scored": st.n_kept, "metrics": plan.metrics, "mode": cfg.mode,
        "topk": cfg.topk, "k_selected": a.selections.k, "seeds": plan.seeds, "param_filter": cfg.param_filter,
        "perturb": plan.kinds, "perturb_scale": plan.scales, "controls": plan.controls,
        "random_draws_per_seed": cfg.random_draws, "control_doses": plan.control_doses,
        "ppl_base": st.base["ppl"], "nll_base": st.base["nll"],
        "heldout_tokens": st.base["tokens"], "calibration_tokens_per_seed": int(cfg.max_samples * (cfg.seq_len - 1)),
        "agreement_overlap": a.agreement.overlap, "seconds_total": round(a.seconds_total, 1),
        "peak_host_memory_gib": hostmem.peak_rss_gib(),
        "timing": st.clock.table(),
        "super_weights": pt.super_weights,
        "pruning_ppl": pt.pruning,
        "faults": pt.faults,
        "architecture": a.architecture,
        "spectral": a.spectra,
        "apart_regex": cfg.get("apart", ""), "apart_paths": st.apart,
        "apart": apart_lib.summarize(a.scores.apart_first, a.scores.apart_top, plan.seeds, pt.apart,
                                     {m: scores.SCORES[m].needs_data for m in plan.metrics}) if st.apart else None,
        "experts": experts_lib.summarize(a.architecture, a.experts["routing"], a.experts["ablation"],
                                         experts_lib.count(loaded)) if a.experts else None,
        "per_metric": {},
    }
    main_kind, main_scale = plan.kinds[0], max(plan.scales)
    for m in plan.metrics:
        ht = a.scores.heavy[m]
        entry = {
            "reads_data": scores.SCORES[m].needs_data,
            "jaccard_mean": a.agreement.stability[m],
            "stability_curve": a.agreement.curves.get(m),
            "heavy_tail_ratio": float(np.mean([h["top1pct_mean_over_median"] for h in ht])),
            "gini": float(np.mean([h["gini"] for h in ht])),
            # 0 from a host sort; from the device's radix histograms, the largest error its bins allow.
            "gini_error": float(max(h["gini_error"] for h in ht)),
            "top01pct_share": float(np.mean([h["top01pct_share"] for h in ht])),
            "seconds": round(a.scores.seconds[m], 2),
            "topk_counts": select.counts(a.selections.top[m, plan.seeds[0]], loaded.describe),
            "perturb": {},
        }
        for kind, scale in itertools.product(plan.kinds, plan.scales):
            res = pt.results[m, kind, scale]
            groups = {g: {"dppl_mean": (c := stats.mean_ci(v))["mean"], "ci95": c["ci95"], "n": c["n"], "values": v}
                      for g, v in res.items() if v}
            test = stats.greater(res["topk"], res["random_k"]) if res["random_k"] else None
            block = dict(groups)
            if test:
                block["p_value_topk_vs_random"] = test["p_value"]
                rm = groups["random_k"]["dppl_mean"]
                block["ratio_topk_vs_random"] = (groups["topk"]["dppl_mean"] / rm) if rm > 0 else float("inf")
            entry["perturb"].setdefault(kind, {})[str(scale)] = block
        # The headline numbers: the first perturbation at its largest dose.
        head = entry["perturb"][main_kind][str(main_scale)]
        entry["perturb_main"] = {"kind": main_kind, "scale": main_scale, **{
            g: {"dppl_mean": head[g]["dppl_mean"], "ci95": head[g]["ci95"]} for g in ("topk", "random_k", "bottom_k")
            if g in head}}
        entry["p_value_topk_vs_random"] = head.get("p_value_topk_vs_random")
        entry["ratio_topk_vs_random"] = head.get("ratio_topk_vs_random")
        if len(plan.scales) > 1:
            entry["dose_response"] = {}
            for kind in plan.kinds:
                ys = [entry["perturb"][kind][str(s)]["topk"]["dppl_mean"] for s in plan.scales]
                entry["dose_response"][kind] = {"scales": plan.scales, "topk_dppl": ys,
                                                **stats.monotone(plan.scales, ys)}
        out["per_metric"][m] = entry
    if pt.pruning:
        out["pruning_gain_vs_magnitude"] = {
            sp: {name: {mode: (row["magnitude"][mode] - ppl) / row["magnitude"][mode] for mode, ppl in by_mode.items()
                        if mode in row["magnitude"]}
                 for name, by_mode in row.items() if name != "magnitude"}
            for sp, row in pt.pruning.items()}
    # Flat aliases the issue asks for at the top level, per metric.
    out["jaccard_mean"] = {m: e["jaccard_mean"] for m, e in out["per_metric"].items()}
    out["heavy_tail_ratio"] = {m: e["heavy_tail_ratio"] for m, e in out["per_metric"].items()}
    return out
