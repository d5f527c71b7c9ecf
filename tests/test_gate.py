"""The champion/challenger gate: first run, blessed, not blessed, incomparable champion,
and export refusing to promote an unblessed model."""
import hashlib
import json
import shutil

import numpy as np
import pytest

from triview import manifest as mf
from triview import metrics
from triview.gate import GateConfig, comparability, decide, run_gate
from triview.registry import ModelRegistry
from triview.stages import evaluate_stage, export_stage


def test_first_run_is_blessed_when_the_absolute_bar_holds():
    b = decide({"macro_f1": 0.8}, None, GateConfig(min_value=0.7))
    assert b["blessed"] and b["comparison"] == "first_run"
    assert any("first model" in r for r in b["reasons"])


def test_first_run_below_the_absolute_bar_is_not_blessed():
    b = decide({"macro_f1": 0.6}, None, GateConfig(min_value=0.7))
    assert not b["blessed"] and "below the absolute bar" in b["reasons"][0]


def test_tolerated_regression_and_required_improvement():
    champion = {"macro_f1": 0.80}
    assert decide({"macro_f1": 0.795}, champion, GateConfig(min_delta=-0.01), champion_version=3)["blessed"]
    worse = decide({"macro_f1": 0.78}, champion, GateConfig(min_delta=-0.01), champion_version=3)
    assert not worse["blessed"] and "change -0.0200 < -0.0100" in worse["reasons"][-1]
    assert worse["champion_version"] == 3 and worse["delta"] == pytest.approx(-0.02)
    assert not decide({"macro_f1": 0.81}, champion, GateConfig(min_delta=0.02))["blessed"]
    assert decide({"macro_f1": 0.83}, champion, GateConfig(min_delta=0.02))["blessed"]
    # the absolute bar holds even when the champion is beaten
    assert not decide({"macro_f1": 0.5}, {"macro_f1": 0.1}, GateConfig(min_value=0.6))["blessed"]


def test_a_large_drift_stops_promotion_only_when_gate_max_drift_is_set():
    shifted, same = {"embedding_auc": 0.97}, {"embedding_auc": 0.52}
    assert decide({"macro_f1": 0.9}, None, GateConfig(), drift=shifted)["blessed"]  # 0: report only
    stopped = decide({"macro_f1": 0.9}, None, GateConfig(max_drift=0.8), drift=shifted)
    assert not stopped["blessed"] and "above gate_max_drift 0.800" in stopped["reasons"][1]
    assert decide({"macro_f1": 0.9}, None, GateConfig(max_drift=0.8), drift=same)["blessed"]
    # not measured (no new images, no champion profile): nothing to stop for
    assert decide({"macro_f1": 0.9}, None, GateConfig(max_drift=0.8), drift={"measured": False})["blessed"]
    values = metrics.stage_values({"seconds": 1.0, "gate_clean_images": 87, "gate_excluded_images": 3,
                                   "drift_embedding_auc": 0.97, "drift_class_psi": 0.01,
                                   "drift": {"measured": True}})
    assert values["gate_clean_images"] == 87 and values["drift_embedding_auc"] == 0.97
    assert values["drift_class_psi"] == 0.01 and "drift" not in values


def test_champions_of_other_classes_or_image_sizes_are_not_compared():
    geometry = {"views": ["left", "center", "right"], "lens": None,
                "geometry": {"layout": "horizontal", "overlap": 0.5, "image_size": 32,
                             "window": 0.0, "resize": "stretch"}}
    card = {"classes": ["a", "b"], "views": geometry["views"], "image_size": 32,
            "crop_geometry": geometry["geometry"]}
    assert comparability(card, ["a", "b"], geometry) == []
    assert "classes" in comparability(card, ["a", "c"], geometry)[0]
    assert "image size" in comparability({**card, "image_size": 64}, ["a", "b"], geometry)[0]
    assert "views" in comparability({**card, "views": ["left", "right"]}, ["a", "b"], geometry)[0]
    other_crop = {**card, "crop_geometry": {**geometry["geometry"], "overlap": 0.3}}
    assert "crop geometry" in comparability(other_crop, ["a", "b"], geometry)[0]
    lens = {"K": [[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]], "dist": [-0.2, 0, 0, 0, 0],
            "image_size": (640, 480)}
    assert comparability({**card, "lens": lens}, ["a", "b"], {**geometry, "lens": lens}) == []
    assert "lens" in comparability({**card, "lens": lens}, ["a", "b"], geometry)[0]
    assert "task" in comparability(card, ["a", "b"], geometry, task="multilabel")[0]
    b = decide({"macro_f1": 0.9}, None, GateConfig(), incomparable=["classes differ"], champion_version=1)
    assert not b["blessed"] and b["comparison"] == "incomparable"


@pytest.fixture(scope="module")
def voter_dir(voted):
    return voted


def _earlier_split(trained: dict, dest) -> list:
    """The same branches as they were evaluated on an earlier, smaller test split: copies
    whose test predictions keep only the first half of the test images (by id)."""
    from triview.artifacts import load_predictions, write_predictions

    dirs = []
    for view, folder in trained.items():
        copy = dest / view
        shutil.copytree(folder, copy)
        preds = load_predictions(copy)
        keep = np.argsort(preds["test_ids"])[: len(preds["test_ids"]) // 2]
        write_predictions(copy, {k: (v[keep] if k.startswith("test_") else v) for k, v in preds.items()})
        dirs.append(copy)
    return dirs


def test_gate_end_to_end_with_a_local_registry(trained, cropped, voter_dir, tmp_path):
    dirs = list(trained.values())
    registry = str(tmp_path / "registry")
    reg = ModelRegistry(registry, "digits")

    # first run, scored on an earlier test split: no champion -> blessed on the absolute
    # bar, exported and promoted with the metrics of that split
    earlier = _earlier_split(trained, tmp_path / "earlier")
    rec = evaluate_stage(earlier, voter_dir, tmp_path / "e1", views_dir=cropped, registry=registry,
                         model_name="digits", gradcam_per_kind=0)
    first = json.loads((tmp_path / "e1" / "blessing.json").read_text())
    assert first["blessed"] and first["comparison"] == "first_run" and rec["blessed"] == 1
    out = export_stage(earlier, voter_dir, cropped, tmp_path / "e1", tmp_path / "m1",
                       registry=registry, model_name="digits")
    assert out["promoted"] == 1 and reg.champion()["version"] == 1 and reg.versions() == [1]
    assert (tmp_path / "registry" / "models" / "digits" / "1" / "ensemble.onnx").is_file()
    stored = reg.champion()["metrics"]

    # the same ensemble on this run's (full) test split: the champion is re-scored on
    # these test crops -> exactly the challenger's scores, not the ones it stored
    rec = evaluate_stage(dirs, voter_dir, tmp_path / "e2", views_dir=cropped, registry=registry,
                         model_name="digits", gate_min_delta=-0.01, gradcam_per_kind=0)
    second = json.loads((tmp_path / "e2" / "blessing.json").read_text())
    challenger = json.loads((tmp_path / "e2" / "eval.json").read_text())["ensemble"]
    assert abs(stored["macro_f1"] - challenger["macro_f1"]) > 1e-3  # the splits do differ
    assert second["comparison"] == "compared" and second["champion_version"] == 1
    assert second["champion"] == pytest.approx(challenger["macro_f1"], abs=1e-9)
    assert second["champion_scores"]["accuracy"] == pytest.approx(challenger["accuracy"], abs=1e-9)
    assert second["blessed"] and rec["champion_macro_f1"] == pytest.approx(second["champion"])
    values = metrics.stage_values(rec)
    assert values["blessed"] == 1 and values["champion_macro_f1"] == pytest.approx(second["champion"])

    # demanding an improvement the challenger does not bring -> not blessed, not promoted
    evaluate_stage(dirs, voter_dir, tmp_path / "e3", views_dir=cropped, registry=registry,
                   model_name="digits", gate_min_delta=0.05, gradcam_per_kind=0)
    third = json.loads((tmp_path / "e3" / "blessing.json").read_text())
    assert not third["blessed"] and "< +0.0500" in third["reasons"][-1]
    out = export_stage(dirs, voter_dir, cropped, tmp_path / "e3", tmp_path / "m3",
                       blessing=tmp_path / "e3" / "blessing.json", registry=registry,
                       model_name="digits")
    assert out["promoted"] == 0 and "not blessed" in out["refused"]
    assert reg.versions() == [1] and reg.champion()["version"] == 1
    assert (tmp_path / "m3" / "ensemble.onnx").is_file()  # exported, just not promoted
    assert metrics.stage_values(out)["blessed"] == 0

    # the champion's card records what it saw (every train and val image, no test image);
    # here none of the challenger's test images is excluded
    card_path = tmp_path / "registry" / "models" / "digits" / "1" / "model_card.json"
    card = json.loads(card_path.read_text())
    views = mf.read_views(cropped)
    test_ids = sorted(set(views.loc[views["split"] == "test", "image_id"]))
    seen_file = card_path.parent / card["data"]["seen_images"]["file"]
    seen = seen_file.read_text().split()
    assert seen == mf.seen_image_ids(views) and card["data"]["seen_images"]["count"] == len(seen)
    assert len(seen) == len(set(views.loc[views["split"] != "test", "image_id"]))
    assert not set(test_ids) & set(seen)
    assert card["data"]["seen_images"]["sha256"] == hashlib.sha256(seen_file.read_bytes()).hexdigest()
    assert second["clean"] == {"test_images": len(test_ids), "clean_images": len(test_ids),
                               "excluded": {}}
    assert rec["gate_clean_images"] == len(test_ids) and rec["gate_excluded_images"] == 0
    promotions = reg.history()
    assert [(h["version"], h["replaced"]) for h in promotions] == [(1, None)]

    # a champion that trained on half of this test split (a split drawn with another
    # salt): both models are scored on the other half only, and the blessing says so
    contaminated = tmp_path / "contaminated"
    shutil.copytree(tmp_path / "registry", contaminated)
    half = test_ids[: len(test_ids) // 2]
    c_seen = contaminated / "models" / "digits" / "1" / "seen_images.txt"
    c_seen.write_text("\n".join(seen + half) + "\n")
    rec = evaluate_stage(dirs, voter_dir, tmp_path / "e4", views_dir=cropped,
                         registry=str(contaminated), model_name="digits",
                         gate_min_clean_images=10, gradcam_per_kind=0)
    fourth = json.loads((tmp_path / "e4" / "blessing.json").read_text())
    assert fourth["comparison"] == "compared"
    assert fourth["clean"] == {"test_images": len(test_ids), "clean_images": len(test_ids) - len(half),
                               "excluded": {"champion_trained_or_validated": len(half)}}
    # the champion is this very ensemble: on the same clean images it scores exactly alike
    assert fourth["champion"] == pytest.approx(fourth["challenger_compared"], abs=1e-12)
    assert fourth["challenger_clean_scores"]["accuracy"] == pytest.approx(
        fourth["champion_scores"]["accuracy"], abs=1e-12)
    assert fourth["challenger"] == pytest.approx(challenger["macro_f1"])  # the bar: whole split
    assert any(f"{len(test_ids) - len(half)} of {len(test_ids)} test images are clean" in r
               and f"{len(half)} champion trained or validated" in r for r in fourth["reasons"])
    assert rec["gate_excluded_images"] == len(half)
    report = (tmp_path / "e4" / "report.html").read_text()
    assert "clean test images" in report and "excluded: champion trained or validated" in report

    # too few clean images: no comparison; the documented fallback decides (the gate
    # itself: the evaluate stage above showed how its verdict reaches blessing.json)
    for fallback, blessed in (("keep_champion", False), ("absolute_bar", True)):
        fifth = run_gate(challenger, cropped, str(contaminated), "digits",
                         GateConfig(min_clean_images=len(test_ids), fallback=fallback))
        assert fifth["comparison"] == "too_few_clean" and fifth["blessed"] is blessed
        assert fifth["champion"] is None and f"fallback {fallback}" in fifth["reasons"][-1]
    # a champion that does not record what it saw: nothing counts as clean
    c_seen.unlink()
    verdict = run_gate(challenger, cropped, str(contaminated), "digits")
    assert verdict["comparison"] == "too_few_clean" and not verdict["blessed"]
    assert verdict["clean"]["excluded"] == {"champion_record_missing": len(test_ids)}

    # a champion trained on other classes is refused with the reason
    tampered = tmp_path / "tampered"
    shutil.copytree(tmp_path / "registry", tampered)
    card_path = tampered / "models" / "digits" / "1" / "model_card.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "classes": card["classes"][:-1] + ["cat"]}))
    verdict = run_gate(challenger, cropped, str(tampered), "digits")
    assert not verdict["blessed"] and verdict["comparison"] == "incomparable"
    assert any("classes" in r for r in verdict["reasons"])


def test_first_run_below_the_bar_is_exported_but_never_promoted(trained, cropped, voter_dir, tmp_path):
    dirs = list(trained.values())
    registry = str(tmp_path / "registry")
    evaluate_stage(dirs, voter_dir, tmp_path / "e", views_dir=cropped, registry=registry,
                   gate_min_macro_f1=0.999, gradcam_per_kind=0)
    verdict = json.loads((tmp_path / "e" / "blessing.json").read_text())
    assert verdict["challenger"] < 0.999  # three epochs on 291 digits: far from perfect
    assert not verdict["blessed"] and verdict["comparison"] == "first_run"
    out = export_stage(dirs, voter_dir, cropped, tmp_path / "e", tmp_path / "m", registry=registry)
    assert out["promoted"] == 0 and ModelRegistry(registry).champion() is None
    assert ModelRegistry(registry).versions() == []
