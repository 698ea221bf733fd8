r"""Main job: inspect a checkpoint and report its perplexity on a held-out corpus.

  python -m launch.main [--config configs/main.py:default] [--workdir DIR] [--config.field=value]

Writes config.json, params.json, summary.json and report.md to the workdir
(default runs/main-<time>), then the critical weight analysis (configs/esa.py:<esa_variant>) to
<workdir>/esa: summary.json, topk.csv, plots and report.md.
"""

import os
import time

import jax
from absl import flags, logging

from launch import common
from wa import errors, models, report, runs
from wa.data import paths, text, tokenizers
from wa.esa import evaluate, job, pipeline, verdicts
from wa.models import gguf_io, sampling, summary

_CONFIG = common.config_flag("configs/main.py:default", "Job config.")
flags.DEFINE_string("workdir", None, "Run folder; default runs/main-<UTC time>.")
FLAGS = flags.FLAGS

DTYPES = pipeline.DTYPES


def check(cfg):
    """Everything that can be wrong with the config, before any loading or compute."""
    if cfg.dtype not in DTYPES:
        raise errors.ConfigError(f"--config.dtype={cfg.dtype!r}: expected one of {sorted(DTYPES)}")
    for k in ("seq_len", "batch_size"):
        if cfg[k] < 1:
            raise errors.ConfigError(f"--config.{k}={cfg[k]}: must be positive")
    if cfg.max_windows < 0 or cfg.sample_tokens < 0:
        raise errors.ConfigError("--config.max_windows and --config.sample_tokens must be >= 0")
    pipeline.check_bos(cfg)


def main(argv):
    del argv
    cfg = _CONFIG.value
    check(cfg)
    esa_cfg = common.load_config("esa", cfg.esa_variant) if cfg.esa_variant else None
    if esa_cfg is not None:
        pipeline.check(esa_cfg)
    workdir = runs.writable(FLAGS.workdir, "main")
    common.start()
    ckpt = paths.checkpoint(cfg.checkpoint)
    # Refused before the folder is claimed: a corrected command on the same --workdir must not meet "holds another
    # run".
    pipeline.check_seq_len(models.read_config(ckpt), cfg.seq_len)
    corpus = text.read(cfg.corpus)  # fails fast on a missing or empty corpus
    if esa_cfg is not None:
        pipeline.check_inputs(esa_cfg)
    folder = runs.Run.open(workdir, "main", {"config": cfg.to_dict(), "checkpoint": models.identity(ckpt)},
                           FLAGS.overwrite, jax.process_index())
    folder.started()
    report.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    t0 = time.time()

    loaded = models.load(ckpt, mesh=cfg.mesh, dtype=DTYPES[cfg.dtype])
    if loaded.family.kind != "causal_lm":
        raise errors.ConfigError(f"--config.checkpoint={cfg.checkpoint!r} is a {loaded.family.kind}; "
                         "perplexity needs a causal LM")
    rows = summary.param_rows(loaded)
    tot = summary.totals(rows)
    t_load = time.time() - t0

    tok = tokenizers.get(ckpt)
    docs = text.documents(corpus, cfg.doc_split)
    stream = text.token_stream(docs, tok, bos=cfg.bos)
    ids, mask = text.lm_windows(stream, cfg.seq_len, pipeline.window_start(cfg, tok, cfg.checkpoint))
    if cfg.max_windows:
        ids, mask = ids[:cfg.max_windows], mask[:cfg.max_windows]
    logging.info("%s: %d documents, %d tokens, %d windows of %d", cfg.corpus, len(docs), len(stream),
                 len(ids), cfg.seq_len)
    t1 = time.time()
    res = evaluate.evaluate(loaded, loaded.params, ids, mask, cfg.batch_size, desc="perplexity")
    t_eval = time.time() - t1

    sample = ""
    # The prompt opens as the evaluated text does: with BOS where documents or windows start with it.
    bos = [tok.bos_id] if tok.bos_id is not None and (cfg.bos or cfg.window_bos or not cfg.sample_prompt) else []
    prompt = bos + (tok.encode(cfg.sample_prompt) if cfg.sample_prompt else [])
    if cfg.sample_tokens and prompt:
        out = sampling.greedy(loaded, loaded.params, prompt, cfg.sample_tokens)
        sample = cfg.sample_prompt + tok.decode(out[len(prompt):])

    result = {
        "checkpoint": loaded.path, "model_type": loaded.config.model_type,
        "n_params": tot["params"], "params_by_component": tot["params_by_component"],
        "bytes_per_device": tot["bytes_per_device"], "mesh": dict(loaded.mesh.shape),
        "corpus": cfg.corpus, "doc_split": cfg.doc_split, "documents": len(docs),
        "stream_tokens": int(len(stream)), "seq_len": cfg.seq_len, "windows": res["windows"],
        "target_tokens": res["tokens"], "nll_nats_per_token": res["nll"], "ppl": res["ppl"],
        "seconds_load": round(t_load, 2), "seconds_eval": round(t_eval, 2),
        "tokens_per_second": round(res["tokens"] / max(t_eval, 1e-9), 1), "greedy_sample": sample,
        "sample_prompt": cfg.sample_prompt, "sample_bos": bool(bos), "bos": cfg.bos, "window_bos": cfg.window_bos,
        "quantization": loaded.quantization, "licence": loaded.licence,
    }
    if common.is_chief():
        report.write_json(os.path.join(workdir, "params.json"), {"rows": rows, "totals": tot})
        report.write_json(os.path.join(workdir, "summary.json"), result)
        report.write_text(os.path.join(workdir, "report.md"), render(cfg, result, rows))
        print(f"{cfg.checkpoint}: {res['nll']:.4f} nats/token, perplexity {res['ppl']:.3f} on "
              f"{res['tokens']:,} tokens of {cfg.corpus}; report in {workdir}/report.md")
    if esa_cfg is not None:
        esa_dir = os.path.join(workdir, "esa")
        os.makedirs(esa_dir, exist_ok=True)
        _, s = job.run(esa_cfg, esa_dir, FLAGS.overwrite)
        if common.is_chief():
            v = verdicts.verdicts(s)
            met = [x for x in v if x.met]
            print(f"critical weight analysis: {len(met)} of {len(v)} ESA success criteria met; "
                  f"report in {esa_dir}/report.md")
    folder.finish(["config.json", "params.json", "summary.json", "report.md"]
                  + ([os.path.join("esa", runs.DONE_FILE)] if esa_cfg is not None else []))


def render(cfg, r, rows) -> str:
    by_layer: dict = {}
    for row in rows:
        key = ("-" if row["layer"] is None else row["layer"], row["component"])
        by_layer[key] = by_layer.get(key, 0) + row["numel"]
    comp_rows = [{"layer": k[0], "component": k[1], "parameters": f"{v:,}"}
                 for k, v in sorted(by_layer.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))]
    share = {k: f"{100 * v / r['n_params']:.1f}%" for k, v in r["params_by_component"].items()}
    joined = ("each document's tokens are preceded by BOS and all are joined into one stream"
              if r["bos"] else "the documents' tokens are joined into one stream, and every window is BOS followed "
              f"by the next {r['seq_len'] - 1} tokens of it (so each token is a target once, predicted from a context "
              "that starts at BOS)" if r.get("window_bos") else "the documents' tokens are joined into one stream "
              "without BOS (the model's tokenizer adds none)")
    quant = gguf_io.quantization_note(r.get("quantization"))
    quant = f"\n- {quant}" if quant else ""
    if r.get("licence"):
        quant += f"\n- weights licence (from the file): {r['licence']}"
    sample_from = f"`{r['sample_prompt']}`" if r["sample_prompt"] else "BOS"
    if r["sample_prompt"] and r.get("sample_bos"):
        sample_from = "BOS + " + sample_from
    return f"""# {cfg.checkpoint}: inspection and held-out perplexity

**{r['nll_nats_per_token']:.4f} nats/token, perplexity {r['ppl']:.3f}** on {r['target_tokens']:,}
predicted tokens of `{r['corpus']}`.

## Model
- checkpoint `{r['checkpoint']}` ({r['model_type']}), {r['n_params']:,} stored parameters,
  {r['bytes_per_device']:,} bytes per device on mesh {r['mesh']}
- parameters by component: {', '.join(f'{k} {v:,} ({share[k]})' for k, v in r['params_by_component'].items())}{quant}

{report.markdown_table(comp_rows)}

## How perplexity was measured
- corpus split into {r['documents']:,} documents by `{r['doc_split']}` (`wa.data.text.documents`);
  {joined} of {r['stream_tokens']:,} tokens.
- the stream is cut into {r['windows']:,} windows of {r['seq_len']} tokens with stride {r['seq_len'] - 1},
  so every token but the first is predicted exactly once, with the context reset at each window start.
- loss = mean next-token cross entropy over those {r['target_tokens']:,} targets, summed in float64
  across batches; perplexity = exp(loss).
- load {r['seconds_load']} s, evaluation {r['seconds_eval']} s ({r['tokens_per_second']:,} tokens/s).

## Greedy continuation of {sample_from}
> {r['greedy_sample'].replace(chr(10), chr(10) + '> ')}
"""


if __name__ == "__main__":
    common.run(main)
