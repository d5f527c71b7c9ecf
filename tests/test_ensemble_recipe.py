"""The photo recipe's honesty and what it promises, on the digits fixture (conftest's
``head_only`` chain): out-of-fold voter inputs over train + validation, a voter and
temperatures that never see test labels, test-time augmentation and calibration inside
the exported model, the ensemble's calibration error and its standing against its best
view reported."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import HEAD_ONLY_TRAIN
from triview import temperature as tp
from triview.artifacts import load_predictions, read_branch_meta, write_predictions

VIEWS = ("left", "center", "right")


def _split_ids(cropped: Path, split: str) -> set[str]:
    table = pd.read_csv(cropped / "views.csv", dtype={"image_id": str})
    return set(table.loc[(table["split"] == split) & (table["augmented"] == 0), "image_id"])


def test_head_only_branches_predict_every_train_and_val_image_out_of_fold(head_only, cropped):
    pool = _split_ids(cropped, "train") | _split_ids(cropped, "val")
    for view in VIEWS:
        preds = load_predictions(head_only[view])
        meta = read_branch_meta(head_only[view])
        assert set(preds["oof_ids"]) == pool and len(preds["oof_ids"]) == len(pool)
        assert not set(preds["oof_ids"]) & _split_ids(cropped, "test")
        # the validation images' predictions are their out-of-fold ones
        row = {i: k for k, i in enumerate(preds["oof_ids"])}
        rows = [row[i] for i in preds["val_ids"]]
        assert np.allclose(preds["val_logits"], preds["oof_logits"][rows])
        # the branch's temperature is the one of its out-of-fold logits
        assert meta["temperature"] == pytest.approx(
            tp.fit_temperature(preds["oof_logits"], preds["oof_labels"]), rel=1e-6)
        assert np.allclose(preds["test_prob"], tp.scale_logits(preds["test_logits"], meta["temperature"]))
        assert meta["tta"] == ["identity", "flip"] and meta["scored_on"].startswith("out-of-fold")
        history = pd.read_csv(head_only[view] / "history.csv")
        assert history["chosen"].sum() == 1 and history["phase"].eq("head").all()


def test_the_voter_is_fitted_and_chosen_without_test_labels(head_only, cropped, tmp_path):
    """Scrambling every branch's test labels and probabilities changes nothing the voter
    stage writes: it is fitted and chosen on the out-of-fold train + val images only."""
    from triview.stages import train_voter_stage

    voter = json.loads((head_only["voter"] / "voter.json").read_text())
    pool = _split_ids(cropped, "train") | _split_ids(cropped, "val")
    assert voter["n_scored"] == len(pool) and voter["scored_on"].startswith("out-of-fold")
    rng = np.random.default_rng(0)
    scrambled = []
    for view in VIEWS:
        d = tmp_path / view
        shutil.copytree(head_only[view], d)
        arrays = load_predictions(d)
        n = len(arrays["test_labels"])
        arrays["test_labels"] = rng.integers(0, 10, n)
        arrays["test_prob"] = rng.dirichlet(np.ones(10), n)
        arrays["test_logits"] = rng.normal(size=(n, 10))
        write_predictions(d, arrays)
        scrambled.append(d)
    train_voter_stage(scrambled, tmp_path / "voter", seed=0)
    assert json.loads((tmp_path / "voter" / "voter.json").read_text()) == voter
    assert (tmp_path / "voter" / "candidates.csv").read_text() == \
        (head_only["voter"] / "candidates.csv").read_text()


def test_the_temperature_is_never_fitted_on_test(cropped, augmented, balanced, head_only, tmp_path):
    """A branch trained on views whose test labels are shuffled has the same temperature,
    head and held-out predictions: test labels reach only its test predictions' labels."""
    from triview.stages import train_branch_stage

    views = tmp_path / "views"
    shutil.copytree(cropped, views)
    table = pd.read_csv(views / "views.csv", dtype={"image_id": str})
    test = table["split"] == "test"
    table.loc[test, "label"] = np.random.default_rng(1).permutation(table.loc[test, "label"].to_numpy())
    table.to_csv(views / "views.csv", index=False)
    train_branch_stage(views, augmented, balanced, "center", tmp_path / "center", **HEAD_ONLY_TRAIN)
    ours, theirs = read_branch_meta(tmp_path / "center"), read_branch_meta(head_only["center"])
    assert ours["temperature"] == theirs["temperature"]
    a, b = load_predictions(tmp_path / "center"), load_predictions(head_only["center"])
    assert np.array_equal(a["oof_logits"], b["oof_logits"]) and np.array_equal(a["test_logits"], b["test_logits"])
    assert not np.array_equal(a["test_labels"], b["test_labels"])


def _test_crops(cropped: Path) -> tuple[list[np.ndarray], list[str]]:
    from triview.train.data import load_split

    test = load_split(cropped, list(VIEWS), "test")
    return [x.numpy() for x in test.inputs], test.image_ids


def test_test_time_augmentation_and_temperatures_are_inside_the_exported_model(head_only, cropped):
    """The ONNX model answers what evaluate scored (TTA and temperatures included), and
    with flip TTA a mirrored input gets the same answer."""
    from triview.runtime import load_runtime
    from triview.voter import aligned, apply_voter

    run, card = load_runtime(head_only["model"])
    assert card["tta"] == {v: ["identity", "flip"] for v in VIEWS}
    assert card["calibration"]["ensemble_temperature"] is not None
    inputs, ids = _test_crops(cropped)
    out = run(inputs)
    probs, _, eval_ids = aligned({v: load_predictions(head_only[v]) for v in VIEWS}, "test")
    row = {i: k for k, i in enumerate(eval_ids)}
    voter = json.loads((head_only["voter"] / "voter.json").read_text())
    evaluated = apply_voter(voter, probs)[[row[i] for i in ids]]
    assert np.abs(out - evaluated).max() < 1e-3 and card["evaluated_max_abs_diff"] < 1e-3
    mirrored = run([np.ascontiguousarray(x[:, :, :, ::-1]) for x in inputs])
    assert np.abs(mirrored - out).max() < 1e-4


def test_an_export_without_the_branches_test_time_augmentation_is_refused(head_only, cropped,
                                                                        tmp_path, monkeypatch):
    """If export rebuilt the branches without their TTA, its answers would differ from what
    evaluate scored: the export fails instead of writing that model."""
    import triview.train as train
    from triview.models import ServedBranch
    from triview.stages import export_stage

    real = train.load_served_branch

    def without_tta(folder):
        served, meta = real(folder)
        return ServedBranch(served.net, ("identity",), served.temperature), meta

    monkeypatch.setattr(train, "load_served_branch", without_tta)
    branches = [head_only[v] for v in VIEWS]
    with pytest.raises(RuntimeError, match="answers differently from what evaluate scored"):
        export_stage(branches, head_only["voter"], cropped, head_only["eval"], tmp_path / "model",
                     infra_validate="off")
    assert not (tmp_path / "model" / "ensemble.onnx").exists()


def test_calibration_and_the_best_view_gap_reach_eval_report_card(head_only):
    result = json.loads((head_only["eval"] / "eval.json").read_text())
    ens = result["ensemble"]
    assert 0 <= ens["ece"] <= 1 and 0 <= ens["ece_before"] <= 1
    assert {b["count"] for b in result["calibration"]["reliability"]["after"]} and \
        sum(b["count"] for b in result["calibration"]["reliability"]["after"]) == result["n_test"]
    versus = result["versus_best_view"]
    views = result["views"]
    best = max(views.values(), key=lambda s: s["accuracy"])["accuracy"]
    assert versus["gap_images"] == round((ens["accuracy"] - best) * result["n_test"])
    assert (versus["gap_images"] > 0) == versus["beats"]
    assert versus["view"] in VIEWS and str(abs(versus["gap_images"])) in versus["statement"] or \
        versus["gap_images"] == 0
    html = (head_only["eval"] / "report.html").read_text()
    assert "<h2>Calibration</h2>" in html and "alt='reliability diagram'" in html
    assert versus["statement"][1:] in html
    card = json.loads((head_only["model"] / "model_card.json").read_text())
    assert card["calibration"]["ece"] == pytest.approx(ens["ece"])
    assert "## Calibration" in (head_only["model"] / "model_card.md").read_text()


def test_run_summary_and_console_carry_the_calibration_and_the_best_view_gap(head_only, ingested,
                                                                             tmp_path):
    """run_summary.json's ``ensemble.ece`` and ``ensemble.ece_before`` are evaluate's, and
    the console's last lines say them and how the ensemble stands against its best view."""
    from triview.summary import build_summary, format_summary

    run = tmp_path / "run"
    for name, folder in (("ingest", ingested), ("eval", head_only["eval"]),
                         ("model", head_only["model"])):
        shutil.copytree(folder, run / name)
    summary = build_summary(run, run / "model", run / "eval" / "report.html")
    result = json.loads((head_only["eval"] / "eval.json").read_text())
    assert summary["ensemble"]["ece"] == pytest.approx(result["ensemble"]["ece"])
    assert summary["ensemble"]["ece_before"] == pytest.approx(result["ensemble"]["ece_before"])
    last = format_summary(summary).splitlines()[-2:]
    assert last[0] == (f"calibration: ensemble ECE {result['ensemble']['ece']:.3f} after temperature "
                       f"scaling ({result['ensemble']['ece_before']:.3f} before)")
    assert last[1] == result["versus_best_view"]["statement"]
    # the voter's line says what it was chosen on
    from pipelines.console import describe_stage

    voter = json.loads((head_only["voter"] / "stage.json").read_text())
    assert f"on {voter['n_scored']} held-out images (out-of-fold" in describe_stage(voter)


def test_the_cross_fitted_head_phase_fills_and_reads_the_feature_store(cropped, augmented,
                                                                        balanced, tmp_path):
    """With a feature cache (what `triview tune` gives every trial) the cross-fitted head
    phase stores its passes' features, and a second training of the same backbone and crops
    reads them: the store does not grow and the branch's predictions are the same."""
    from triview.stages import train_branch_stage

    cache = tmp_path / "features"
    train_branch_stage(cropped, augmented, balanced, "left", tmp_path / "a",
                       feature_cache=cache, **HEAD_ONLY_TRAIN)
    shards = sorted(cache.rglob("*.npz"))
    assert shards  # identity, flip and the augmented pass of train + val, the test crops
    train_branch_stage(cropped, augmented, balanced, "left", tmp_path / "b",
                       feature_cache=cache, **HEAD_ONLY_TRAIN)
    assert sorted(cache.rglob("*.npz")) == shards
    a, b = load_predictions(tmp_path / "a"), load_predictions(tmp_path / "b")
    for key in ("val_logits", "test_logits", "oof_logits"):
        assert np.allclose(a[key], b[key], atol=1e-5)
