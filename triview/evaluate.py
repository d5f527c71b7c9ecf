"""Evaluate on the test split: per view and for the ensemble, side by side.

Multi-class (labels: N integers) and multi-label (labels: N x C indicators, scores
thresholded at 0.5) are both scored; the task follows from the shape of the labels.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix, multilabel_confusion_matrix, roc_curve

from triview import artifacts
from triview.artifacts import REPORT_HTML, REPORT_MD
from triview.scoring import accuracy_interval, predicted, roc_auc_per_class, scores, task_of
from triview.storage import atomic_write_text
from triview.temperature import ECE_BINS, expected_calibration_error, reliability
from triview.voter import aligned, apply_voter, correct_of

ROC_POINTS = 101


def micro_roc_curve(y: np.ndarray, prob: np.ndarray, points: int = ROC_POINTS) -> dict[str, list[float]]:
    """The micro-averaged one-vs-rest ROC curve, thinned to at most ``points`` points
    (what the Kubeflow UI's ClassificationMetrics draws)."""
    onehot = y if task_of(y) == "multilabel" else np.eye(prob.shape[1], dtype=np.int64)[y]
    fpr, tpr, thresholds = roc_curve(onehot.ravel(), prob.ravel())
    thresholds = np.clip(thresholds, 0.0, 1.0)  # the first threshold is +inf
    if len(fpr) > points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, points).round().astype(int))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def detail(y: np.ndarray, prob: np.ndarray, classes: list[str], thresholds=None) -> dict:
    """Per-class report, confusion matrix (counts and row-normalised) and ROC-AUC per class."""
    task = task_of(y)
    pred = predicted(prob, task, thresholds)
    labels = list(range(len(classes)))
    report = classification_report(y, pred, labels=labels, target_names=classes,
                                   output_dict=True, zero_division=0)
    if task == "multilabel":  # one 2x2 matrix per label: [[tn, fp], [fn, tp]]
        cm = multilabel_confusion_matrix(y, pred, labels=labels)
        norm = cm / np.maximum(cm.sum(axis=2, keepdims=True), 1)
    else:
        cm = confusion_matrix(y, pred, labels=labels)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    return {"classification_report": report, "confusion_matrix": cm.tolist(),
            "confusion_matrix_normalized": np.round(norm, 6).tolist(),
            "roc_auc_per_class": roc_auc_per_class(y, prob, classes)}


def uncalibrated(preds: dict[str, dict[str, np.ndarray]], split: str, task: str) -> dict[str, np.ndarray]:
    """Every view's probabilities of ``split`` before its temperature (the softmax or
    sigmoid of its logits; a branch without logits: its probabilities), aligned as
    :func:`triview.voter.aligned` aligns them."""
    from triview.temperature import scale_logits

    raw = {}
    for view, p in preds.items():
        order = np.argsort(p[f"{split}_ids"])
        logits = p.get(f"{split}_logits")
        raw[view] = (p[f"{split}_prob"] if logits is None else scale_logits(logits, 1.0, task))[order]
    return raw


def score_all(preds: dict[str, dict[str, np.ndarray]], voter: dict, classes: list[str]) -> dict:
    """Scores of every view and the ensemble on the test split (no files written): the
    headline metrics, the expected calibration error after and before the temperatures
    (``ece``, ``ece_before``: every temperature at 1, the same voter), and how the
    ensemble stands against its best view in test images."""
    probs, y, ids = aligned(preds, "test")
    ensemble = apply_voter(voter, probs)
    task = task_of(y)
    raw = uncalibrated(preds, "test", task)
    raw_ensemble = apply_voter(voter, raw, calibrated=False)
    # multi-label: each view at its own tuned thresholds, the ensemble at the voter's
    cut = {v: preds[v].get("thresholds") for v in probs}
    cut["ensemble"] = voter.get("thresholds")

    def with_ece(calibrated: np.ndarray, before: np.ndarray, thresholds) -> dict:
        return {**scores(y, calibrated, thresholds), "ece": expected_calibration_error(y, calibrated),
                "ece_before": expected_calibration_error(y, before)}

    result = {
        "n_test": int(len(y)),
        "task": task,
        "classes": classes,
        "thresholds": ({k: (None if t is None else np.asarray(t).tolist()) for k, t in cut.items()}
                       if task == "multilabel" else None),
        "views": {v: with_ece(p, raw[v], cut[v]) for v, p in probs.items()},
        "ensemble": {**with_ece(ensemble, raw_ensemble, cut["ensemble"]), "method": voter["name"]},
        "details": {**{v: detail(y, p, classes, cut[v]) for v, p in probs.items()},
                    "ensemble": detail(y, ensemble, classes, cut["ensemble"])},
        "roc_curve": micro_roc_curve(y, ensemble),
        "calibration": {"bins": ECE_BINS, "temperature": voter.get("temperature"),
                        "reliability": {"after": reliability(y, ensemble),
                                        "before": reliability(y, raw_ensemble)}},
    }
    # Kept at the top level for readers of the single-model fields (model card, UI).
    result["confusion_matrix"] = result["details"]["ensemble"]["confusion_matrix"]
    result["classification_report"] = result["details"]["ensemble"]["classification_report"]
    best_view = max(result["views"], key=lambda v: result["views"][v]["macro_f1"])
    result["best_view"] = best_view
    n, accuracy = result["n_test"], result["ensemble"]["accuracy"]
    result["accuracy_interval"] = accuracy_interval(round(accuracy * n), n)
    result["ensemble_gain_macro_f1"] = (result["ensemble"]["macro_f1"]
                                        - result["views"][best_view]["macro_f1"])
    right = {v: correct_of(y, p, cut[v]) for v, p in probs.items()}
    top = max(right, key=lambda v: (int(right[v].sum()), result["views"][v]["macro_f1"]))
    gap = int(correct_of(y, ensemble, cut["ensemble"]).sum()) - int(right[top].sum())
    result["versus_best_view"] = {"view": top, "gap_images": gap, "beats": gap > 0,
                                  "statement": versus_statement(top, gap, len(y))}
    result["_arrays"] = {"ids": ids, "y": y, "ensemble": ensemble, "views": probs}
    return result


def versus_statement(view: str, gap: int, n_test: int) -> str:
    """One sentence on the ensemble against its best single view, in test images."""
    if gap > 0:
        return (f"the ensemble beats its best view ({view}) by {gap} of {n_test} test images")
    if gap == 0:
        return (f"the ensemble does not beat its best view ({view}): the same number of the "
                f"{n_test} test images right")
    return (f"the ensemble does not beat its best view ({view}): {-gap} of {n_test} test images "
            f"fewer right")


def misclassified(result: dict, limit: int = 12) -> list[dict]:
    """The ensemble's most confident mistakes on the test split."""
    arrays, classes = result["_arrays"], result["classes"]
    y, prob, ids = arrays["y"], arrays["ensemble"], arrays["ids"]
    cut = (result.get("thresholds") or {}).get("ensemble")
    pred = predicted(prob, result["task"], cut)
    wrong = np.flatnonzero((pred != y).any(axis=1) if y.ndim == 2 else pred != y)
    confidence = prob[wrong].max(axis=1)
    out = []
    for i in wrong[np.argsort(-confidence, kind="stable")][:limit]:
        if y.ndim == 2:
            true = ", ".join(classes[k] for k in np.flatnonzero(y[i])) or "(none)"
            guess = ", ".join(classes[k] for k in np.flatnonzero(pred[i])) or "(none)"
        else:
            true, guess = classes[int(y[i])], classes[int(pred[i])]
        out.append({"image_id": str(ids[i]), "true": true, "pred": guess,
                    "score": float(prob[i].max())})
    return out


def device_name() -> str:
    """What inference ran on: the GPU's name, else the CPU model."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evaluate(preds: dict[str, dict[str, np.ndarray]], voter: dict, classes: list[str],
             out_dir: str | Path, candidates: pd.DataFrame | None = None, *,
             histories: dict[str, pd.DataFrame] | None = None,
             head_histories: dict[str, pd.DataFrame] | None = None, timing: dict | None = None,
             gradcam: dict[str, list[dict]] | None = None, blessing: dict | None = None,
             crop_reader: Callable[[str, str], np.ndarray] | None = None,
             drift: dict | None = None) -> dict:
    """Score every view and the ensemble on the test split; write eval.json, report.md
    and the self-contained report.html.

    The keyword arguments add report sections: training curves per branch (and of each
    branch's head phase, ``head_histories``), timing
    figures, a Grad-CAM gallery per view, the gate's blessing, the drift against the
    champion's data (:mod:`triview.drift`), and (given
    ``crop_reader(image_id, view) -> RGB``) the misclassified test images.
    """
    from triview import report

    result = score_all(preds, voter, classes)
    arrays = result.pop("_arrays")
    wrong = misclassified({**result, "_arrays": arrays})
    if timing:
        result["timing"] = timing
    if blessing is not None:
        result["blessing"] = blessing
    if drift is not None:
        result["drift"] = drift
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_eval(out, result)
    if crop_reader is not None:
        views = list(result["views"])
        for item in wrong:
            item["crops"] = {v: crop_reader(item["image_id"], v) for v in views}
    sections = report.ReportInputs(result=result, voter=voter, candidates=candidates,
                                   histories=histories or {},
                                   head_histories=head_histories or {}, timing=timing,
                                   misclassified=wrong, gradcam=gradcam or {}, blessing=blessing,
                                   drift=drift)
    atomic_write_text(out / REPORT_MD, report.render_markdown(sections))
    atomic_write_text(out / REPORT_HTML, report.render_html(sections))
    return result
