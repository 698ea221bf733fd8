r"""Learning from weights, every learner on one zoo and one split: a paper-style results section.

  python experiments/nwa_benchmark.py                          # digits zoo (runs/zoo_digits), 3 seeds
  python experiments/nwa_benchmark.py --zoo=runs/zoo_mnist5k_single/zoo --workdir=runs/nwa_benchmark_single \
      --cross_arch=                                            # the single-architecture zoo
  python experiments/nwa_benchmark.py --zoo=/tmp/zoo/zoo --smoke --workdir=/tmp/nwa   # seconds, for tests

Every learner of ``configs/probe.py`` is trained with each seed (initialization, data order, dropout) on the same
split by family tree (70/15/15, split seed 0), to convergence: early stopping on validation under a generous epoch
cap. A learner that reads only some families (NFN: MLP and CNN) uses the same split restricted to them, and is
compared with the statistics baseline on the same test networks. Cross-architecture runs hold out one family
each. Lineage: trees rebuilt per architecture from weights (whole zoo) and, on the test trees, from learned
embeddings.
Writes <workdir>/results.json, report.md and PNGs; each (learner, seed) run keeps its own folder, and a re-run
skips finished ones. Prints one JSON line of headline figures.
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from configs import probe as probe_configs  # noqa: E402
from launch import common  # noqa: E402
from wa import learners, lineage, report, runs  # noqa: E402
from wa.eval import reliability  # noqa: E402
from wa.learners import data as data_lib  # noqa: E402
from wa.learners import probe  # noqa: E402
from wa.report import plots  # noqa: E402

flags.DEFINE_string("zoo", "runs/zoo_digits/zoo", "Zoo store (launch.make_zoo writes <workdir>/zoo).")
flags.DEFINE_string("workdir", "runs/nwa_benchmark", "Output folder.")
flags.DEFINE_list("learners", list(probe_configs.LEARNERS), "configs/probe.py variants to run.")
flags.DEFINE_list("single_seed", ["stats_gbt", "spectral_gbt", "stats_spectral_gbt"], "Learners run with the first "
                  "seed only: histogram GBT without early stopping does not use its seed, so more seeds repeat the "
                  "same fit.")
flags.DEFINE_string("published", "", "A published figure to calibrate against (a key of PUBLISHED): the report sets "
                    "this zoo's stats_gbt and accuracy range beside it.")
flags.DEFINE_string("config_flags", "", "Extra configs/probe.py flags for every run, e.g. 'nfn_protocol' for an "
                    "imported Small CNN Zoo with its NFN split.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
flags.DEFINE_list("ablation_seeds", [], "Seeds for the WeightNet ablations and the multi-resolution variants "
                  "(default: --seeds); fewer saves time.")
flags.DEFINE_bool("final_only", True, "One network per model (its last checkpoint) instead of every checkpoint.")
flags.DEFINE_integer("graph_epochs", 80, "Epoch cap for the structure learners (early stopping ends sooner).")
flags.DEFINE_integer("dense_epochs", 100, "Epoch cap for the MLP baselines.")
flags.DEFINE_integer("patience", 10, "Early stopping: epochs without a better validation criterion.")
flags.DEFINE_list("cross_arch", ["transformer", "mlp"], "Families held out, one cross-architecture run each ('' to "
                  "skip): train on the others, test on it.")
flags.DEFINE_list("cross_learners", ["nwpa", "weightnet", "stats_gbt"], "Learners of the cross-architecture runs "
                  "(seed 0).")
flags.DEFINE_bool("smoke", False, "Tiny models and 2 epochs (tests).")
FLAGS = flags.FLAGS

HEADLINE = {"class": ("accuracy", "f1"), "regression": ("r2", "kendall_tau", "mae")}


def task_metrics(spec: dict) -> tuple[str, ...]:
    """The figures reported for a task: a two-class task (backdoored or not) adds the AUROC, the detection
    literature's figure."""
    two = spec["kind"] == "class" and len(spec["classes"]) == 2
    return HEADLINE[spec["kind"]] + (("auroc",) if two else ())


STRUCTURE = tuple(v for v, (_, role, _) in probe_configs.VARIANTS.items() if role in ("structure", "multi_resolution"))
ABLATIONS = tuple(v for v, (_, role, _) in probe_configs.VARIANTS.items() if role == "ablation")
GRAPH = (*STRUCTURE, *ABLATIONS)
MARGIN = 0.03   # a structure learner's test-accuracy τ must exceed the statistics baseline's by this much
# Published figures a zoo of the same protocol is calibrated against.
PUBLISHED = {
    "small_cnn_fmnist": {
        "about": "Unterthiner et al. 2020, Small CNN Zoo, Fashion-MNIST: 30,000 CNNs trained 86 epochs; "
                 "gradient-boosted trees on the 56 per-layer weight statistics predict final test accuracy with "
                 "Kendall τ 0.92 (the figure the field cites for MNIST and Fashion-MNIST) and R² 0.993 (the "
                 "released best_configs.json, LightGBM on the statistics of layers 0-3)",
        "stats_gbt": {"kendall_tau": 0.92, "r2": 0.9931},
        "test_acc_max": 0.887,
        # Percentiles of the released zoo's test accuracy (the bins of google-research/approxNN's config.py).
        "test_acc_percentiles": {0: 0.016, 20: 0.118, 40: 0.474, 60: 0.686, 80: 0.762, 90: 0.826, 95: 0.846,
                                 99: 0.857, 100: 0.887}},
    "small_cnn_mnist": {
        "about": "Unterthiner et al. 2020, Small CNN Zoo, MNIST: 30,000 CNNs trained 86 epochs; gradient-boosted "
                 "trees on the 56 per-layer statistics, Kendall τ 0.92 and R² 0.993 (released best_configs.json, "
                 "LightGBM)",
        "stats_gbt": {"kendall_tau": 0.92, "r2": 0.9928},
        "test_acc_max": 0.986,
        "test_acc_percentiles": {0: 0.047, 20: 0.113, 40: 0.359, 60: 0.739, 80: 0.898, 90: 0.955, 95: 0.969,
                                 99: 0.974, 100: 0.986}},
}
# The NWA proposal's expected outcomes: (task, metric, threshold or None for "above the statistics baseline").
TARGETS = [("architecture", "accuracy", 0.99), ("data characteristics (mean of those varied)", "accuracy", 0.80),
           ("test_acc", "kendall_tau", None), ("gen_gap", "r2", 0.7), ("vulnerable", "f1", 0.75),
           ("disparity", "r2", 0.6)]


def config(variant: str, seed: int, cross: str = ""):
    extra = [f for f in FLAGS.config_flags.split(",") if f] + (["smoke"] if FLAGS.smoke else [])
    c = probe_configs.get_config(",".join([variant, *extra]))
    c.zoo = FLAGS.zoo
    c.data.final_only = FLAGS.final_only or c.data.final_only
    c.train.seed = seed
    if not FLAGS.smoke:
        c.train.epochs = FLAGS.graph_epochs if variant in GRAPH else FLAGS.dense_epochs
        c.train.patience = FLAGS.patience
    if cross:
        c.split.kind, c.split.held_out = "cross_arch", cross
        for t in ("architecture", "family"):
            if t in c.tasks:
                del c.tasks[t]
    return c


def run_one(variant, seed, ws, cross=""):
    out = os.path.join(FLAGS.workdir, f"cross_{cross}" if cross else "runs", variant, f"seed_{seed}")
    if runs.complete(out, "probe"):  # a killed run's folder has no marker: it resumes from its checkpoint
        return json.load(open(os.path.join(out, "metrics.json")))
    t0 = time.time()
    r = probe.run(config(variant, seed, cross), out, progress=False, ws=ws)
    wall = time.time() - t0
    report.write_json(os.path.join(out, WALL_FILE), {"seconds": round(wall, 1)})  # beside the run's own files
    logging.info("%s seed %d%s: %.0f s", variant, seed, f" (cross {cross})" if cross else "", wall)
    return r


WALL_FILE = "wall_seconds.json"


def runs_seconds() -> float:
    """Wall time of every run under --workdir, as measured when it ran (a re-run that reuses them is instant)."""
    total = 0.0
    for root, _, files in os.walk(FLAGS.workdir):
        if WALL_FILE in files:
            total += json.load(open(os.path.join(root, WALL_FILE)))["seconds"]
    return round(total, 1)


def headline(runs: dict) -> dict:
    """variant → task → metric → (mean, std, values over seeds)."""
    out = {}
    for v, by_seed in runs.items():
        rs = list(by_seed.values())
        out[v] = {}
        for task, spec in rs[0]["targets"].items():
            out[v][task] = {}
            for m in task_metrics(spec):
                vals = [r["tasks"][task].get(m, float("nan")) for r in rs]
                out[v][task][m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}
        if any(t in rs[0]["tasks"] for t in data_lib.DATA_TASKS):
            data = [np.mean([r["tasks"][t]["accuracy"] for t in data_lib.DATA_TASKS if t in r["tasks"]]) for r in rs]
            out[v]["data characteristics (mean of those varied)"] = {"accuracy": {"mean": float(np.mean(data)),
                                                                       "std": float(np.std(data)), "values": data}}
        base = baseline_tau(by_seed, v)
        if base is not None:
            out[v]["test_acc"]["baseline_tau"] = base
        gaps = [r["permutation"]["max"] for r in rs]
        out[v]["permutation_gap"] = {"max": float(np.max(gaps)), "values": gaps}
        out[v]["timing"] = {k: float(np.mean([r["timing"][k] for r in rs])) for k in rs[0]["timing"]}
    return out


def _tau_on(variant: str, seed: int, families) -> float | None:
    """Test-accuracy Kendall τ of one finished run, on the test networks of ``families`` only."""
    import pandas as pd
    from scipy import stats as sstats
    f = os.path.join(FLAGS.workdir, "runs", variant, f"seed_{seed}", "predictions.parquet")
    if not os.path.exists(f):
        return None
    p = pd.read_parquet(f)
    p = p[p["family"].isin(families)]
    return float(sstats.kendalltau(p["test_acc/true"], p["test_acc/pred"]).statistic)


def baseline_tau(by_seed: dict, variant: str) -> dict | None:
    """stats_gbt's test-accuracy τ on the networks ``variant`` was tested on, where it read only some families
    (mean and values over the baseline's seeds)."""
    fams = next(iter(by_seed.values()))["data"].get("families")
    if variant == "stats_gbt" or not fams:
        return None
    base_runs = os.path.join(FLAGS.workdir, "runs", "stats_gbt")
    if not os.path.isdir(base_runs):
        return None
    seeds = sorted(int(d.split("_")[1]) for d in os.listdir(base_runs) if d.startswith("seed_"))
    all_fams = json.load(open(os.path.join(base_runs, f"seed_{seeds[0]}", "metrics.json")))["data"]["families"]
    if set(fams) == set(all_fams):
        return None
    vals = [t for t in (_tau_on("stats_gbt", sd, fams) for sd in seeds) if t is not None]
    return {"mean": float(np.mean(vals)), "values": vals, "families": fams} if vals else None


def gbt_curve(ws) -> dict:
    """stats_gbt's test-accuracy τ and R² on the fixed test split when it is fitted on nested subsets of the
    training networks: how far a figure measured on a zoo of hundreds of networks sits from one on tens of
    thousands (the published Small CNN Zoo fits on ~15,000)."""
    from wa.eval import metrics
    c = config("stats_gbt", 0)
    parts = probe.split(ws.rows, c.split)
    targets = data_lib.targets(ws.rows, {"test_acc": 1.0}, parts["train"])
    lr = learners.get("stats_gbt", c.model, targets)
    feats = lr.prepare(ws.params, ws.families, ws.activations)
    order = np.random.default_rng(0).permutation(parts["train"])
    out = {}
    for frac in (0.125, 0.25, 0.5, 1.0):
        n = max(int(round(frac * len(order))), 8)
        lr.fit(feats, np.sort(order[:n]), parts["val"], 0)
        pred = targets.unscale("test_acc", lr.predict(feats, parts["test"])["test_acc"])
        m = metrics.regression(targets.truth("test_acc", parts["test"]), pred)
        out[str(n)] = {"kendall_tau": m["kendall_tau"], "r2": m["r2"]}
    return out


def lineage_scores(ws, runs) -> dict:
    """Per architecture: trees from the last-checkpoint weights of every model; on the test trees also from each
    learner's seed-0 test embeddings (needs --final_only: one embedding per model)."""
    import pandas as pd
    rows = ws.rows
    if (rows["parent_id"].fillna(-1) < 0).all():
        return {"skipped": "the zoo has no family trees (every model is a root): there is no lineage to recover"}
    final = rows.loc[rows.groupby("model_id")["epoch"].idxmax()]

    def trees(sub, features=None):
        # wa's first method with the trees found (a forest per architecture), every tree scored.
        return lineage.rebuild(sub, [ws.params[i] for i in sub.index], "wa_v1", "found", features=features)["archs"]

    out = {"weights_all": trees(final), "test_trees": {}}
    for v in runs:
        d = os.path.join(FLAGS.workdir, "runs", v, "seed_0")
        if not FLAGS.final_only or not os.path.exists(os.path.join(d, "embeddings.npy")):
            continue
        test = pd.read_parquet(os.path.join(d, "predictions.parquet"))["row"].to_numpy()
        emb = np.load(os.path.join(d, "embeddings.npy"))
        out["test_trees"][v] = {"weights": trees(rows.iloc[test]), "embedding": trees(rows.iloc[test], list(emb))}
    return out


def fmt(d):
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


NOT_WEIGHTS_ONLY = "†"


def label(variant: str) -> str:
    """A learner's name in the tables, marked where it runs the networks rather than reading only their weights."""
    entry = learners.LEARNERS.get(probe_configs.VARIANTS.get(variant, (variant,))[0])
    return variant + NOT_WEIGHTS_ONLY if entry is not None and not entry.weights_only else variant


def write_report(results, runs):
    wd = FLAGS.workdir
    h = results["headline"]
    variants = list(h)
    tasks = list(runs[variants[0]][0]["targets"])
    which = "last checkpoint of each model" if FLAGS.final_only else "every checkpoint from epoch 1"
    lines = ["# Learning from weights — benchmark", "",
             f"Zoo `{FLAGS.zoo}`: {results['data']['networks']} networks ({which}), "
             f"split by family tree 70/15/15 (split seed 0): {results['data']['train_networks']} train / "
             f"{results['data']['val_networks']} val / {results['data']['test_networks']} test networks. "
             f"Seeds {FLAGS.seeds} (model init, data order, dropout; ablations and multi-resolution variants: "
             f"{FLAGS.ablation_seeds or FLAGS.seeds}); numbers are mean ± std over seeds on the test split. "
             "Regression metrics are in the target's own units.", ""]
    first = runs[variants[0]][next(iter(runs[variants[0]]))]
    ceil = first.get("ceilings", {})
    rng_ = first["data"].get("test_acc_range")
    if rng_:
        lines += ["## The zoo", "", "Test accuracy of the networks read (min / 5% / median / 95% / max): "
                  + " / ".join(f"{rng_[k]:.3f}" for k in ("min", "q05", "q50", "q95", "max")) + ".", ""]
    if ceil:
        lines += ["Label ceilings — how much of each target the zoo's measurement can support: the same property "
                  "measured on two disjoint, class-stratified halves of the evaluation images, correlated across "
                  "networks (r) and Spearman–Brown corrected to the full set (reliability ρ). No learner can pass "
                  "R² ρ or Kendall τ (2/π)·arcsin(√ρ) in expectation; a training setting is known exactly.", "",
                  "| task | half-half r | reliability ρ = R² ceiling | τ ceiling |", "|---|---|---|---|"]
        for t, c in ceil.items():
            if c.get("exact"):
                lines.append(f"| {t} | — | exact | — |")
            elif not c.get("measured"):
                lines.append(f"| {t} | not measured ({c['why']}) | | |")
            else:
                lines.append(f"| {t} | {c['half_r']:.3f} | {c['reliability']:.3f} | {c['tau_ceiling']:.3f} |")
        lines.append("")
    pub = PUBLISHED.get(FLAGS.published)
    if pub and "stats_gbt" in h:
        g = h["stats_gbt"]["test_acc"]
        lines += ["## Calibration against the published figure", "", pub["about"] + ".", "",
                  "| | Kendall τ | R² | max test accuracy |", "|---|---|---|---|",
                  f"| published | {pub['stats_gbt']['kendall_tau']:.3f} | {pub['stats_gbt']['r2']:.4f} | "
                  f"{pub['test_acc_max']:.3f} |",
                  f"| this zoo, stats_gbt | {g['kendall_tau']['mean']:.3f} | {g['r2']['mean']:.4f} | "
                  f"{rng_['max']:.3f} |" if rng_ else "", ""]
        curve = results.get("gbt_curve", {})
        if curve:
            lines += ["stats_gbt fitted on nested subsets of this zoo's training networks (same test split): how the "
                      "figure moves with the number of networks a learner sees (the published one fits on about "
                      "15,000):", "", "| training networks | " + " | ".join(curve) + " |",
                      "|---" * (len(curve) + 1) + "|",
                      "| Kendall τ | " + " | ".join(f"{v['kendall_tau']:.3f}" for v in curve.values()) + " |",
                      "| R² | " + " | ".join(f"{v['r2']:.3f}" for v in curve.values()) + " |", ""]
        mine = results.get("test_acc_percentiles", {})
        if mine:
            pcts = list(pub["test_acc_percentiles"])
            lines += ["Test accuracy percentiles, the released zoo (the bins of google-research/approxNN's config.py) "
                      "and this one:", "", "| percentile | " + " | ".join(str(p) for p in pcts) + " |",
                      "|---" * (len(pcts) + 1) + "|",
                      "| published | " + " | ".join(f"{pub['test_acc_percentiles'][p]:.3f}" for p in pcts) + " |",
                      "| this zoo | " + " | ".join(f"{mine[str(p)]:.3f}" for p in pcts) + " |", ""]
    lines += ["## Targets", "",
              "The learning-from-weights proposal's expected outcomes, on held-out family trees. Test-accuracy "
              f"prediction: Kendall τ at least the statistics baseline's (stats_gbt: per-layer weight statistics, "
              f"gradient-boosted trees, as in Unterthiner et al. 2020) + {MARGIN}, mean ± std over seeds; a "
              "learner that reads only some families is compared with the baseline on the same test networks.", "",
              "| target | " + " | ".join(label(v) for v in variants) + " | label ceiling |",
              "|---" * (len(variants) + 2) + "|"]
    base_tau = h.get("stats_gbt", {}).get("test_acc", {}).get("kendall_tau", {}).get("mean")
    for task, metric, thr in TARGETS:
        cells = []
        for v in variants:
            d = h[v].get(task, {}).get(metric)
            if d is None:
                cells.append("—")
                continue
            if thr is None and v == "stats_gbt":
                cells.append(f"{fmt(d)} (baseline)")
                continue
            if thr is None:
                b = h[v]["test_acc"].get("baseline_tau", {}).get("mean", base_tau)
                ok = b is not None and d["mean"] >= b + MARGIN
                extra = f" vs {b:.3f}" if "baseline_tau" in h[v]["test_acc"] else ""
                cells.append(f"{fmt(d)}{extra} {'✔' if ok else '✘'}")
            else:
                cells.append(f"{fmt(d)} {'✔' if d['mean'] >= thr else '✘'}")
        goal = (f"≥ {thr}" if thr is not None else
                f"≥ stats_gbt + {MARGIN} ({base_tau + MARGIN:.3f})" if base_tau is not None else "> baseline")
        cap = "exact" if task.startswith("data characteristics") else reliability.describe(ceil.get(task), metric)
        lines.append(f"| {task} {metric} {goal} | " + " | ".join(cells) + f" | {cap} |")
    lines.append("| permutation gap ≤ 1e-4 | " + " | ".join(
        f"{h[v]['permutation_gap']['max']:.1e} {'✔' if h[v]['permutation_gap']['max'] <= 1e-4 else '✘'}"
        for v in variants) + " | |")
    if any(label(v) != v for v in variants):
        lines += ["", f"{NOT_WEIGHTS_ONLY} runs each network on learned input probes (its outputs, not only its "
                  "weights, are read): not a weights-only learner."]
    skipped = {t: why for r in (runs[v][s0] for v in variants for s0 in runs[v])
               for t, why in r.get("skipped_tasks", {}).items()}
    if skipped:
        lines += ["", "Tasks skipped: " + "; ".join(f"{t} ({why})" for t, why in skipped.items()) + "."]
    multi = [v for v in probe_configs.MULTI_RESOLUTION if v in h and v.removesuffix("_stats") in h]
    if multi:
        lines += ["", "### Structure, statistics, both (test-accuracy τ, mean ± std over seeds)", "",
                  "| learner | structure only | structure + per-layer statistics | statistics only (stats_mlp) | "
                  "stats_gbt |", "|---|---|---|---|---|"]
        for v in multi:
            b = v.removesuffix("_stats")
            tau = lambda x: fmt(h[x]["test_acc"]["kendall_tau"]) if x in h else "—"  # noqa: E731
            lines.append(f"| {b} | {tau(b)} | {tau(v)} | {tau('stats_mlp')} | {tau('stats_gbt')} |")
    lin = results.get("lineage", {})
    if lin.get("weights_all"):
        mean_dir = lineage.pooled(lin["weights_all"])
        lines += ["", f"Lineage (weights + kurtosis + arborescence, every model, per architecture): directed edges "
                  f"recovered **{mean_dir:.3f}** (architectures pooled; target > 0.75 "
                  f"{'✔' if mean_dir > 0.75 else '✘'})."]
    lines += ["", "## Every task", ""]
    for task in tasks:
        ms = task_metrics(runs[variants[0]][0]["targets"][task])
        lines += [f"### {task} — {runs[variants[0]][0]['targets'][task]['about']}", "",
                  "| learner | " + " | ".join(ms) + " |", "|---" * (len(ms) + 1) + "|"]
        for v in variants:
            lines.append(f"| {label(v)} | " + " | ".join(fmt(h[v][task][m]) for m in ms) + " |")
        if task in ceil:
            lines.append("| *label ceiling* | " + " | ".join(
                reliability.describe(ceil[task], m) if m in ("r2", "kendall_tau", "accuracy") else "" for m in ms)
                + " |")
        lines.append("")
    lines += ["## Per family (test_acc Kendall τ, seed mean)", "", "| learner | " + " | ".join(
        sorted(runs[variants[0]][0]["by_family"])) + " |", "|---" * (1 + len(runs[variants[0]][0]["by_family"])) + "|"]
    for v in variants:
        fams = sorted(runs[v][0]["by_family"])
        lines.append(f"| {label(v)} | " + " | ".join(
            f"{np.mean([r['by_family'][f]['test_acc']['kendall_tau'] for r in runs[v].values()]):.3f}"
            for f in fams) + " |")
    for held, ca in results.get("cross_arch", {}).items():
        lines += ["", f"## Cross-architecture: train on the other families, test on `{held}` (seed 0)", "",
                  "| learner | test_acc τ | test_acc R² | gen_gap R² | disparity R² | data char. acc |",
                  "|---|---|---|---|---|---|"]
        for v, r in ca.items():
            t = r["tasks"]
            dc = np.mean([t[k]["accuracy"] for k in data_lib.DATA_TASKS if k in t])
            lines.append(f"| {label(v)} | {t['test_acc']['kendall_tau']:.3f} | {t['test_acc']['r2']:.3f} | "
                         f"{t['gen_gap']['r2']:.3f} | {t['disparity']['r2']:.3f} | {dc:.3f} |")
    lines += ["", "## Permutation check", "",
              "Each test network vs the same network with hidden neurons randomly permuted (function unchanged); "
              "largest absolute prediction difference over tasks (probabilities for classes, target units for "
              "numbers).",
              "", "| learner | max gap over seeds | networks |", "|---|---|---|"]
    for v in variants:
        lines.append(f"| {label(v)} | {h[v]['permutation_gap']['max']:.2e} | {runs[v][0]['permutation']['networks']} |")
    if lin.get("skipped"):
        lines += ["", "## Lineage", "", f"Not measured: {lin['skipped']}."]
    elif lin:
        lines += ["", "## Lineage", "",
                  "Every model's last checkpoint, per architecture (directed / undirected edges):", "",
                  "| architecture | directed | undirected | edges |", "|---|---|---|---|"]
        for a, s in lin["weights_all"].items():
            lines.append(f"| {a} | {s['directed_edges']:.3f} | {s['undirected_edges']:.3f} | {s['edges']} |")
        if lin.get("test_trees"):
            lines += ["", "Test trees only (seed 0), weight distance vs the learner's embedding distance "
                      "(directed edges recovered, architectures pooled):", "",
                      "| learner | weights | embedding |", "|---|---|---|"]
            for v, res in lin["test_trees"].items():
                w, e = lineage.pooled(res["weights"]), lineage.pooled(res["embedding"])
                lines.append(f"| {label(v)} | {w:.3f} | {e:.3f} |")
    lines += ["", "## Cost (2-core CPU, mean over seeds)", "", "Measured while other runs and tests shared the two "
              f"cores: read them as upper bounds. All runs together: {results['runs_seconds'] / 60:.0f} min of wall "
              "time (each run's own, measured when it ran).", "",
              "| learner | seeds | prepare views s | train s | epochs run | predict one network ms |",
              "|---|---|---|---|---|---|"]
    for v in variants:
        t = h[v]["timing"]
        ep = np.mean([r.get("epochs_run", 0) for r in runs[v].values()])
        lines.append(f"| {label(v)} | {len(runs[v])} | {t['prepare_s']:.1f} | {t['train_s']:.1f} | {ep:.1f} | "
                     f"{t['predict_one_network_ms']:.2f} |")
    lines += ["", "## Training curves (seed 0)", "", "Validation criterion (each task's loss relative to its value "
              "at initialization, weighted) and per task the validation metric, per epoch:", "",
              "![validation criterion](curves.png)", "", "![per task](task_curves.png)", "",
              "![embeddings](embeddings.png)", ""]
    report.write_text(os.path.join(wd, "report.md"), "\n".join(lines))


def plots_for(runs):
    series = {}
    for v in runs:
        hist_file = os.path.join(FLAGS.workdir, "runs", v, "seed_0", "history.json")
        if os.path.exists(hist_file):
            hist = json.load(open(hist_file))
            series[v] = ([x["epoch"] for x in hist], [x["val_loss"] for x in hist])
    if series:
        plots.curves(series, "epoch", "validation criterion", os.path.join(FLAGS.workdir, "curves.png"))
        panels = {}
        for v in series:
            hist = json.load(open(os.path.join(FLAGS.workdir, "runs", v, "seed_0", "history.json")))
            for task, m in hist[0]["val"].items():
                metric = "accuracy" if "accuracy" in m else "kendall_tau"
                panels.setdefault(task, (metric, {}))[1][v] = ([x["epoch"] for x in hist],
                                                              [x["val"][task][metric] for x in hist])
        plots.curve_panels(panels, "epoch", os.path.join(FLAGS.workdir, "task_curves.png"))
    panels = []
    import pandas as pd
    from sklearn.decomposition import PCA
    for v in ("nwpa", "weightnet"):
        d = os.path.join(FLAGS.workdir, "runs", v, "seed_0")
        if not os.path.exists(os.path.join(d, "embeddings.npy")):
            continue
        emb = np.load(os.path.join(d, "embeddings.npy"))
        pred = pd.read_parquet(os.path.join(d, "predictions.parquet"))
        xy = PCA(2, random_state=0).fit_transform(emb)
        panels += [(f"{v}: test accuracy", xy, pred["test_acc/true"].to_numpy(), False),
                   (f"{v}: family", xy, pred["family"].to_numpy(), True)]
    if panels:
        plots.projections(panels, os.path.join(FLAGS.workdir, "embeddings.png"))


def main(argv):
    del argv
    common.start()
    unknown = set(FLAGS.learners) - set(probe_configs.LEARNERS)
    if unknown:
        raise app.UsageError(f"--learners {sorted(unknown)} unknown; known: {probe_configs.LEARNERS}")
    seeds = [int(s) for s in FLAGS.seeds]
    c0 = config(FLAGS.learners[0], 0)
    if "test_acc" not in c0.tasks:
        # The report is built around test accuracy (headline, per-family τ, baselines): refuse before any run.
        raise app.UsageError(f"--config_flags={FLAGS.config_flags!r} leaves test_acc out of the tasks "
                             f"({sorted(c0.tasks)}); the benchmark's report needs it: run other task sets with "
                             "python -m launch.probe, one learner each")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    t0 = time.time()
    ws = data_lib.load(FLAGS.zoo, **c0.data.to_dict())
    ablation_seeds = [int(s) for s in FLAGS.ablation_seeds] or seeds

    def seeds_of(v):
        if v in ABLATIONS or v in probe_configs.MULTI_RESOLUTION:
            return ablation_seeds
        return seeds[:1] if v in FLAGS.single_seed else seeds

    runs = {v: {s: run_one(v, s, ws) for s in seeds_of(v)} for v in FLAGS.learners}
    cross = {held: {v: run_one(v, 0, ws, held) for v in FLAGS.cross_learners} for held in FLAGS.cross_arch if held}
    first = runs[FLAGS.learners[0]][seeds[0]]
    results = {"ceilings": first.get("ceilings", {}), "data": first["data"], "seeds": seeds,
               "headline": headline(runs), "cross_arch": cross, "lineage": lineage_scores(ws, runs), "runs": runs,
               "seconds": round(time.time() - t0, 1)}
    results["runs_seconds"] = runs_seconds()
    if FLAGS.published and "stats_gbt" in FLAGS.learners:
        results["gbt_curve"] = gbt_curve(ws)
    if "test_acc" in ws.rows:
        acc = ws.rows["test_acc"]
        results["test_acc_percentiles"] = {str(p): float(acc.quantile(p / 100)) for p in
                                           (0, 5, 10, 20, 25, 40, 50, 60, 75, 80, 90, 95, 99, 100)}
    report.write_json(os.path.join(FLAGS.workdir, "results.json"), results)
    plots_for(runs)
    write_report(results, runs)
    h = results["headline"]
    line = {"networks": len(ws), "seconds": results["seconds"], "runs_seconds": results["runs_seconds"],
            "reliability": {t: round(c["reliability"], 4) for t, c in first["ceilings"].items() if c.get("measured")}}
    for v in h:
        line[v] = {"arch_acc": round(h[v]["architecture"]["accuracy"]["mean"], 4) if "architecture" in h[v] else None,
                   "test_acc_tau": round(h[v]["test_acc"]["kendall_tau"]["mean"], 4),
                   "gen_gap_r2": round(h[v]["gen_gap"]["r2"]["mean"], 4) if "gen_gap" in h[v] else None,
                   "perm_gap": h[v]["permutation_gap"]["max"]}
    print(json.dumps(line))


if __name__ == "__main__":
    app.run(main)
