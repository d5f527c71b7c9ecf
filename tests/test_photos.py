"""Real photos with the default parameters: the 398 ant and bee photos of PyTorch's
transfer-learning tutorial (../shared/data/hymenoptera), through every stage with
nothing but the spec's defaults (ImageNet-pretrained EfficientNet-Lite1 from its PyPI
wheel, the nested views at 224 px, the head on cached features)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from triview import stages

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HYMENOPTERA.is_dir(),
                                 reason="../shared/data/hymenoptera is not beside the repo")]


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    stages.ingest_stage(str(HYMENOPTERA), out / "dataset")
    stages.calibrate_and_crop_stage(out / "dataset", out / "views")
    stages.balance_stage(out / "views", out / "balance")
    stages.augment_stage(out / "views", out / "augmented")
    branches = []
    for index in range(3):
        stages.train_branch_stage(out / "views", out / "augmented", out / "balance", index,
                                  out / f"branch-{index}")
        branches.append(out / f"branch-{index}")
    stages.train_voter_stage(branches, out / "voter")
    record = stages.evaluate_stage(branches, out / "voter", out / "eval", views_dir=out / "views",
                                   gradcam_per_kind=1)
    stages.export_stage(branches, out / "voter", out / "views", out / "eval", out / "model")
    return out, record


def test_the_defaults_learn_real_photos(photo_run):
    out, record = photo_run
    counts = json.loads((out / "dataset" / "stage.json").read_text())["counts"]
    # train/ and val/ are given; the test split is carved from train/
    assert counts["val"] == 153 and counts["train"] + counts["test"] == 245
    # every file is used or quarantined with a reason: only the data set's SOURCE.md is not a photo
    quarantine = (out / "dataset" / "quarantine.csv").read_text().splitlines()
    assert counts["quarantined"] == 1 and quarantine[1].startswith("SOURCE.md,metadata,")
    best_view = max(v["accuracy"] for v in record["views"].values())
    n_test = record["n_test"]
    # the bar (docs/ensemble.md: 0.975 in each of 3 seeds, the views 0.950-0.975)
    assert record["ensemble"]["accuracy"] >= 0.95, record["ensemble"]
    # the ensemble is not below its best view by more than one test image
    assert record["ensemble"]["accuracy"] >= best_view - 1 / n_test - 1e-9
    # calibrated on held-out predictions: test ECE at most 0.05 and lower than before scaling
    # (docs/ensemble.md: 0.107 -> 0.032)
    assert record["ensemble"]["ece"] <= 0.05 < record["ensemble"]["ece_before"], record["ensemble"]


def test_the_model_card_and_the_report_say_where_the_weights_came_from(photo_run):
    out, _ = photo_run
    card = json.loads((out / "model" / "model_card.json").read_text())
    for view, training in card["training"].items():
        weights = training["weights"]
        assert weights["source"] == "package" and weights["file"] == "efficientnet-lite1-77cc7160.pth"
        assert weights["sha256"].startswith("77cc7160") and "Apache-2.0" in weights["licence"]
        assert training["normalization"] == "inception"
    assert "efficientnet-lite1-77cc7160.pth" in (out / "model" / "model_card.md").read_text()
    report = (out / "eval" / "report.html").read_text()
    assert "77cc7160" in report and "efficientnet_lite1" in report
