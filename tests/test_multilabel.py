"""Multi-label end to end: a CSV of real digit images with several labels each goes
through ingest, crop, balance, train-branch (sigmoid BCE with pos_weight), the voter,
evaluate (per-label thresholds, binary accuracy, ROC-AUC per label), export and
predict."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import digits_train
import torch

from triview import evaluate as ev
from triview import scoring
from triview import voter as vt
from triview.train.loss import MultiLabelLoss

#: digits with a closed loop
ROUND = {0, 6, 8, 9}


def digit_labels(d: int) -> list[str]:
    """Parity, size and (for some) "round": 2 or 3 labels per image, "round" the rare one."""
    labels = ["even" if d % 2 == 0 else "odd", "small" if d < 5 else "large"]
    return labels + (["round"] if d in ROUND else [])


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    from triview import stages
    from triview.demo import write_digits

    root = tmp_path_factory.mktemp("ml")
    write_digits(root / "photos", per_class=30)
    rows = [(str(p.relative_to(root)), ";".join(digit_labels(int(p.parent.name))))
            for p in sorted((root / "photos").rglob("*.jpg"))]
    pd.DataFrame(rows, columns=["path", "labels"]).to_csv(root / "labels.csv", index=False)
    out = root / "run"
    stages.ingest_stage(str(root / "labels.csv"), out / "dataset")
    stages.calibrate_and_crop_stage(out / "dataset", out / "views", layout="horizontal",
                                    image_size=32)
    stages.balance_stage(out / "views", out / "balance")
    branches = []
    for view in ("left", "center", "right"):
        rec = stages.train_branch_stage(out / "views", None, out / "balance", view,
                                        out / f"branch-{view}", **digits_train(epochs=4, batch_size=32, seed=0))
        branches.append(out / f"branch-{view}")
        assert rec["task"] == "multilabel"
    stages.train_voter_stage(branches, out / "voter", seed=0)
    stages.evaluate_stage(branches, out / "voter", out / "eval", views_dir=out / "views",
                          gradcam_per_kind=1)
    stages.export_stage(branches, out / "voter", out / "views", out / "eval", out / "export")
    return root, out, branches


def test_branches_train_with_bce_and_tuned_thresholds(multilabel_run):
    root, out, branches = multilabel_run
    classes = json.loads((out / "views" / "classes.json").read_text())["classes"]
    assert sorted(classes) == ["even", "large", "odd", "round", "small"]
    for folder in branches:
        meta = json.loads((folder / "model.json").read_text())
        assert meta["task"] == "multilabel" and len(meta["thresholds"]) == 5
        assert all(0.05 <= t <= 0.95 for t in meta["thresholds"])
        history = pd.read_csv(folder / "history.csv")
        assert "val_binary_accuracy" in history
        preds = np.load(folder / "predictions.npz")
        assert preds["val_labels"].shape[1] == 5 and set(np.unique(preds["val_labels"])) == {0, 1}
        # sigmoid outputs: independent per label, rows do not sum to 1
        assert not np.allclose(preds["test_prob"].sum(1), 1.0)
        assert np.all((preds["test_prob"] >= 0) & (preds["test_prob"] <= 1))
    balance = json.loads((out / "balance" / "balance.json").read_text())
    pos_weight = balance["labels"]["pos_weight"]
    assert pos_weight["round"] > pos_weight["even"]  # the rarer label weighs more


def test_evaluation_reports_multilabel_metrics(multilabel_run):
    _, out, _ = multilabel_run
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["task"] == "multilabel"
    ens = result["ensemble"]
    assert {"binary_accuracy", "macro_f1", "roc_auc", "accuracy"} <= set(ens)
    # real learning on real images: well above chance on every label
    assert ens["binary_accuracy"] > 0.75 and ens["roc_auc"] > 0.8
    aucs = result["details"]["ensemble"]["roc_auc_per_class"]
    assert set(aucs) == {"even", "large", "odd", "round", "small"}
    assert len(result["thresholds"]["ensemble"]) == 5
    voter = json.loads((out / "voter" / "voter.json").read_text())
    assert voter["task"] == "multilabel" and len(voter["thresholds"]) == 5
    candidates = pd.read_csv(out / "voter" / "candidates.csv")
    assert {"mean", "geomean", "vote", "weighted", "mlp"} <= set(candidates["candidate"])
    assert "logistic" not in set(candidates["candidate"])


def test_export_and_predict_use_the_tuned_thresholds(multilabel_run):
    root, out, _ = multilabel_run
    model = out / "export"
    card = json.loads((model / "model_card.json").read_text())
    assert card["task"] == "multilabel" and len(card["thresholds"]) == 5
    stage = json.loads((out / "export" / "stage.json").read_text())
    assert stage["onnx_max_abs_diff"] < 1e-4
    images = sorted((root / "photos" / "8").glob("*.jpg"))[:3]
    run = subprocess.run([sys.executable, "-m", "triview.cli", "predict", "--model", str(model),
                          *map(str, images), "--format", "json"],
                         capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3
    cut = dict(zip(card["classes"], card["thresholds"]))
    for row in rows:
        assert row["labels"], row  # every label listed clears its own tuned threshold
        assert all(item["score"] >= cut[item["label"]] for item in row["labels"])


def test_predict_cuts_each_label_at_its_own_threshold_on_both_sides_of_one_half(multilabel_run,
                                                                                  tmp_path):
    """With a label's tuned threshold above 0.5 and a score between the two, predict leaves
    the label out; with one below 0.5 and a score between, it lists it (a predict that
    cut at 0.5 fails both)."""
    import shutil

    from triview.predict import Predictor

    root, out, _ = multilabel_run
    images = [str(p) for p in sorted((root / "photos").rglob("*.jpg"))[::25]]
    scores = np.array([[s for _, s in sorted(r.labels)]  # every label, by name
                       for r in Predictor(str(out / "export")).predict(images, threshold=0.0)])
    card = json.loads((out / "export" / "model_card.json").read_text())
    names = sorted(card["classes"])
    hi = np.argwhere((scores > 0.55) & (scores < 0.99))[0]   # (image, label) above 0.5
    lo = np.argwhere((scores > 0.01) & (scores < 0.45))
    lo = next(x for x in lo if x[1] != hi[1])                   # another label below 0.5
    cuts = dict(zip(card["classes"], card["thresholds"]))
    cuts[names[hi[1]]] = (scores[tuple(hi)] + 1) / 2            # > score > 0.5
    cuts[names[lo[1]]] = scores[tuple(lo)] / 2                  # < score < 0.5
    model = tmp_path / "model"
    shutil.copytree(out / "export", model)
    (model / "model_card.json").write_text(json.dumps({**card, "thresholds": [cuts[c] for c in
                                                                              card["classes"]]}))
    run = subprocess.run([sys.executable, "-m", "triview.cli", "predict", "--model", str(model),
                          images[hi[0]], images[lo[0]], "--format", "json"],
                         capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    listed = [{item["label"] for item in row["labels"]} for row in rows]
    assert names[hi[1]] not in listed[0]
    assert names[lo[1]] in listed[1]


def test_multilabel_loss_is_weighted_bce():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 0.3, 1.5]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    pos_weight = torch.tensor([1.0, 3.0, 0.5])
    ours = MultiLabelLoss(pos_weight, smoothing=0.0)(logits, target)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, target)
    assert torch.allclose(ours, ref)
    smoothed = MultiLabelLoss(pos_weight, smoothing=0.2)(logits, target)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, target * 0.8 + 0.1)
    assert torch.allclose(smoothed, ref)


def test_thresholds_are_tuned_per_label():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 3)) < [0.5, 0.2, 0.0]).astype(int)
    prob = np.clip(0.25 * y + rng.random((400, 3)) * 0.5, 0, 1)  # positives score 0.25 higher
    prob[:, 0] = np.where(y[:, 0] == 1, 0.3, 0.1)                 # label 0 separable at 0.2
    cut = scoring.tune_thresholds(y, prob)
    assert 0.1 < cut[0] <= 0.3
    f1_tuned = scoring.scores(y[:, :2], prob[:, :2], cut[:2])["macro_f1"]
    assert f1_tuned > scoring.scores(y[:, :2], prob[:, :2])["macro_f1"]
    assert cut[2] == 0.5  # no positives: left at 0.5


def test_the_chosen_multilabel_voter_exports_to_the_same_numbers():
    rng = np.random.default_rng(1)
    y = (rng.random((120, 4)) < 0.4).astype(int)
    probs = {v: np.clip(0.6 * y + 0.4 * rng.random((120, 4)), 0.01, 0.99) for v in ("a", "b", "c")}
    voter, table = vt.fit_voter(probs, y, 4, seed=0)
    assert voter["task"] == "multilabel" and len(voter["thresholds"]) == 4
    assert "logistic" not in set(table["candidate"])  # multi-class only
    module = vt.get_method(voter["method"]).module(voter["params"], 3, 4, "multilabel")
    torch_out = module([torch.tensor(probs[v], dtype=torch.float32) for v in voter["views"]])
    # the method's module is the voter alone; the export puts the ensemble's temperature after it
    assert np.allclose(torch_out.detach().numpy(), vt.apply_voter(voter, probs, calibrated=False),
                       atol=1e-5)
