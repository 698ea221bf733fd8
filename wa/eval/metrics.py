"""Scores for predictions about networks: classes (accuracy, macro precision/recall/F1) and numbers (MAE,
RMSE, R², Spearman ρ, Kendall τ), computed by scikit-learn and scipy."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def classification(y_true, y_pred, score=None) -> dict[str, float]:
    """``score``: for two classes, how strongly each prediction says class 1; adds the AUROC where the truth holds
    both classes (it is undefined otherwise)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    out = {"accuracy": float(skm.accuracy_score(y_true, y_pred)), "precision": float(p), "recall": float(r),
           "f1": float(f), "n": int(len(y_true))}
    if score is not None and len(np.unique(y_true)) == 2:
        out["auroc"] = float(skm.roc_auc_score(y_true, score))
    return out


def regression(y_true, y_pred) -> dict[str, float]:
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    constant = np.ptp(y_pred) == 0 or np.ptp(y_true) == 0
    return {"mae": float(skm.mean_absolute_error(y_true, y_pred)),
            "rmse": float(np.sqrt(skm.mean_squared_error(y_true, y_pred))),
            "r2": float(skm.r2_score(y_true, y_pred)),
            # Rank correlations are undefined for a constant vector; report 0 (no ranking skill) not NaN.
            "spearman": 0.0 if constant else float(stats.spearmanr(y_true, y_pred).statistic),
            "kendall_tau": 0.0 if constant else float(stats.kendalltau(y_true, y_pred).statistic),
            "n": int(len(y_true))}
