"""Computational roles of critical weights: the unit each top-k weight belongs to, what that unit does on held-out
text, and which kinds of tokens the model loses when the top-k weights are knocked out.

Units (``unit_of``): an attention head (q/o weights: their query head; k/v: their key-value head, read through the
query heads it serves), an MLP neuron (gate/up: the neuron the weight feeds; down: the neuron it reads), or a
vocabulary row (the output matrix's column of a token, an embedding row).

Heads (``head_stats``, on held-out windows, every real query position but the first): the mean attention on the
previous token, on the window's first position (BOS / the attention sink), on itself, on the token after an
earlier occurrence of the current token (the induction pattern of Olsson et al. 2022, over the positions whose token
occurred before), the most attended fixed offset >= 2, on the last four tokens (offsets 0-3), and the mean
normalised entropy. ``head_class`` names the
pattern by fixed thresholds (``HEAD_CLASSES``, checked in order): a head is named where one pattern holds a clear
share of its attention, and left "unclassified" otherwise.

Neurons (``neuron_top``): each MLP neuron's largest activations (the input of the down projection) over the held-out
positions, with the token there and its context. ``neuron_label`` names a neuron a detector of one token when at
least half of its top activations sit on that token, or of one token category (``categories``) when 60% do and
that is at least ``ENRICHMENT`` times the category's share of all held-out tokens.

Knowledge localisation (``category_losses``): the mean increase of next-token loss per category of the target token
when a set of weights is zeroed, for the top-k and for same-size random-k sets. Factual recall (``FACTS``,
``fact_scores``): short prompts whose completion is a fact ("The capital of France is" → " Paris"), read as the
answer's loss and whether its first token is the model's top prediction.
"""

from __future__ import annotations

import collections
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wa import errors


class RolesError(errors.ConfigError):
    pass


# (name, statistic, threshold): the first whose statistic passes names the head.
HEAD_CLASSES = (("BOS/sink", "first", 0.5), ("previous-token", "prev", 0.4), ("induction", "induction", 0.3),
                ("self", "self", 0.4), ("positional", "offset_max", 0.4), ("local", "local", 0.6),
                ("broad", "entropy", 0.8))
TOKEN_SHARE, CATEGORY_SHARE, NEURON_TOP = 0.5, 0.6, 20
FUNCTION_WORDS = frozenset(
    "the a an and or but to of in on at for with was were is are be he she it they we you i his her their its "
    "that this there then so as by from had have has not no".split())
CATEGORIES = ("newline/BOS", "punctuation", "number", "name", "function word", "word start", "word piece")
ENRICHMENT = 2.0   # a category detector's share of top activations over the category's share of all tokens

# Short factual prompts and their answers (each answer opens with the space the word takes after the prompt):
# capitals, people, places, science, everyday facts, as a small model may know them.
FACTS = (
    ("The capital of France is", " Paris"), ("The capital of Japan is", " Tokyo"),
    ("The capital of Italy is", " Rome"), ("The capital of Germany is", " Berlin"),
    ("The capital of Spain is", " Madrid"), ("The capital of England is", " London"),
    ("The capital of Russia is", " Moscow"), ("The capital of China is", " Beijing"),
    ("The capital of Egypt is", " Cairo"), ("The capital of Canada is", " Ottawa"),
    ("Water is made of hydrogen and", " oxygen"), ("The largest planet in the solar system is", " Jupiter"),
    ("The planet closest to the Sun is", " Mercury"), ("The Earth orbits the", " Sun"),
    ("The chemical symbol for gold is", " Au"), ("The opposite of hot is", " cold"),
    ("The first president of the United States was George", " Washington"),
    ("Romeo and Juliet was written by William", " Shakespeare"),
    ("The theory of relativity was developed by Albert", " Einstein"),
    ("The Mona Lisa was painted by Leonardo da", " Vinci"), ("A week has seven", " days"),
    ("A year has twelve", " months"), ("The people of France speak", " French"),
    ("The people of Germany speak", " German"), ("The Great Wall is in", " China"),
    ("The Eiffel Tower is in", " Paris"), ("The Statue of Liberty is in New", " York"),
    ("Bees make", " honey"), ("The color of the sky on a clear day is", " blue"),
    ("The color of grass is", " green"), ("Two plus two equals", " four"), ("The sun rises in the", " east"),
    ("The largest ocean on Earth is the", " Pacific"), ("The longest river in Africa is the", " Nile"),
    ("The currency of Japan is the", " yen"), ("The author of Harry Potter is J.K.", " Rowling"),
    ("Ice is frozen", " water"), ("The heart pumps", " blood"), ("A baby cat is called a", " kitten"),
    ("The first man to walk on the Moon was Neil", " Armstrong"),
)


def category(piece: str, prev: str = "") -> str:
    """One token's category from its text (and the previous token's, to tell a name from a sentence's first word)."""
    s = piece.replace("\u2581", " ")
    t = s.strip()
    if not t or "\n" in s or t in ("<s>", "</s>", "<|endoftext|>"):
        return "newline/BOS"
    if all(c in string.punctuation for c in t):
        return "punctuation"
    if any(c.isdigit() for c in t):
        return "number"
    if t.lower() in FUNCTION_WORDS:
        return "function word"
    p = prev.replace("\u2581", " ").strip()
    starts_sentence = not p or p[-1] in ".!?\"'" or "\n" in prev
    if t[0].isupper() and t.isalpha() and not starts_sentence:
        return "name"
    return "word start" if s[0] == " " else "word piece"


def categories(ids: np.ndarray, decode) -> np.ndarray:
    """The category index (``CATEGORIES``) of every token of ``ids`` [windows, positions]."""
    pieces = {}
    out = np.zeros(ids.shape, np.int32)
    for w in range(ids.shape[0]):
        prev = ""
        for t in range(ids.shape[1]):
            i = int(ids[w, t])
            if i not in pieces:
                pieces[i] = decode(i)
            out[w, t] = CATEGORIES.index(category(pieces[i], prev))
            prev = pieces[i]
    return out


def _heads(config) -> tuple[int, int, int]:
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    hd = getattr(config, "head_dim", None) or config.hidden_size // h
    return h, kv, hd


def unit_of(loaded, path: str, index: int, shape) -> tuple[str, int | None, int] | None:
    """(kind, layer, unit) of weight ``index`` of ``path``: ("head", l, query head), ("kv_head", l, key-value
    head), ("neuron", l, n), ("token", None, vocabulary row); None for anything else (norms, fused matrices)."""
    info = loaded.describe(path)
    coords = np.unravel_index(int(index), tuple(shape))
    if len(shape) != 2:
        return None
    ax = loaded.family.input_axis(path)
    i, o = int(coords[ax]), int(coords[1 - ax])
    if info.component == "attention" and info.role in ("q", "k", "v", "o"):
        _, _, hd = _heads(loaded.config)
        if info.role == "q":
            return "head", info.layer, o // hd
        if info.role == "o":
            return "head", info.layer, i // hd
        return "kv_head", info.layer, o // hd
    if info.component == "mlp" and info.expert is None and info.role in ("gate", "up", "down"):
        return "neuron", info.layer, i if info.role == "down" else o
    if info.component == "head":
        return "token", None, o
    if info.component == "embedding":
        return "token", None, int(coords[0])
    return None


def _attention_and_neurons(loaded, params, batch):
    """Per layer the attention weights [b, h, t, t] (sown by the model) and the MLP's inner activations [b, t, n]
    (the down projection's input, intercepted)."""
    acts = {}

    def interceptor(next_fun, args, kwargs, context):
        name = "/".join(context.module.path)
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense) and \
                name.endswith("mlp/" + loaded.model.spec.names.down):
            acts[name] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        _, state = loaded.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                       method="hidden", mutable=["intermediates"])
    probs = {"/".join(str(getattr(k, "key", k)) for k in kp[:-2]): v
             for kp, v in jax.tree_util.tree_leaves_with_path(state.get("intermediates", {}))
             if str(getattr(kp[-2], "key", "")) == "attention"}
    return probs, acts


def _layer_of(name: str) -> int:
    parts = name.split("/")
    return int(parts[parts.index("layers") + 1])


def _head_sums(p, ids, mask, offsets: int = 8):
    """Sums over real query positions t >= 1 of each head's statistics, and the counts they divide by."""
    b, h, t, _ = p.shape
    p = p.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    q = m.at[:, 0].set(0.0)                                             # query positions t >= 1
    pos = jnp.arange(t)
    prev = jnp.einsum("bhtt->bht", jnp.roll(p, 1, axis=-1)[..., :, :])  # p[t, t-1] (t >= 1)
    first = p[..., 0]
    selfp = jnp.einsum("bhtt->bht", p)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)
    ent = ent / jnp.log(jnp.maximum(pos + 1, 2).astype(jnp.float32))[None, None]
    # Induction: the token after an earlier occurrence of the current token (j + 1 <= t - 1, ids[j] == ids[t]).
    same = (ids[:, :, None] == ids[:, None, :]) & (pos[None, :, None] > pos[None, None, :] + 1)
    after = jnp.roll(same, 1, axis=-1).at[..., 0].set(False)          # key j + 1 for every such j
    ind = jnp.sum(p * after[:, None].astype(jnp.float32), axis=-1)
    has = jnp.any(after, axis=-1).astype(jnp.float32) * q
    offs = jnp.stack([jnp.sum(p * (pos[:, None] - pos[None, :] == k)[None, None], axis=-1)
                      for k in range(2, 2 + offsets)], axis=-1)       # [b, h, t, offsets]
    sums = {name: jnp.sum(v * q[:, None], axis=(0, 2)) for name, v in
            (("prev", prev), ("first", first), ("self", selfp), ("entropy", ent))}
    sums["induction"] = jnp.sum(ind * has[:, None], axis=(0, 2))
    sums["offsets"] = jnp.sum(offs * q[:, None, :, None], axis=(0, 2))  # [h, offsets]
    return sums, jnp.sum(q), jnp.sum(has)


def capture(loaded, params, ids: np.ndarray, mask: np.ndarray, batch_size: int, top: int = NEURON_TOP) -> dict:
    """Head statistics and each neuron's top activations over held-out windows ``ids`` / ``mask``."""
    if loaded.family.kind != "causal_lm" or not hasattr(loaded.model, "spec"):
        raise RolesError(f"roles: {loaded.family.name} models are not supported (wa's decoder family only)")

    @jax.jit
    def step(params, batch):
        probs, acts = _attention_and_neurons(loaded, params, batch)
        heads = {n: _head_sums(p, batch["input_ids"], batch["attention_mask"]) for n, p in probs.items()}
        neurons = {}
        for n, a in acts.items():
            a = jnp.where(batch["attention_mask"][..., None] > 0, a.astype(jnp.float32), -jnp.inf)
            flat = a.reshape(-1, a.shape[-1]).T                     # [neurons, b·t]
            neurons[n] = jax.lax.top_k(flat, min(top, flat.shape[1]))
        return heads, neurons

    acc, tops, offset = {}, {}, 0
    for s in range(0, len(ids), batch_size):
        batch = {"input_ids": jnp.asarray(ids[s:s + batch_size]), "attention_mask": jnp.asarray(mask[s:s + batch_size])}
        heads, neurons = step(params, batch)
        if not heads:
            raise RolesError("roles: the model sowed no attention weights (a scanned model: load it unscanned)")
        for n, (sums, cq, ch) in heads.items():
            a = acc.setdefault(n, {"sums": None, "q": 0.0, "has": 0.0})
            sums = jax.tree.map(np.asarray, sums)
            a["sums"] = sums if a["sums"] is None else jax.tree.map(np.add, a["sums"], sums)
            a["q"] += float(cq)
            a["has"] += float(ch)
        t = batch["input_ids"].shape[1]
        for n, (vals, idx) in neurons.items():
            v, i = np.asarray(vals), np.asarray(idx) + offset * t
            if n in tops:
                v, i = np.concatenate([tops[n][0], v], 1), np.concatenate([tops[n][1], i], 1)
            order = np.argsort(-v, axis=1, kind="stable")[:, :top]
            tops[n] = (np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1))
        offset += batch["input_ids"].shape[0]
    heads = {}
    for n, a in acc.items():
        s, q = a["sums"], max(a["q"], 1.0)
        offs = s["offsets"] / q
        heads[_layer_of(n)] = {"prev": s["prev"] / q, "first": s["first"] / q, "self": s["self"] / q,
                               "entropy": s["entropy"] / q, "induction": s["induction"] / max(a["has"], 1.0),
                               "offset_max": offs.max(axis=1), "offset_arg": offs.argmax(axis=1) + 2,
                               "local": (s["self"] + s["prev"] + offs[:, :2].sum(axis=1) * q) / q}
    return {"heads": heads, "neurons": {_layer_of(n): v for n, v in tops.items()}, "seq_len": ids.shape[1]}


def head_class(stats: dict, layer: int, head: int) -> tuple[str, dict]:
    """The head's pattern class (``HEAD_CLASSES``) and its statistics."""
    figs = {k: float(stats["heads"][layer][k][head]) for k in ("prev", "first", "self", "induction", "entropy",
                                                                 "offset_max", "local")}
    figs["offset"] = int(stats["heads"][layer]["offset_arg"][head])
    for name, key, thr in HEAD_CLASSES:
        if figs[key] >= thr:
            return (f"positional (offset {figs['offset']})" if name == "positional" else name), figs
    return "unclassified", figs


def neuron_label(stats: dict, layer: int, neuron: int, ids: np.ndarray, cats: np.ndarray, decode,
                 context: int = 6) -> tuple[str | None, list[dict]]:
    """A neuron's label from its top activations (or None where no token or category dominates) and those
    activations with their token and context."""
    vals, idx = stats["neurons"][layer]
    t = stats["seq_len"]
    rows, toks, cs = [], [], []
    for v, i in zip(vals[neuron], idx[neuron], strict=True):
        if not np.isfinite(v):
            continue
        w, p = divmod(int(i), t)
        tok = int(ids[w, p])
        toks.append(tok)
        cs.append(int(cats[w, p]))
        rows.append({"activation": float(v), "token": decode(tok),
                     "context": "".join(decode(int(x)) for x in ids[w, max(0, p - context):p + 1])})
    if not toks:
        return None, rows
    tok, n = collections.Counter(toks).most_common(1)[0]
    if n >= TOKEN_SHARE * len(toks):
        return f"token detector: {decode(tok)!r}", rows
    c, n = collections.Counter(cs).most_common(1)[0]
    base = float(np.mean(cats == c))
    if n >= CATEGORY_SHARE * len(cs) and n / len(cs) >= ENRICHMENT * base:
        return f"category detector: {CATEGORIES[c]}", rows
    return None, rows


def per_token_nll(loaded, params, ids: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
    """Next-token loss at every position [windows, positions - 1] (NaN where the target is padding)."""
    fn = loaded.compiled("roles/token_nll", lambda: jax.jit(lambda p, i, m: _token_nll(loaded, p, i, m)))
    out = [np.asarray(fn(params, jnp.asarray(ids[s:s + batch_size]), jnp.asarray(mask[s:s + batch_size])))
           for s in range(0, len(ids), batch_size)]
    return np.concatenate(out)


def _token_outcomes(loaded, params, ids, mask):
    """Next-token loss (NaN where the target is padding) and whether the target is the top prediction."""
    logits = loaded.forward(params, ids, mask)
    logits = logits[0] if isinstance(logits, tuple) else logits
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(mask[:, 1:] > 0, nll, jnp.nan), lp.argmax(-1) == ids[:, 1:]


def _token_nll(loaded, params, ids, mask):
    return _token_outcomes(loaded, params, ids, mask)[0]


def fact_windows(tok, bos: bool, facts=FACTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [F, T], mask [F, T], answer [F, T]: the answer's tokens) of the prompts with their answers, right-padded;
    BOS first where ``bos`` and the tokenizer has one."""
    rows = []
    for prompt, answer in facts:
        start = [tok.bos_id] if bos and tok.bos_id is not None else []
        # The prompt's tokens are a prefix of the whole text's where the answer opens a new word (as here).
        rows.append((start + tok.encode(prompt + answer), len(start) + len(tok.encode(prompt))))
    t = max(len(r) for r, _ in rows)
    ids, mask, ans = (np.zeros((len(rows), t), d) for d in (np.int32, np.int32, bool))
    for i, (r, a) in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)], ans[i, a:len(r)] = r, 1, True
    return ids, mask, ans


def fact_scores(loaded, params, ids: np.ndarray, mask: np.ndarray, answer: np.ndarray, batch_size: int) -> dict:
    """The answers' mean loss per token (mean over facts) and the share of facts whose first answer token is the
    top prediction."""

    fn = loaded.compiled("roles/facts", lambda: jax.jit(lambda p, i, m: _token_outcomes(loaded, p, i, m)))
    outs = [fn(params, jnp.asarray(ids[s:s + batch_size]), jnp.asarray(mask[s:s + batch_size]))
            for s in range(0, len(ids), batch_size)]
    nll = np.concatenate([np.asarray(o[0]) for o in outs])
    hit = np.concatenate([np.asarray(o[1]) for o in outs])
    a = answer[:, 1:]
    first = a.argmax(1)
    per_fact = np.array([nll[i][a[i]].mean() for i in range(len(a))])
    top1 = hit[np.arange(len(a)), first]
    return {"answer_nll": float(per_fact.mean()), "first_token_top1": float(top1.mean()),
            "per_fact_nll": per_fact.round(4).tolist(), "per_fact_top1": top1.tolist()}


def category_losses(base: np.ndarray, knocked: np.ndarray, cats: np.ndarray) -> dict:
    """Mean loss increase per target-token category (targets: positions 1..)."""
    d, c = knocked - base, cats[:, 1:]
    out = {}
    for k, name in enumerate(CATEGORIES):
        sel = (c == k) & np.isfinite(d)
        out[name] = {"tokens": int(sel.sum()), "dnll": float(d[sel].mean()) if sel.any() else float("nan")}
    return out
