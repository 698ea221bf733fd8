r"""Sparse fine-tuning on critical weights against random-k, bottom-k, LoRA and full fine-tuning.

  python -m launch.finetune --config configs/finetune.py:stories260k --workdir runs/finetune-stories
  python -m launch.finetune --config configs/finetune.py:smoke --workdir /tmp/finetune

The workdir receives config.json, finetune.json (every run's figures), finetune.md (the table and what it says),
finetune.png (target perplexity and forgetting against the number of trainable weights) and DONE.json (last).
"""

import os

import jax
import numpy as np
from absl import flags

from launch import common
from wa import report, runs
from wa.data import paths, text
from wa.report import plots
from wa.train import finetune

_CONFIG = common.config_flag("configs/finetune.py:stories260k", "Fine-tuning config (configs/finetune.py).")
flags.DEFINE_string("workdir", None, "Run folder; default runs/finetune-<UTC time>.")
FLAGS = flags.FLAGS


def _table(res) -> str:
    rows = [{"method": r["method"], "k share": "all" if r["fraction"] is None else f"{r['fraction']:.1%}",
             "trainable": f"{r['trainable']:,}" + (f" (rank {r['lora_rank']})" if "lora_rank" in r else ""),
             "target ppl": report.number(r["target_ppl"]), "source ppl": report.number(r["source_ppl"]),
             "forgetting": f"{100 * r['forgetting']:+.1f}%"} for r in res["runs"]]
    return report.markdown_table(rows)


def _protection(res) -> str:
    """The protected runs beside full fine-tuning: forgetting, and the source perplexity after the source model's
    critical set is sign-flipped or bit-flipped, in the protected model, the unprotected one and the pretrained."""
    rows = []
    full = next((r for r in res["runs"] if r["method"] == "full"), None)
    for r in res["runs"]:
        if not r["method"].startswith(("freeze", "ewc")):
            continue
        (key, hit), = r["perturbed_source_ppl"].items()
        ref = (full or {}).get("perturbed_source_ppl", {}).get(key, {})
        pre = res["base_perturbed_source_ppl"][key]
        rows.append({"method": r["method"], "k share": f"{r['fraction']:.1%}",
                     "target ppl": report.number(r["target_ppl"]), "forgetting": f"{100 * r['forgetting']:+.1f}%",
                     "full: forgetting": f"{100 * full['forgetting']:+.1f}%" if full else "–",
                     **{f"{kind}: protected / full / pretrained": " / ".join(
                         report.number(x) for x in (hit[kind], ref.get(kind, float("nan")), pre[kind]))
                        for kind in hit}})
    if not rows:
        return ""
    return ("## Protecting the source model's critical weights\n\nFine-tuning every weight but the source model's "
            "top-k (score on source text): frozen, or held by EWC. Source perplexity after that same set is "
            "sign-flipped or has its exponent's lowest bit flipped (× 2 or ÷ 2).\n\n"
            + report.markdown_table(rows) + "\n")


def _says(res) -> str:
    """Per k: the best sparse method on the target, and how the score-chosen masks compare with random-k."""
    lines = []
    by_k = {}
    for r in res["runs"]:
        if r["fraction"] is not None and not r["method"].startswith(("freeze", "ewc")):
            by_k.setdefault(r["fraction"], {})[r["method"]] = r
    for f, rs in sorted(by_k.items()):
        sparse = {m: r for m, r in rs.items() if m != "lora"}
        best = min(sparse, key=lambda m: sparse[m]["target_ppl"])
        parts = [f"best sparse mask {best} (target {report.number(sparse[best]['target_ppl'])}, forgetting "
                 f"{100 * sparse[best]['forgetting']:+.1f}%)"]
        if "random" in rs and best != "random":
            parts.append(f"random-k {report.number(rs['random']['target_ppl'])}")
        if "lora" in rs:
            parts.append(f"LoRA {report.number(rs['lora']['target_ppl'])} with {rs['lora']['trainable']:,} weights")
        lines.append(f"- **k = {f:.1%}**: " + ", ".join(parts) + ".")
    full = [r for r in res["runs"] if r["method"] == "full"]
    if full:
        lines.append(f"- **full fine-tuning**: target {report.number(full[0]['target_ppl'])}, forgetting "
                     f"{100 * full[0]['forgetting']:+.1f}%.")
    return "\n".join(lines)


def write(workdir: str, res: dict) -> None:
    """finetune.json, finetune.md and finetune.png from the runs' figures."""
    report.write_json(os.path.join(workdir, "finetune.json"), res)
    methods = list(dict.fromkeys(r["method"] for r in res["runs"] if r["fraction"] is not None
                                 and not r["method"].startswith(("freeze", "ewc"))))
    panels = {}
    for what, key, label in (("target perplexity (log10)", "target_ppl", "adaptation"),
                             ("source perplexity (log10)", "source_ppl", "forgetting")):
        series = {m: ([r["trainable"] for r in res["runs"] if r["method"] == m],
                      [float(np.log10(r[key])) for r in res["runs"] if r["method"] == m]) for m in methods}
        for r in res["runs"]:
            if r["method"] == "full":
                series["full"] = ([r["trainable"]], [float(np.log10(r[key]))])
        panels[f"{label}: {what}"] = (what, series)
    plots.curve_panels(panels, "trainable weights", os.path.join(workdir, "finetune.png"), cols=2, marker="o",
                       logx=True)
    p, b = res["protocol"], res["base"]
    title = f"Sparse fine-tuning of {p['model']}: {p['source']} → {p['target']}"
    report.write_text(os.path.join(workdir, "finetune.md"), f"""# {title}

{p['steps']} AdamW steps of {p['batch_size']} × {p['seq_len']} target tokens (lr {p['lr']}, warmup and cosine
decay), the same batches for every method; k as a share of the {res['n_weights_matrices']:,} weight-matrix
entries. Before fine-tuning: target perplexity {report.number(b['target'])}, source perplexity
{report.number(b['source'])}. Forgetting: the source perplexity's rise. ESA scores are computed on target text
(`topk:grad_squared` is the FISH mask, Sung et al. 2021); LoRA (Hu et al. 2021) at the rank nearest the same
count. {res['seconds']:.0f} s in all.

## What it says
{_says(res)}

{_table(res)}

![fine-tuning](finetune.png)

{_protection(res)}""")


def main(argv):
    del argv
    cfg = _CONFIG.value
    finetune.check(cfg)
    paths.checkpoint(cfg.model)
    text.read(cfg.source)
    text.read(cfg.target)
    workdir = runs.writable(FLAGS.workdir, "finetune")
    common.start()
    folder = runs.Run.open(workdir, "finetune", {"config": cfg.to_dict()}, FLAGS.overwrite, jax.process_index())
    folder.started()
    report.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    res = finetune.run(cfg)
    if not common.is_chief():
        folder.finish([])
        return
    write(workdir, res)
    folder.finish(["config.json", "finetune.json", "finetune.md", "finetune.png"])
    print(f"{len(res['runs'])} runs; table in {workdir}/finetune.md")


if __name__ == "__main__":
    common.run(main)
