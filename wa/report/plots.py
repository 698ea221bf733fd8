"""PNG figures (matplotlib, Agg backend): small functions, one figure each."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def score_histograms(hists: dict[str, dict], path: str):
    """log10 |score| histograms, one panel per metric, from ``select.heavy_tail``'s ``histogram`` (edges and counts
    of the positive scores, their median and 99th percentile: computed where the scores live)."""
    n = len(hists)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for ax, (m, h) in zip(axes[0], hists.items(), strict=True):
        if not h["counts"]:
            ax.set_title(f"{m} (no positive score)", fontsize=9)
            continue
        ax.stairs(h["counts"], h["log10_edges"], fill=True, color="tab:blue")
        ax.set_yscale("log")
        ax.axvline(h["log10_median"], color="k", ls="--", lw=1, label="median")
        ax.axvline(h["log10_q99"], color="tab:red", ls=":", lw=1, label="top 1%")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("log10 |score|")
    axes[0][0].set_ylabel("weights")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def heatmaps(tables: dict[str, tuple[list, list, np.ndarray]], path: str, title: str):
    """One heatmap per metric: rows, cols, values (log10 colour scale of a positive quantity)."""
    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False)
    for ax, (m, (rows, cols, v)) in zip(axes[0], tables.items(), strict=True):
        with np.errstate(divide="ignore"):
            im = ax.imshow(np.log10(np.where(v > 0, v, np.nan)), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=60, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(m, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def dppl_bars(groups_by_metric: dict[str, dict[str, tuple[float, list]]], path: str, title: str):
    """ΔPPL mean with 95% CI per group (top-k, random-k, bottom-k), grouped by metric."""
    metrics = list(groups_by_metric)
    groups = ["topk", "random_k", "bottom_k"]
    colors = {"topk": "tab:red", "random_k": "tab:gray", "bottom_k": "tab:blue"}
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(metrics), 3.2))
    w = 0.25
    for j, g in enumerate(groups):
        xs, ys, lo, hi = [], [], [], []
        for i, m in enumerate(metrics):
            if g in groups_by_metric[m]:
                mean, ci = groups_by_metric[m][g]
                xs.append(i + (j - 1) * w)
                ys.append(mean)
                lo.append(mean - ci[0])
                hi.append(ci[1] - mean)
        if xs:
            ax.bar(xs, ys, w, yerr=[lo, hi], capsize=3, color=colors[g], label=g)
    ax.set_xticks(range(len(metrics)), metrics, rotation=20, fontsize=8)
    ax.set_ylabel("ΔPPL (mean, 95% CI)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def dose_response(curves: dict[str, dict[str, tuple[list, list]]], path: str, title: str):
    """ΔPPL vs dose; one panel per metric, one line per group."""
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    colors = {"topk": "tab:red", "random_k": "tab:gray", "bottom_k": "tab:blue"}
    for ax, (m, lines) in zip(axes[0], curves.items(), strict=True):
        for g, (xs, ys) in lines.items():
            ax.plot(xs, ys, "o-", color=colors.get(g), label=g)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("dose (perturb_scale)")
        ax.set_title(m, fontsize=9)
    axes[0][0].set_ylabel("ΔPPL")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def matrix(labels: list[str], values, path: str, title: str):
    v = np.asarray(values, np.float64)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(labels), 1.2 + 0.4 * len(labels)))
    im = ax.imshow(v, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    if len(labels) <= 16:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{v[i, j]:.2f}", ha="center", va="center", fontsize=5,
                        color="w" if v[i, j] < 0.5 else "k")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def training_curve(steps, loss, val_steps, val_loss, path: str):
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, loss, lw=1, label="train (batch)")
    ax.plot(val_steps, val_loss, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    return _save(fig, path)


def scaling(n_params, series: dict[str, list], path: str):
    """One log-log panel per quantity against the parameter count."""
    fig, axes = plt.subplots(1, len(series), figsize=(3.4 * len(series), 3), squeeze=False)
    for ax, (name, ys) in zip(axes[0], series.items(), strict=True):
        ax.loglog(n_params, ys, "o-")
        ax.set_xlabel("parameters")
        ax.set_title(name, fontsize=9)
    return _save(fig, path)


def distributions(left: dict[str, np.ndarray], right: dict[str, np.ndarray], path: str,
                  titles=("final test accuracy", "generalization gap")):
    """Two panels of overlaid per-group histograms."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, data, title in zip(axes, (left, right), titles, strict=True):
        for name, x in data.items():
            ax.hist(np.asarray(x, np.float64), bins=30, alpha=0.5, label=f"{name} ({len(x)})")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("models")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def scatter_by_group(groups: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, ylabel: str, path: str):
    fig, ax = plt.subplots(figsize=(4, 3.4))
    for name, (x, y) in groups.items():
        ax.scatter(x, y, s=5, alpha=0.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _save(fig, path)


def curves(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, path: str):
    fig, ax = plt.subplots(figsize=(4, 3))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _save(fig, path)


def curve_panels(panels: dict[str, tuple[str, dict[str, tuple[list, list]]]], xlabel: str, path: str, cols: int = 3,
                 marker: str | None = None, logx: bool = False, logy: bool = False, variant: str | None = None):
    """One small plot per panel: title → (y label, {series: (x, y)}); ``marker`` also marks each point; a series
    named "<name><variant>" (``variant`` e.g. "+owl") is drawn dashed in <name>'s colour."""
    n = len(panels)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    bases = list(dict.fromkeys(k.removesuffix(variant) if variant else k for _, sr in panels.values() for k in sr))
    cmap = plt.get_cmap("tab10" if len(bases) <= 10 else "tab20")
    colour = {b: cmap(i % cmap.N) for i, b in enumerate(bases)}
    for ax, (title, (ylabel, series)) in zip(axes.ravel(), panels.items(), strict=False):
        for name, (x, y) in series.items():
            base = name.removesuffix(variant) if variant else name
            ax.plot(x, y, label=name, lw=1, marker=marker, ms=3, color=colour[base],
                    ls="--" if variant and name != base else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6)
    return _save(fig, path)


def projections(panels: list[tuple[str, np.ndarray, np.ndarray, bool]], path: str):
    """2-D points per panel (title, xy [n, 2], colour values [n], categorical?)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.3), squeeze=False)
    for ax, (title, xy, c, categorical) in zip(axes[0], panels, strict=True):
        if categorical:
            for name in sorted(set(c.tolist())):
                m = c == name
                ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, label=str(name))
            ax.legend(fontsize=6, markerscale=2)
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=6, c=np.asarray(c, np.float64), cmap="viridis")
            fig.colorbar(sc, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
