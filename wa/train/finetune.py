"""Adapt a pretrained causal LM to a new corpus training only a chosen set of weights, and measure what it costs.

Methods (``METHODS``; one record each):

- ``topk:<metric>``: the k weight-matrix entries with the highest ESA score ``<metric>`` computed on the *target*
  corpus, chosen model-wide. With ``grad_squared`` (the Fisher diagonal) this is the FISH mask (Sung et al. 2021,
  "Training Neural Networks with Fixed Sparse Masks").
- ``random``: k entries drawn uniformly; ``bottom:<metric>``: the k lowest of the score (the controls at equal k).
- ``full``: every parameter (the reference).
- ``lora``: LoRA (Hu et al. 2021) on every weight matrix, W + (α/r)·AB with A Gaussian, B zero, the rank r chosen
  so that r·(in + out) summed over the matrices comes nearest the k of the sparse methods (never below 1: at
  small k LoRA trains more weights than the others, and the table says how many).

Protection of the *source* model's critical weights (its top-k of a score computed on source text) while every
other weight is fine-tuned:

- ``freeze:<metric>``: the top-k are not trained;
- ``ewc:<metric>``: they are held by an elastic weight consolidation penalty (Kirkpatrick et al. 2017),
  (λ/2)·Σ F_i (w_i − w_i⁰)² over the top-k, F the Fisher diagonal (``grad_squared``) on source text, normalised
  by its mean over the top-k so that λ (``ewc_lambda``) reads the same across models.

After each protected or unprotected (``full``) run the same source top-k is sign-flipped, and separately the
lowest bit of each one's float32 exponent flipped (bit 23: the weight doubled or halved), and the source perplexity
measured again: do the weights that
were critical still carry the model, and does protecting them keep it so?

Training is AdamW on masked gradients (the frozen entries also get no weight decay), the same steps, schedule and
batches for every method. Reported: perplexity on held-out target text (adaptation) and on held-out source text
(forgetting), against the number of trainable weights.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from wa import errors, parallel
from wa.data import paths, text, tokenizers
from wa.esa import evaluate, perturb, scores, select
from wa.parallel import rules as rules_lib


class FinetuneError(errors.ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    about: str
    sparse: bool = True     # trains k chosen entries (else: full, or LoRA)


METHODS: dict[str, Method] = {}


def register(m: Method) -> Method:
    METHODS[m.name] = m
    return m


register(Method("topk", "the k entries with the highest ESA score on the target corpus (grad_squared: FISH)"))
register(Method("bottom", "the k entries with the lowest ESA score on the target corpus"))
register(Method("random", "k entries drawn uniformly"))
register(Method("full", "every parameter", sparse=False))
register(Method("lora", "low-rank adapters on every weight matrix at the nearest matching count", sparse=False))
register(Method("freeze", "every parameter but the source model's top-k (score on source text)", sparse=False))
register(Method("ewc", "every parameter; the source model's top-k held by a Fisher-weighted EWC penalty",
                sparse=False))

SCORED = ("topk", "bottom", "freeze", "ewc")   # methods that take a score
PROTECT = ("freeze", "ewc", "full")             # runs followed by the perturbation of the source top-k


def parse(spec: str, metrics) -> tuple[str, str | None]:
    """``topk:grad_squared`` → ("topk", "grad_squared"); ``random`` → ("random", None)."""
    name, _, metric = spec.partition(":")
    if name not in METHODS:
        raise FinetuneError(f"--config.methods: unknown method {spec!r}; known: {', '.join(METHODS)} "
                            "(topk, bottom, freeze and ewc take a score: topk:grad_squared)")
    if name in SCORED:
        if metric not in metrics:
            raise FinetuneError(f"--config.methods: {spec!r} needs a score among {', '.join(metrics)}")
        return name, metric
    if metric:
        raise FinetuneError(f"--config.methods: {name} takes no score ({spec!r})")
    return name, None


def check(cfg) -> list[tuple[str, str | None]]:
    errors.check_values(cfg, {"steps": errors.COUNT, "batch_size": errors.COUNT, "lr": errors.POSITIVE,
                              "warmup": errors.NON_NEGATIVE, "eval_windows": errors.COUNT,
                              "score_windows": errors.COUNT})
    fracs = [float(x) for x in str(cfg.fractions).split(",") if x]
    if not fracs or any(not 0 < f < 1 for f in fracs):
        raise FinetuneError(f"--config.fractions={cfg.fractions!r}: expected fractions in (0, 1)")
    if cfg.warmup >= cfg.steps:
        raise FinetuneError(f"--config.warmup={cfg.warmup} must end before --config.steps={cfg.steps}")
    metrics = [m for m in str(cfg.metrics).split(",") if m]
    for m in metrics:
        if m not in scores.SCORES:
            raise FinetuneError(f"--config.metrics: unknown score {m!r}; known: {', '.join(scores.SCORES)}")
    return [parse(s, metrics) for s in str(cfg.methods).split(",") if s]


@dataclasses.dataclass
class Corpora:
    train: np.ndarray        # target training stream
    target: tuple            # held-out target windows (ids, mask)
    source: tuple            # held-out source windows (ids, mask)
    score: tuple             # target calibration windows for the scores
    source_score: tuple      # source calibration windows (the protected set, the Fisher of EWC)


def corpora(cfg, tok) -> Corpora:
    def split(name, doc_split):
        docs = text.documents(text.read(name), doc_split)
        n = max(1, int(round(len(docs) * cfg.val_fraction)))
        if len(docs) - n < 1:
            raise FinetuneError(f"corpus {name!r}: {len(docs)} documents cannot be split into train and held-out")
        return docs[:-n], docs[-n:]
    t_train, t_val = split(cfg.target, cfg.target_split)
    s_train, s_val = split(cfg.source, cfg.source_split)
    stream = text.token_stream(t_train, tok)
    if len(stream) <= cfg.seq_len * 2:
        raise FinetuneError(f"{cfg.target}: its training part has {len(stream)} tokens, too few for seq_len "
                            f"{cfg.seq_len}")
    tv = text.lm_windows(text.token_stream(t_val, tok), cfg.seq_len)
    sv = text.lm_windows(text.token_stream(s_val, tok), cfg.seq_len)
    sc = text.lm_windows(stream, cfg.seq_len)
    ss = text.lm_windows(text.token_stream(s_train, tok), cfg.seq_len)
    cut = lambda w, n: (w[0][:n], w[1][:n])  # noqa: E731
    return Corpora(stream, cut(tv, cfg.eval_windows), cut(sv, cfg.eval_windows), cut(sc, cfg.score_windows),
                   cut(ss, cfg.score_windows))


def masks_for(flat: dict, kept: list, sel: dict) -> dict:
    """{path: float32 0/1 array of the parameter's shape} with 1 at the selected flat indices of ``kept`` paths;
    every other parameter frozen (a scalar 0)."""
    out = {}
    for p, v in flat.items():
        if p in sel:
            m = np.zeros(int(np.prod(v.shape)), np.float32)
            m[np.asarray(sel[p], np.int64)] = 1.0
            out[p] = m.reshape(v.shape)
        else:
            out[p] = np.zeros((), np.float32)
    return out


def lora_rank(flat: dict, kept: list, k: int, axis_of) -> tuple[int, int]:
    """(rank, trainable count) of LoRA on the ``kept`` matrices nearest ``k`` trainable weights, rank ≥ 1."""
    per_rank = sum(v.shape[axis_of(p)] + v.size // v.shape[axis_of(p)] for p, v in ((p, flat[p]) for p in kept))
    r = max(1, int(round(k / per_rank)))
    return r, r * per_rank


def train(loaded, flat0: dict, data: Corpora, cfg, trainable, lora: dict | None = None, ewc: dict | None = None
          ) -> dict:
    """Fine-tunes from ``flat0``: ``trainable`` a mask dict (sparse / full) or None with ``lora`` {path: rank};
    ``ewc`` {path: per-entry penalty weight F_i / mean F (0 off the protected set)} adds (λ/2)·Σ F_i (w − w⁰)².
    Returns the fine-tuned flat parameters and the loss curve."""
    model, family = loaded.model, loaded.family
    unflat = rules_lib.unflattener(loaded.params)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.lr * 0.1)
    opt = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay)
    key = jax.random.key(cfg.seed)
    if lora is not None:
        axis = {p: loaded.family.input_axis(p) for p in lora}
        train_vars = {}
        for i, (p, r) in enumerate(sorted(lora.items())):
            w = flat0[p]
            n_in = w.shape[axis[p]]
            n_out = w.size // n_in
            a = jax.random.normal(jax.random.fold_in(key, i), (n_in, r), jnp.float32) / np.sqrt(n_in)
            train_vars[p] = {"a": a, "b": jnp.zeros((r, n_out), jnp.float32)}

        def effective(tv):
            f = dict(flat0)
            for p, ab in tv.items():
                w = flat0[p]
                delta = (ab["a"] @ ab["b"]) * (cfg.lora_alpha / ab["a"].shape[1])
                if axis[p] == 1:             # [out, in] kernels
                    delta = delta.T
                f[p] = w + delta.reshape(w.shape).astype(w.dtype)
            return f
        mask = None
    else:
        train_vars = dict(flat0)
        effective = lambda tv: tv  # noqa: E731
        mask = {p: jnp.asarray(m) for p, m in trainable.items()}

    pen = None if ewc is None else {p: jnp.asarray(v) for p, v in ewc.items()}

    def loss_fn(tv, batch):
        loss = family.loss(model, unflat(effective(tv)), batch)
        if pen is not None:
            loss = loss + 0.5 * cfg.ewc_lambda * sum(jnp.sum(f * jnp.square(tv[p] - flat0[p])) for p, f in pen.items())
        return loss

    @jax.jit
    def step(tv, state, batch, mask):
        loss, g = jax.value_and_grad(loss_fn)(tv, batch)
        if mask is not None:
            g = {p: g[p] * mask[p] for p in g}
        upd, state = opt.update(g, state, tv)
        if mask is not None:   # AdamW's decay must not move a frozen entry either
            upd = {p: upd[p] * mask[p] for p in upd}
        return optax.apply_updates(tv, upd), state, loss

    state = opt.init(train_vars)
    curve = []
    stream = data.train
    for s in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, s])
        starts = rng.integers(0, len(stream) - cfg.seq_len, size=cfg.batch_size)
        ids = np.stack([stream[a:a + cfg.seq_len] for a in starts])
        batch = parallel.make_global_batch(loaded.mesh, cfg.batch_size, lambda lo, hi, ids=ids: {
            "input_ids": ids[lo:hi], "attention_mask": np.ones_like(ids[lo:hi])})
        train_vars, state, loss = step(train_vars, state, batch, mask)
        if (s + 1) % 10 == 0 or s + 1 == cfg.steps:
            curve.append({"step": s + 1, "loss": float(loss)})
    return {"flat": effective(train_vars), "curve": curve}


def perplexities(loaded, flat: dict, data: Corpora, cfg) -> dict:
    params = rules_lib.unflattener(loaded.params)(flat)
    return {name: evaluate.evaluate(loaded, params, ids, mask, cfg.batch_size, progress=False)["ppl"]
            for name, (ids, mask) in (("target", data.target), ("source", data.source))}


def run(cfg, progress: bool = True) -> dict:
    """Every method at every k: {"base": ppl, "runs": [...], ...} (see the module docstring)."""
    from wa import models
    methods = check(cfg)
    ckpt = paths.checkpoint(cfg.model)
    loaded = models.load(ckpt)
    tok = tokenizers.get(ckpt)
    data = corpora(cfg, tok)
    flat0 = rules_lib.flatten(loaded.params)
    kept = select.filter_paths(list(flat0), cfg.param_filter)
    n_kept = sum(int(flat0[p].size) for p in kept)
    n_all = sum(int(v.size) for v in flat0.values())
    t0 = time.time()
    base = perplexities(loaded, flat0, data, cfg)
    logging.info("before fine-tuning: target %.3f, source %.3f", base["target"], base["source"])
    def scored(windows, names):
        cal = scores.Calibration(loaded, scores.window_batches(loaded, *windows, cfg.batch_size),
                                 jax.random.key(cfg.seed), progress=progress)
        return {m: {p: np.asarray(v) for p, v in scores.compute(m, loaded.params, cal).items() if p in kept}
                for m in names}

    sc = scored(data.score, sorted({m for n, m in methods if n in ("topk", "bottom")}))
    guarded = sorted({m for n, m in methods if n in ("freeze", "ewc")})
    src = scored(data.source_score, sorted(set(guarded) | ({"grad_squared"} if any(
        n == "ewc" for n, _ in methods) else set())))
    fracs = [float(x) for x in str(cfg.fractions).split(",") if x]
    # The source model's critical sets, protected by freeze / ewc and perturbed after every protection run.
    critical = {(m, f): select.top_k(src[m], int(round(f * n_kept)), "global", ".")[0] for m in guarded
                for f in fracs}

    def robustness(flat, sel) -> dict:
        out = {}
        # Bit 30 (the exponent's top bit) destroys any model; bit 23 (its lowest: × 2 or ÷ 2) measures.
        for kind, kw in (("sign_flip", {}), ("bit_flip_23", {"bits": (23,), "encoding": "float32"})):
            hit = perturb.apply(flat, sel, kind.removesuffix("_23"), **kw)
            out[kind] = perplexities(loaded, hit, data, cfg)["source"]
        return out

    base_hit = {f"{m}@{f}": robustness(flat0, sel) for (m, f), sel in critical.items()}
    out = {"base": base, "base_perturbed_source_ppl": base_hit, "n_weights_matrices": n_kept, "n_params": n_all,
           "runs": [],
           "protocol": {k: cfg[k] for k in ("model", "source", "target", "steps", "batch_size", "seq_len", "lr",
                                            "fractions", "seed", "ewc_lambda")}}
    jobs = []
    for name, metric in methods:
        if name == "full":
            jobs.append((name, metric, None))
        else:
            jobs += [(name, metric, f) for f in fracs]
    for name, metric, f in jobs:
        k = int(round(f * n_kept)) if f is not None else n_all
        lora = ewc = None
        if name == "full":
            trainable = {p: np.ones((), np.float32) for p in flat0}
            count = n_all
        elif name in ("freeze", "ewc"):
            guard = masks_for(flat0, kept, critical[metric, f])
            if name == "freeze":
                trainable = {p: 1.0 - m for p, m in guard.items()}
                count = n_all - k
            else:
                trainable = {p: np.ones((), np.float32) for p in flat0}
                fisher = {p: src["grad_squared"][p] * guard[p] for p in kept}
                scale = sum(float(v.sum()) for v in fisher.values()) / max(k, 1)
                ewc = {p: (v / scale).astype(np.float32) for p, v in fisher.items() if guard[p].any()}
                count = n_all
        elif name == "lora":
            r, count = lora_rank(flat0, kept, k, loaded.family.input_axis)
            lora, trainable = {p: r for p in kept}, None
        else:
            if name == "random":
                sel = select.random_k({p: flat0[p] for p in kept}, k, "global", ".", cfg.seed)
            else:
                sel = select.top_k(sc[metric], k, "global", ".", largest=name == "topk")[0]
            trainable = masks_for(flat0, kept, sel)
            count = int(sum(len(v) for v in sel.values()))
        t = time.time()
        r = train(loaded, flat0, data, cfg, trainable, lora, ewc)
        ppl = perplexities(loaded, r["flat"], data, cfg)
        label = name + (f":{metric}" if metric else "")
        row = {"method": label, "fraction": f, "k": k, "trainable": int(count), "target_ppl": ppl["target"],
               "source_ppl": ppl["source"], "forgetting": ppl["source"] / base["source"] - 1.0,
               "final_loss": r["curve"][-1]["loss"], "seconds": round(time.time() - t, 1)}
        if name in ("freeze", "ewc"):
            row["perturbed_source_ppl"] = {f"{metric}@{f}": robustness(r["flat"], critical[metric, f])}
        elif name == "full":
            row["perturbed_source_ppl"] = {f"{m}@{g}": robustness(r["flat"], sel) for (m, g), sel in critical.items()}
        if lora is not None:
            row["lora_rank"] = next(iter(lora.values()))
        out["runs"].append(row)
        logging.info("%s at %s: %d trainable, target %.3f, source %.3f (%.0f s)", label, f, count,
                     ppl["target"], ppl["source"], row["seconds"])
    out["seconds"] = round(time.time() - t0, 1)
    return out
