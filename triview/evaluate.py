"""Evaluate on the test split: per view and for the ensemble, side by side."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix,  # noqa: E402
                             f1_score)

from triview.storage import atomic_write_text  # noqa: E402
from triview.voter import aligned, apply_voter  # noqa: E402

EVAL_FILE = "eval.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def scores(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    pred = prob.argmax(1)
    return {"accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}


def _confusion_png(cm: np.ndarray, classes: list[str], title: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=90)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > cm.max() / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def evaluate(preds: dict[str, dict[str, np.ndarray]], voter: dict, classes: list[str],
             out_dir: str | Path, candidates: pd.DataFrame | None = None) -> dict:
    """Score every view and the ensemble on the test split; write eval.json and reports."""
    probs, y, _ = aligned(preds, "test")
    ensemble = apply_voter(voter, probs)
    result = {
        "n_test": int(len(y)),
        "classes": classes,
        "views": {v: scores(y, p) for v, p in probs.items()},
        "ensemble": {**scores(y, ensemble), "method": voter["name"]},
    }
    labels = list(range(len(classes)))
    cm = confusion_matrix(y, ensemble.argmax(1), labels=labels)
    result["confusion_matrix"] = cm.tolist()
    result["classification_report"] = classification_report(
        y, ensemble.argmax(1), labels=labels, target_names=classes, output_dict=True, zero_division=0)
    best_view = max(result["views"], key=lambda v: result["views"][v]["macro_f1"])
    result["best_view"] = best_view
    result["ensemble_gain_macro_f1"] = (result["ensemble"]["macro_f1"]
                                        - result["views"][best_view]["macro_f1"])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / EVAL_FILE, json.dumps(result, indent=2))
    table = pd.DataFrame({**{v: s for v, s in result["views"].items()},
                          "ensemble": {k: result["ensemble"][k] for k in ("accuracy", "macro_f1")}}).T
    table.index.name = "model"
    report = pd.DataFrame(result["classification_report"]).T
    md = [f"# triview evaluation ({len(y)} test images)", "",
          f"Ensemble method: `{voter['name']}`; best single view: `{best_view}`; "
          f"ensemble gain in macro-F1: {result['ensemble_gain_macro_f1']:+.4f}", "",
          "## Test metrics", "", table.round(4).to_markdown(),
          "", "## Per class (ensemble)", "",
          report.round(4).to_markdown()]
    if candidates is not None:
        md += ["", "## Voter candidates (validation)", "",
               candidates.round(4).to_markdown(index=False)]
    atomic_write_text(out / REPORT_MD, "\n".join(md) + "\n")
    png = _confusion_png(cm, classes, f"ensemble ({voter['name']})")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>triview evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>",
        f"<h1>triview evaluation</h1><p>{len(y)} test images. Ensemble method "
        f"<code>{html.escape(voter['name'])}</code>; best single view <code>{html.escape(best_view)}</code>; "
        f"ensemble gain in macro-F1 {result['ensemble_gain_macro_f1']:+.4f}.</p>",
        "<h2>Test metrics</h2>", table.round(4).to_html(),
        "<h2>Per class (ensemble)</h2>", report.round(4).to_html(),
    ]
    if candidates is not None:
        parts += ["<h2>Voter candidates (validation)</h2>", candidates.round(4).to_html(index=False)]
    parts += ["<h2>Confusion matrix (ensemble)</h2>",
              f"<img alt='confusion matrix' src='data:image/png;base64,{png}'>", "</body></html>"]
    atomic_write_text(out / REPORT_HTML, "\n".join(parts))
    return result

