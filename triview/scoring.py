"""The scoring contract: how probabilities become predictions and numbers, the same for
every branch, voter, evaluation, gate and export.

Multi-class labels are N integers; multi-label labels are N x C 0/1 indicators, scored
at per-label decision thresholds (0.5 unless tuned). The task follows from the labels'
shape. This module owns no files.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

MULTILABEL_THRESHOLD = 0.5


def task_of(y: np.ndarray) -> str:
    return "multilabel" if np.ndim(y) == 2 else "multiclass"


def predicted(prob: np.ndarray, task: str, threshold=None) -> np.ndarray:
    """Predicted classes (N,) for multi-class, 0/1 indicators (N, C) for multi-label
    (``threshold``: one number, or one per label; None: 0.5)."""
    if task != "multilabel":
        return prob.argmax(1)
    cut = MULTILABEL_THRESHOLD if threshold is None else threshold
    return (prob >= np.asarray(cut, dtype=np.float64)).astype(np.int64)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def tune_thresholds(y: np.ndarray, prob: np.ndarray, grid: int = 37) -> np.ndarray:
    """Per-label decision thresholds maximising that label's F1 on (validation) data.

    Candidates are 0.05..0.95 in equal steps; ties go to the candidate nearest 0.5,
    and a label without positives (or without negatives) keeps 0.5.
    """
    candidates = np.linspace(0.05, 0.95, grid)
    order = np.argsort(np.abs(candidates - MULTILABEL_THRESHOLD), kind="stable")
    out = np.full(prob.shape[1], MULTILABEL_THRESHOLD)
    for k in range(prob.shape[1]):
        truth = y[:, k].astype(bool)
        if truth.all() or not truth.any():
            continue
        pred = prob[:, k][None, :] >= candidates[order][:, None]      # (grid, N)
        tp = (pred & truth).sum(1)
        f1 = 2 * tp / np.maximum(pred.sum(1) + truth.sum(), 1)
        out[k] = candidates[order][int(np.argmax(f1))]                 # first max = nearest 0.5
    return out


def roc_auc_per_class(y: np.ndarray, prob: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """One-vs-rest ROC-AUC per class (per label for multi-label); None where the data
    have only one of positive / negative for that class."""
    onehot = y if task_of(y) == "multilabel" else np.eye(prob.shape[1], dtype=np.int64)[y]
    out: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        positives = onehot[:, k]
        out[name] = (float(roc_auc_score(positives, prob[:, k]))
                     if 0 < positives.sum() < len(positives) else None)
    return out


def scores(y: np.ndarray, prob: np.ndarray, thresholds=None) -> dict[str, float | None]:
    """Headline numbers: accuracy (subset accuracy for multi-label), macro- and
    weighted-F1, macro one-vs-rest ROC-AUC, and binary accuracy for multi-label
    (at ``thresholds``, one per label, default 0.5)."""
    task = task_of(y)
    pred = predicted(prob, task, thresholds)
    out = {"accuracy": float(accuracy_score(y, pred)),
           "macro_f1": macro_f1(y, pred),
           "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0))}
    aucs = [a for a in roc_auc_per_class(y, prob, [str(i) for i in range(prob.shape[1])]).values()
            if a is not None]
    out["roc_auc"] = float(np.mean(aucs)) if aucs else None
    if task == "multilabel":
        out["binary_accuracy"] = float((pred == y).mean())
    return out


def mean_log_loss(y: np.ndarray, prob: np.ndarray) -> float:
    """Cross-entropy of ``prob`` against ``y``: multi-class (rows renormalised, as a vote's
    scores and float32 averages may not sum to one exactly) or the mean binary
    cross-entropy over every (image, label)."""
    if task_of(y) == "multilabel":
        return float(log_loss(y.ravel(), prob.ravel(), labels=[0, 1]))
    return float(log_loss(y, prob / prob.sum(1, keepdims=True), labels=np.arange(prob.shape[1])))


def selection_scores(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """What a candidate (an epoch, a voter) is chosen by on validation: accuracy, macro-F1
    (multi-label: at thresholds tuned on these data, the way it will be used) and log-loss."""
    task = task_of(y)
    pred = predicted(prob, task, tune_thresholds(y, prob) if task == "multilabel" else None)
    return {"val_accuracy": float(accuracy_score(y, pred)), "val_macro_f1": macro_f1(y, pred),
            "val_log_loss": mean_log_loss(y, prob)}


#: A test figure whose 95 % interval is wider than this (more than about ±10 points) rests
#: on too few images to be trusted: the console and the report say so.
TRUSTED_INTERVAL_WIDTH = 0.2


def accuracy_interval(correct: int, n: int, confidence: float = 0.95) -> dict:
    """The Wilson score interval of an accuracy of ``correct`` out of ``n`` test images
    (scipy's ``binomtest``): ``{"low", "high", "n", "confidence", "method", "trusted"}``;
    ``trusted`` is False when it is wider than :data:`TRUSTED_INTERVAL_WIDTH`."""
    from scipy.stats import binomtest

    if n <= 0:
        return {"low": 0.0, "high": 1.0, "n": 0, "confidence": confidence, "method": "wilson",
                "trusted": False}
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = float(ci.low), float(ci.high)
    return {"low": round(low, 4), "high": round(high, 4), "n": int(n), "confidence": confidence,
            "method": "wilson", "trusted": high - low <= TRUSTED_INTERVAL_WIDTH}
