"""Train a causal LM from scratch: wa's GPT-2 / Llama / Mixtral modules (HF configs), optax AdamW, orbax resume,
save_pretrained.

Data: the corpus is split into documents; the last ``val_fraction`` of them are validation
(never trained on). Each step draws ``batch_size`` random windows of ``seq_len`` tokens from the
training stream (seeded by step, so a resumed run sees the same batches as an uninterrupted one).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from absl import logging
from tqdm import tqdm

from wa import errors, parallel, report, runs
from wa.data import paths, text, tokenizers
from wa.esa import evaluate
from wa.models import checkpoint as ckpt_lib
from wa.parallel import mesh as mesh_lib
from wa.parallel import rules as rules_lib
from wa.train import core


class TrainError(errors.ConfigError):
    pass


def hf_config(cfg, vocab_size: int, bos: int | None, eos: int | None):
    if cfg.hidden % cfg.heads:
        raise TrainError(f"--config.hidden={cfg.hidden} is not divisible by --config.heads={cfg.heads}")
    if cfg.arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_positions=cfg.seq_len, n_embd=cfg.hidden,
                                       n_layer=cfg.layers, n_head=cfg.heads, bos_token_id=bos, eos_token_id=eos,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if cfg.arch == "llama":
        if cfg.heads % cfg.kv_heads:
            raise TrainError(f"--config.heads={cfg.heads} is not divisible by --config.kv_heads={cfg.kv_heads}")
        return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                                        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                                        intermediate_size=cfg.intermediate, max_position_embeddings=cfg.seq_len,
                                        bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False)
    if cfg.arch == "mixtral":
        # Llama's settings but the MLP: the same rotary base and norm epsilon, so a Mixtral and a Llama whose
        # intermediate size is experts_per_token × the expert's differ in nothing but the sparse MLP.
        return transformers.MixtralConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                                          num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                                          intermediate_size=cfg.intermediate, max_position_embeddings=cfg.seq_len,
                                          num_local_experts=cfg.experts, num_experts_per_tok=cfg.experts_per_token,
                                          router_aux_loss_coef=cfg.router_aux_loss_coef, rope_theta=10000.0,
                                          rms_norm_eps=1e-6, bos_token_id=bos, eos_token_id=eos,
                                          tie_word_embeddings=False, sliding_window=None)
    raise TrainError(f"--config.arch={cfg.arch!r}: expected one of {', '.join(ARCHS)}")


ARCHS = ("gpt2", "llama", "mixtral")


def save_tokenizer(tok, name: str, out_dir: str):
    """Puts the tokenizer beside the weights so ``wa.data.tokenizers.get(out_dir)`` finds it."""
    if isinstance(tok, tokenizers.SentencePiece):
        tok.save(os.path.join(out_dir, "tokenizer.model"))
    elif isinstance(tok, tokenizers.HF):
        tok.tok.save_pretrained(out_dir)
    else:
        report.write_json(os.path.join(out_dir, tokenizers.MARKER), {"type": name})


def check(cfg) -> None:
    """Every config value in range, before any data or device is touched."""
    errors.check_values(cfg, {
        "steps": errors.COUNT, "batch_size": errors.COUNT, "seq_len": (lambda v: int(v) == v and v >= 2,
                                                                        "an integer >= 2"),
        "lr": errors.POSITIVE, "warmup": errors.NON_NEGATIVE, "weight_decay": errors.NON_NEGATIVE,
        "clip": errors.POSITIVE, "eval_every": errors.COUNT, "eval_windows": errors.COUNT,
        "checkpoint_every": errors.COUNT, "halt_at": errors.NON_NEGATIVE, "hidden": errors.COUNT,
        "layers": errors.COUNT, "heads": errors.COUNT, "kv_heads": errors.COUNT, "intermediate": errors.COUNT,
        "val_fraction": (lambda v: 0 < v < 1, "a fraction in (0, 1): the share of documents held out"),
    })
    if cfg.arch not in ARCHS:
        raise TrainError(f"--config.arch={cfg.arch!r}: expected one of {', '.join(ARCHS)}")
    if cfg.arch == "mixtral":
        errors.check_values(cfg, {"experts": (lambda v: int(v) == v and v >= 2, "an integer >= 2"),
                                  "router_aux_loss_coef": errors.NON_NEGATIVE})
        if cfg.get("balance", "pooled") not in ("pooled", "per_layer"):
            raise TrainError(f"--config.balance={cfg.balance!r}: expected pooled or per_layer")
        if not 1 <= cfg.experts_per_token <= cfg.experts or int(cfg.experts_per_token) != cfg.experts_per_token:
            raise TrainError(f"--config.experts_per_token={cfg.experts_per_token}: expected an integer in "
                             f"1..--config.experts ({cfg.experts})")
    if cfg.warmup >= cfg.steps:
        raise TrainError(f"--config.warmup={cfg.warmup}: the warmup must end before the run's last step "
                         f"(--config.steps={cfg.steps}); the cosine decay needs steps after it")
    if cfg.hidden % cfg.heads:
        raise TrainError(f"--config.hidden={cfg.hidden} is not divisible by --config.heads={cfg.heads}")
    text.corpus_path(cfg.corpus)


def fingerprint(cfg) -> dict:
    """What a trained LM depends on: the config (but ``halt_at``, a simulated preemption) and the corpus's bytes."""
    c = cfg.to_dict()
    c.pop("halt_at", None)
    if c.get("arch") != "mixtral":   # settings a dense model does not read: runs from before they existed resume
        for k in ("experts", "experts_per_token", "router_aux_loss_coef", "balance"):
            c.pop(k, None)
    return {"config": c, "corpus": runs.file_digest(text.corpus_path(cfg.corpus))}


def check_inputs(cfg) -> None:
    """The tokenizer and the corpus exist and read, before a run folder is claimed."""
    tokenizers.get(paths.checkpoint(cfg.tokenizer))
    text.read(cfg.corpus)


def train(cfg, workdir: str, progress: bool = True) -> dict:
    check(cfg)
    tok = tokenizers.get(paths.checkpoint(cfg.tokenizer))
    docs = text.documents(text.read(cfg.corpus), cfg.doc_split)
    n_val = max(1, int(round(len(docs) * cfg.val_fraction)))
    train_stream = text.token_stream(docs[:-n_val], tok)
    val_ids, val_mask = text.lm_windows(text.token_stream(docs[-n_val:], tok), cfg.seq_len)
    val_ids, val_mask = val_ids[:cfg.eval_windows], val_mask[:cfg.eval_windows]
    if len(train_stream) <= cfg.seq_len:
        raise TrainError(f"{cfg.corpus}: the training part has {len(train_stream)} tokens, fewer than seq_len")

    config = hf_config(cfg, tok.vocab_size, tok.bos_id, tok.eos_id)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    model, family = ckpt_lib.build_model(config, mesh=mesh)
    shapes = model.params_shape_tree
    shardings = rules_lib.shardings_for(shapes, family.partition_rules, mesh)
    init = jax.jit(lambda key: model.init_weights(key, (1, cfg.seq_len)), out_shardings=shardings)
    params = init(jax.random.key(cfg.seed))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))

    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.lr * 0.1)
    decay_mask = jax.tree_util.tree_map_with_path(lambda kp, x: x.ndim >= 2, params)
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip),
                      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask))
    opt_state = jax.jit(opt.init)(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}

    ckpts = core.Checkpoints(workdir, "step", max_to_keep=2)
    state, start, history = ckpts.resume(state, {"train": [], "val": []})
    nll = jax.jit(lambda params, batch: family.token_nll(model, params, batch))

    experts = getattr(model, "experts", 0)

    def objective(p, batch):
        """The mean next-token loss; for an MoE model plus router_aux_loss_coef × the router's load-balancing
        loss (Fedus et al. 2021), as transformers' Mixtral adds it. Returns (objective, (mean nll, balance))."""
        if not experts:
            loss = family.loss(model, p, batch)
            return loss, (loss, jnp.zeros((), jnp.float32))
        (total, count), balance = model.nll_and_balance(p, batch, cfg.get("balance", "pooled") == "per_layer")
        nll = total / jnp.maximum(count, 1)
        return nll + cfg.router_aux_loss_coef * balance, (nll, balance)

    @jax.jit
    def step_fn(state, batch):
        (_, (loss, balance)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}, loss, balance

    def batch_for(step):
        rng = np.random.default_rng([cfg.seed, step])
        starts = rng.integers(0, len(train_stream) - cfg.seq_len, size=cfg.batch_size)
        ids = np.stack([train_stream[s:s + cfg.seq_len] for s in starts])
        return parallel.make_global_batch(mesh, cfg.batch_size,
                                          lambda lo, hi: {"input_ids": ids[lo:hi],
                                                          "attention_mask": np.ones_like(ids[lo:hi])})

    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=not progress or jax.process_index() > 0)
    for step in bar:
        state, loss, balance = step_fn(state, batch_for(step))
        done = step + 1
        if done % 10 == 0 or done == cfg.steps:
            history["train"].append({"step": done, "loss": float(loss)} |
                                    ({"balance": float(balance)} if experts else {}))
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if done % cfg.eval_every == 0 or done == cfg.steps:
            r = evaluate.nll(nll, mesh, state["params"], val_ids, val_mask, cfg.batch_size, progress=False)
            history["val"].append({"step": done, "nll": r["nll"], "ppl": r["ppl"]})
            logging.info("step %d: val %.4f nats/token, perplexity %.3f", done, r["nll"], r["ppl"])
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            ckpts.save(done, state, history)
            if core.halt(done, cfg.halt_at, "--config.halt_at"):
                break
    seconds = time.time() - t0

    hf_dir = os.path.join(workdir, "hf")
    if jax.process_index() == 0:
        host = jax.device_get(state["params"])
        model.save_pretrained(hf_dir, params=host)
        save_tokenizer(tok, cfg.tokenizer, hf_dir)
    final = history["val"][-1] if history["val"] else {"nll": float("nan"), "ppl": float("nan")}
    return {"arch": cfg.arch, "n_params": n_params, "tokenizer": cfg.tokenizer, "vocab_size": tok.vocab_size,
            "corpus": cfg.corpus, "train_tokens": int(len(train_stream)), "steps": cfg.steps,
            "steps_done": int(state["step"]),
            "tokens_seen": int(state["step"]) * cfg.batch_size * cfg.seq_len, "val_tokens": int(val_mask[:, 1:].sum()),
            "val_nll": final["nll"], "val_ppl": final["ppl"], "seconds_this_run": round(seconds, 1),
            "resumed_from": start, "hf_dir": hf_dir, "history": history,
            "family": family.name, "n_active_params": active_params(config, n_params)}


def active_params(config, n_params: int) -> int:
    """Parameters one token's forward pass multiplies: all of a dense model's; an MoE model's without the
    experts the router leaves out (experts - experts_per_token of them per layer)."""
    experts = getattr(config, "num_local_experts", 0) or 0
    if not experts:
        return n_params
    per_expert = 3 * config.hidden_size * config.intermediate_size
    return n_params - config.num_hidden_layers * (experts - config.num_experts_per_tok) * per_expert
