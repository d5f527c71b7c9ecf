"""A simulated schedule: the real digits arrive in three growing batches, and three runs
share one registry and one cache, as a weekly retrain would (each run crops only its new photos). No image changes split between runs,
every gate decision is taken on test images neither model saw, the registry's champion
history is what the decisions say, and drift is near zero for a batch from the same
distribution and high for a shifted (inverted) batch."""
import json
import shutil
from pathlib import Path

import pytest

from triview import manifest as mf
from triview import stages
from triview.artifacts import read_card, read_seen_images
from triview.registry import ModelRegistry

from conftest import digits_train
from test_drift import write_batch

#: images per class after each week, drawn from the first 60 of each digit in a fixed
#: random order (each week holds the last); the third week's newcomers arrive inverted.
#: At these sizes every class has a val and a test image by its hash alone (no forced
#: move: the one documented case in which a photo's split may change as its class grows)
WEEKS = (25, 35, 45)


def _run(data: Path, work: Path, registry: str, cache: str) -> dict:
    """One scheduled run through every stage, in process (the DAG's tasks, in order)."""
    stages.ingest_stage(str(data), work / "dataset")
    cropped = stages.calibrate_and_crop_stage(work / "dataset", work / "views", layout="horizontal",
                                              image_size=16, cache_root=cache)
    stages.balance_stage(work / "views", work / "balance")
    stages.augment_stage(work / "views", work / "augment", augment_copies=0)
    branches = []
    for view in ("left", "center", "right"):
        stages.train_branch_stage(work / "views", work / "augment", work / "balance", view,
                                  work / view, **digits_train(epochs=2, batch_size=32, seed=0))
        branches.append(work / view)
    stages.train_voter_stage(branches, work / "voter")
    # every challenger passes the comparison (two epochs at 16 px learn little, and which
    # tiny model scores a few hundredths higher is chance): this test is about what the
    # registry, the split and the drift record, and week 3's drift is measured against the
    # images of week 2's champion
    gate = {"registry": registry, "model_name": "digits", "gate_min_delta": -1.0}
    evaluated = stages.evaluate_stage(branches, work / "voter", work / "eval",
                                      views_dir=work / "views", dataset_dir=work / "dataset",
                                      gradcam_per_kind=0, drift_sample=150, **gate)
    exported = stages.export_stage(branches, work / "voter", work / "views", work / "eval",
                                   work / "model", infra_validate="off", **gate)
    return {"manifest": mf.read_manifest(work / "dataset").set_index("original_path"),
            "views": mf.read_views(work / "views"),
            "blessing": json.loads((work / "eval" / "blessing.json").read_text()),
            "evaluate": evaluated, "export": exported, "crop_cache": cropped["cache"]}


@pytest.mark.slow
def test_three_scheduled_runs_on_growing_data_share_one_registry(tmp_path):
    registry = str(tmp_path / "registry")
    reg = ModelRegistry(registry, "digits")
    data = tmp_path / "data"
    runs, promoted = [], []
    for week, per_class in enumerate(WEEKS):
        champion_before = reg.champion()
        seen_by_champion = set()
        if champion_before is not None:
            folder = reg.fetch(champion_before["version"])
            seen_by_champion = read_seen_images(folder, read_card(folder)["data"]["seen_images"]).ids
        if data.exists():
            shutil.rmtree(data)
        write_batch(data, per_class, total=60, invert_after=WEEKS[1] if week == 2 else None)
        run = _run(data, tmp_path / f"week{week}", registry, str(tmp_path / "cache"))
        runs.append(run)
        # the cache across runs: only the photos new this week are cropped
        before = len(runs[-2]["manifest"]) if week else 0
        assert run["crop_cache"] == {"hits": before, "computed": len(run["manifest"]) - before}
        split = json.loads((tmp_path / f"week{week}" / "dataset" / mf.DATASET_FILE).read_text())["split"]
        assert split["forced"] == [] and split["salt"] == "triview-split-v1"

        # every decision is taken on test images neither model trained or validated on
        b, views = run["blessing"], run["views"]
        test_ids = set(views.loc[views["split"] == "test", "image_id"])
        own_seen = set(mf.seen_image_ids(views))
        assert not test_ids & own_seen
        if champion_before is None:
            assert b["comparison"] == "first_run" and b["clean"] is None
        else:
            assert b["comparison"] == "compared", b["reasons"]
            assert not test_ids & seen_by_champion
            assert b["clean"] == {"test_images": len(test_ids), "clean_images": len(test_ids),
                                  "excluded": {}}
            assert b["champion_version"] == champion_before["version"]
        # the registry follows the decision
        if run["export"]["promoted"]:
            assert b["blessed"]
            promoted.append(run["export"]["registry_version"])
        else:
            assert not b["blessed"] and "not blessed" in run["export"]["refused"]
        assert [h["version"] for h in reg.history()] == promoted
        assert reg.champion()["version"] == promoted[-1]

    # no image changed split from one week to the next
    for before, after in zip(runs, runs[1:]):
        common = before["manifest"].index.intersection(after["manifest"].index)
        assert len(common) == len(before["manifest"])
        assert (before["manifest"].loc[common, "split"] == after["manifest"].loc[common, "split"]).all()
    # the promotion log names what each promotion replaced
    history = reg.history()
    assert [h["replaced"] for h in history] == [None] + [h["version"] for h in history[:-1]]
    assert promoted[0] == 1

    # drift: none worth the name for week 2 (same distribution), high for week 3 (inverted)
    same, shifted = runs[1]["evaluate"], runs[2]["evaluate"]
    assert same["drift"]["new_images"] == 100 and shifted["drift"]["new_images"] == 100
    assert same["drift_embedding_auc"] < 0.65 and same["drift_brightness_ks"] < 0.25
    assert shifted["drift_embedding_auc"] > 0.95 and shifted["drift_brightness_ks"] > 0.8
    assert same["drift_class_psi"] < 0.05 and shifted["drift_class_psi"] < 0.05
    assert runs[0]["evaluate"]["drift_measured"] == 0  # nothing to compare the first week with
    report = (tmp_path / "week2" / "eval" / "report.html").read_text()
    assert "Drift against the champion" in report and "two-sample ROC-AUC" in report
    # the champion carries its data profile into the registry, for the next run's drift
    assert (reg.fetch(promoted[-1]) / "drift_profile.json").is_file()
