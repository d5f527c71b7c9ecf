"""A paired comparison of two models on the same images: the bootstrap distribution of
their macro-F1 difference, its confidence interval and a one-sided p-value.

Both models are scored on each resample of the images (the same resample for both), so
what varies between resamples is which images were drawn, not which model saw which; the
images the two models get equally right or wrong cancel out of the difference. The
macro-F1 of a resample is computed exactly as :func:`triview.scoring.macro_f1` computes it
on the whole set (sklearn's ``f1_score(average="macro", zero_division=0)``: multi-class over
the classes present in the truth or the predictions, multi-label over every label), from
the resample's per-class counts, so the point estimate is the gate's own number.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Resamples of the bootstrap (the p-value's resolution is 1 / (RESAMPLES + 1)).
RESAMPLES = 10_000
_CHUNK = 500


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` in macro-F1 on the same images, with its bootstrap interval and the
    one-sided p-value of the null hypothesis ``a - b <= bound``."""
    delta: float
    low: float
    high: float
    confidence: float
    bound: float
    p_value: float
    images: int
    resamples: int
    seed: int

    def record(self) -> dict:
        return asdict(self)


def _indicators(y: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if np.ndim(y) == 2:  # multi-label: 0/1 indicators already
        return np.asarray(y, np.float64), np.asarray(pred, np.float64)
    eye = np.eye(n_classes)
    return eye[np.asarray(y, np.int64)], eye[np.asarray(pred, np.int64)]


def _macro_f1(counts: np.ndarray, truth: np.ndarray, pred: np.ndarray, multilabel: bool) -> np.ndarray:
    """Macro-F1 of each row of ``counts`` (how often each image is drawn)."""
    tp = counts @ (truth * pred)
    support = counts @ truth + counts @ pred          # 2 tp + fp + fn
    f1 = np.divide(2 * tp, support, out=np.zeros_like(tp), where=support > 0)
    if multilabel:
        return f1.mean(1)
    present = support > 0                              # in the truth or the predictions
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def macro_f1_difference(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *,
                        bound: float = 0.0, confidence: float = 0.95,
                        resamples: int = RESAMPLES, seed: int = 0) -> PairedDifference:
    """Macro-F1 of predictions ``pred_a`` minus that of ``pred_b`` on labels ``y`` (class
    indices, or N x C indicators for multi-label), with the two-sided percentile bootstrap
    interval at ``confidence`` and ``p_value`` = (1 + #resamples whose difference is <=
    ``bound``) / (1 + resamples): the evidence against ``a - b <= bound``."""
    y, pred_a, pred_b = np.asarray(y), np.asarray(pred_a), np.asarray(pred_b)
    n = len(y)
    if n == 0:
        raise ValueError("no images to compare on")
    multilabel = y.ndim == 2
    n_classes = y.shape[1] if multilabel else int(max(y.max(), pred_a.max(), pred_b.max())) + 1
    truth, a = _indicators(y, pred_a, n_classes)
    _, b = _indicators(y, pred_b, n_classes)
    ones = np.ones((1, n))
    delta = float(_macro_f1(ones, truth, a, multilabel)[0] - _macro_f1(ones, truth, b, multilabel)[0])
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        drawn = rng.integers(0, n, size=(rows, n))
        # how often each image is drawn, per resample (one bincount for the whole chunk)
        counts = np.bincount((drawn + n * np.arange(rows)[:, None]).ravel(),
                             minlength=rows * n).reshape(rows, n).astype(np.float64)
        diffs.append(_macro_f1(counts, truth, a, multilabel) - _macro_f1(counts, truth, b, multilabel))
    diffs = np.concatenate(diffs)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    p_value = (1 + int(np.sum(diffs <= bound + 1e-12))) / (1 + resamples)
    return PairedDifference(delta, float(low), float(high), confidence, bound, float(p_value),
                            n, resamples, seed)
