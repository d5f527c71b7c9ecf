"""Calibrated probabilities: temperature scaling (Guo et al. 2017) and the calibration
error it is judged by.

A temperature ``T`` divides a model's logits before the softmax (multi-class) or the
sigmoid (multi-label): the predicted class never changes, only how sure the model says it
is. ``T`` is fitted by log-loss on held-out predictions (out-of-fold or validation, never
test). The same rescaling applies to probabilities that are not a softmax of logits (a
vote, a mean of views) through their logarithm, which is what the exported graph does
(:class:`triview.voter_modules.Temperature`).

The expected calibration error (ECE) bins the predictions by confidence (15 equal-width
bins of the top class's probability; multi-label: every label's probability of its
predicted state) and averages |accuracy - confidence| over the bins, weighted by size.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-7
T_RANGE = (0.05, 20.0)
ECE_BINS = 15


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, EPS, 1.0))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by each row's maximum (no overflow)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def scale_logits(logits: np.ndarray, temperature: float, task: str = "multiclass") -> np.ndarray:
    """Probabilities of ``logits / temperature`` (softmax, or sigmoid per label)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return sigmoid(z) if task == "multilabel" else softmax(z)


def scale_probabilities(prob: np.ndarray, temperature: float, task: str = "multiclass") -> np.ndarray:
    """``prob`` rescaled by ``temperature`` through its log (multi-class: the softmax of
    log p / T, which is p itself at T = 1 once normalised) or its logit (multi-label)."""
    if task == "multilabel":
        return sigmoid(_logit(prob) / temperature)
    return softmax(_log(prob) / temperature)


def _nll(z: np.ndarray, y: np.ndarray, task: str) -> float:
    if task == "multilabel":
        p = np.clip(sigmoid(z), EPS, 1 - EPS)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, task: str = "multiclass") -> float:
    """The temperature in [0.05, 20] that minimises the log-loss of ``logits / T`` on
    held-out labels ``y`` (a bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    found = minimize_scalar(lambda log_t: _nll(z / np.exp(log_t), y, task), bounds=(lo, hi),
                            method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def fit_probability_temperature(prob: np.ndarray, y: np.ndarray, task: str = "multiclass") -> float:
    """:func:`fit_temperature` for probabilities (through their log, or logit per label)."""
    return fit_temperature(_logit(prob) if task == "multilabel" else _log(prob), y, task)


def _confidence(y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) per prediction: the top class (multi-class) or every
    label's predicted state (multi-label)."""
    if np.ndim(y) == 2:
        p = np.asarray(prob, dtype=np.float64).ravel()
        truth = np.asarray(y).ravel().astype(bool)
        say_yes = p >= 0.5
        return np.where(say_yes, p, 1 - p), say_yes == truth
    prob = np.asarray(prob, dtype=np.float64)
    return prob.max(axis=1), prob.argmax(axis=1) == np.asarray(y)


def reliability(y: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (equal width on [0, 1]): its range, the predictions in it, their
    mean confidence and their accuracy (empty bins are left out)."""
    confidence, correct = _confidence(y, prob)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for k in range(bins):
        members = which == k
        if members.any():
            out.append({"low": float(edges[k]), "high": float(edges[k + 1]), "count": int(members.sum()),
                        "confidence": float(confidence[members].mean()),
                        "accuracy": float(correct[members].mean())})
    return out


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> float:
    """The size-weighted mean |accuracy - confidence| over the :func:`reliability` bins."""
    table = reliability(y, prob, bins)
    total = sum(b["count"] for b in table)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table) / max(total, 1))
