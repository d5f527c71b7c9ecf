"""Evaluate's metrics and report without training: multi-class and multi-label."""
import json

import numpy as np
import pytest

from triview.evaluate import evaluate, micro_roc_curve
from triview.scoring import scores


def _preds(probs, y, n):
    ids = np.array([f"img{i:04d}" for i in range(n)])
    return {v: {"test_prob": p, "test_ids": ids, "test_labels": y} for v, p in probs.items()}


def test_multiclass_metrics_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    n, c = 120, 4
    y = rng.integers(0, c, n)
    probs = {}
    for v in ("left", "center", "right"):
        logits = rng.normal(0, 1, (n, c))
        logits[np.arange(n), y] += 1.5
        probs[v] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    crops = {}

    def reader(image_id, view):
        crops[(image_id, view)] = True
        return np.full((8, 8, 3), 128, np.uint8)

    result = evaluate(_preds(probs, y, n), {"method": "mean", "views": list(probs), "name": "mean"},
                      list("abcd"), tmp_path, crop_reader=reader)
    for name in ("left", "center", "right", "ensemble"):
        s = result[name] if name == "ensemble" else result["views"][name]
        assert {"accuracy", "macro_f1", "weighted_f1", "roc_auc"} <= set(s)
        d = result["details"][name]
        assert np.array(d["confusion_matrix"]).sum() == n
        assert np.allclose(np.array(d["confusion_matrix_normalized"]).sum(1), 1)
        assert set(d["roc_auc_per_class"]) == set("abcd")
        assert {"macro avg", "weighted avg"} <= set(d["classification_report"])
    roc = result["roc_curve"]
    assert len(roc["fpr"]) <= 101 and roc["fpr"][0] == 0 and roc["tpr"][-1] == 1
    assert all(0 <= t <= 1 for t in roc["thresholds"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["task"] == "multiclass" and "_arrays" not in saved
    html = (tmp_path / "report.html").read_text()
    assert "Misclassified" in html and crops  # the misclassified gallery read crops


def test_multilabel_scores_per_label_and_binary_accuracy(tmp_path):
    rng = np.random.default_rng(1)
    n, c = 150, 3
    y = (rng.random((n, c)) < 0.4).astype(np.int64)
    probs = {v: np.clip(y * 0.6 + rng.random((n, c)) * 0.5, 0, 1) for v in ("top", "center", "bottom")}
    s = scores(y, probs["top"])
    pred = (probs["top"] >= 0.5).astype(int)
    assert s["binary_accuracy"] == pytest.approx((pred == y).mean())
    assert s["accuracy"] == pytest.approx((pred == y).all(1).mean())
    result = evaluate(_preds(probs, y, n), {"method": "mean", "views": list(probs), "name": "mean"},
                      ["cat", "dog", "car"], tmp_path)
    assert result["task"] == "multilabel"
    assert set(result["details"]["ensemble"]["roc_auc_per_class"]) == {"cat", "dog", "car"}
    assert np.array(result["details"]["ensemble"]["confusion_matrix"]).shape == (3, 2, 2)
    assert "binary_accuracy" in result["ensemble"]
    assert micro_roc_curve(y, probs["top"])["tpr"][-1] == 1
    html = (tmp_path / "report.html").read_text()
    assert "<th>tp</th>" in html and "task <code>multilabel</code>" in html


def test_timing_measures_every_branch_and_the_ensemble_at_a_size_scaled_batch():
    import pandas as pd
    import torch

    from triview.timing import ensemble_timing, timing_batch

    # the same pixels per batch as 64 crops at 32 px, never fewer than 8 crops
    assert [timing_batch(s) for s in (24, 32, 64, 224, 512)] == [64, 64, 16, 8, 8]
    calls = []

    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            calls.append(tuple(x.shape))
            return self.conv(x).mean((2, 3))

    class Ensemble(torch.nn.Module):
        def __init__(self, branches):
            super().__init__()
            self.branches = torch.nn.ModuleList(branches)

        def forward(self, *views):
            return sum(b(v) for b, v in zip(self.branches, views))

    branches = {"left": Branch(), "right": Branch()}
    metas = {v: {"config": {"backbone": "tiny"}, "parameters": {"total": 112}} for v in branches}
    histories = {v: pd.DataFrame({"seconds": [2.0, 4.0], "images_per_s": [10.0, 30.0]})
                 for v in branches}
    t = ensemble_timing(branches, Ensemble(list(branches.values())), metas, histories, 64, "cpu")
    assert t["batch"] == 16 and (16, 3, 64, 64) in calls and (1, 3, 64, 64) in calls
    assert not any(shape[0] not in (1, 16) for shape in calls)
    assert t["ensemble_parameters"] == 224 and t["threads"]["batch_1"] == 1
    assert t["ensemble_ms_per_sample"] > 0 and t["ensemble_batched_ms_per_sample"] > 0
    for row in t["branches"].values():
        assert row["epochs"] == 2 and row["seconds_per_epoch"] == 3.0
        assert row["train_images_per_s"] == 20.0 and row["inference_ms_per_sample"] > 0
        assert row["pretrained_weights"].startswith("none")


def test_the_report_a_newcomer_reads(tmp_path):
    """Test metrics first, with the 95 % interval and a warning when the test split is too
    small; no registry said in words (no BLESSED, no table of empty gate rows); every table
    with one header row; the head phase's curves drawn beside the fine-tuning epochs."""
    import base64
    import io
    import re

    import pandas as pd
    from PIL import Image

    from triview.gate import run_gate

    rng = np.random.default_rng(2)
    n, c = 12, 3
    y = np.arange(n) % c
    probs = {v: np.eye(c)[y] * 0.6 + rng.random((n, c)) * 0.3 for v in ("whole", "middle", "inner")}
    probs = {v: p / p.sum(1, keepdims=True) for v, p in probs.items()}
    blessing = run_gate({"macro_f1": 0.9}, tmp_path, registry="")
    assert blessing["comparison"] == "no_registry" and not any(
        "first model" in r for r in blessing["reasons"])
    head = {v: pd.DataFrame({"head_epoch": range(1, 6), "train_loss": np.linspace(1, 0.5, 5),
                             "val_loss": np.linspace(1.1, 0.6, 5),
                             "val_macro_f1": np.linspace(0.5, 0.9, 5)}) for v in probs}
    history = {v: pd.DataFrame({"epoch": [0, 1, 2], "phase": ["head", "finetune", "finetune"],
                                "train_loss": [0.5, 0.4, 0.3], "val_loss": [0.6, 0.5, 0.5],
                                "val_macro_f1": [0.9, 0.85, 0.88]}) for v in probs}
    evaluate(_preds(probs, y, n), {"method": "mean", "views": list(probs), "name": "mean"},
             list("abc"), tmp_path, blessing=blessing, histories=history, head_histories=head)
    html = (tmp_path / "report.html").read_text()
    assert html.index("<h2>Test metrics</h2>") < html.index("<h2>Gate")
    assert "95% interval" in html and "too few to trust" in html
    body = html.split("<body>", 1)[1]
    assert "no champion to compare with" in body and "blessed" not in body.lower()
    assert "<td>None</td>" not in html and "<td>–</td>" not in html.split("<h2>Per class")[0]
    heads = re.findall(r"<thead>(.*?)</thead>", html, re.S)
    assert heads and all(h.count("<tr") == 1 for h in heads), heads
    assert "Head phase (epoch 0): 5 epochs per view" in html and "Fine-tuning: 2 epochs" in html
    uri = re.search(r"alt='training curves' src='data:image/png;base64,([^']+)'", html)[1]
    height = Image.open(io.BytesIO(base64.b64decode(uri))).height
    # two rows of plots (the head phase, fine-tuning) against one for a history alone
    evaluate(_preds(probs, y, n), {"method": "mean", "views": list(probs), "name": "mean"},
             list("abc"), tmp_path / "one", histories=history)
    alone = re.search(r"alt='training curves' src='data:image/png;base64,([^']+)'",
                      (tmp_path / "one" / "report.html").read_text())[1]
    assert height > 1.8 * Image.open(io.BytesIO(base64.b64decode(alone))).height
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Test metrics") < md.index("## Gate") and "no champion to compare" in md
