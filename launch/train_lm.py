r"""Train a small causal LM and save it as an HF Flax checkpoint (workdir/hf).

  python -m launch.train_lm --config configs/train_lm.py:shakespeare_char --workdir runs/shakespeare_char

Resumes from workdir/checkpoints (orbax) when re-run with the same config and corpus (anything else is refused;
--overwrite starts afresh). Writes train.json, history.json,
training_curve.png and report.md.
"""

import os

import jax
from absl import flags

from launch import common
from wa import report, runs
from wa.report import plots
from wa.train import lm

_CONFIG = common.config_flag("configs/train_lm.py:shakespeare_char", "Training config.")
flags.DEFINE_string("workdir", None, "Run folder (resumes if it holds checkpoints); default runs/train_lm-<time>.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = _CONFIG.value
    lm.check(cfg)
    lm.check_inputs(cfg)   # before the folder is claimed: a refused run leaves --workdir as it found it
    workdir = runs.writable(FLAGS.workdir, "train_lm")
    common.start()
    folder = runs.Run.open(workdir, "train_lm", lm.fingerprint(cfg), FLAGS.overwrite, jax.process_index())
    folder.started()
    report.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    r = lm.train(cfg, workdir)
    if common.is_chief():
        report.write_json(os.path.join(workdir, "train.json"), r)
        h = r["history"]
        plots.training_curve([x["step"] for x in h["train"]], [x["loss"] for x in h["train"]],
                             [x["step"] for x in h["val"]], [x["nll"] for x in h["val"]],
                             os.path.join(workdir, "training_curve.png"))
        active = "" if r["n_active_params"] == r["n_params"] else \
            f" ({r['n_active_params']:,} multiplied per token: {cfg.experts_per_token} of {cfg.experts} experts routed)"
        balance = [x["balance"] for x in h["train"] if "balance" in x]
        if balance:
            active += (f"; router load-balancing loss {balance[-1]:.4f} at the last step (k = "
                       f"{cfg.experts_per_token} when the router's probabilities are uniform; the layers pooled, as "
                       f"transformers computes it), weighted {cfg.router_aux_loss_coef} in the objective")
        report.write_text(os.path.join(workdir, "report.md"), f"""# {r['arch']} on {r['corpus']}

{r['n_params']:,} parameters{active}, tokenizer `{r['tokenizer']}` (vocabulary {r['vocab_size']}),
trained {r['steps']} steps on {r['tokens_seen']:,} tokens drawn from a {r['train_tokens']:,}-token training stream.

**Validation: {r['val_nll']:.4f} nats/token, perplexity {r['val_ppl']:.3f}** on {r['val_tokens']:,} held-out tokens
(the last {100 * cfg.val_fraction:.0f}% of documents, never trained on).

![training curve](training_curve.png)

Checkpoint: `{r['hf_dir']}` (HF `save_pretrained`; load with `wa.models.load`).
""")
        folder.finish(["config.json", "train.json", "history.json", "training_curve.png", "report.md",
                       os.path.join("hf", "config.json")])
        print(f"{r['n_params']:,} parameters; validation {r['val_nll']:.4f} nats/token, perplexity {r['val_ppl']:.3f}; "
              f"checkpoint {r['hf_dir']}")


if __name__ == "__main__":
    common.run(main)
