"""The champion/challenger gate: first run, blessed, not blessed, incomparable champion,
and export refusing to promote an unblessed model."""
import hashlib
import json
import shutil

import numpy as np
import pytest

from triview import manifest as mf
from triview import metrics
from triview.artifacts import Seen
from triview.gate import (GateConfig, champion_predictions, clean_test_images, compare_on_clean,
                          comparability, decide, run_gate)
from triview.scoring import scores
from triview.registry import ModelRegistry
from triview.stages import evaluate_stage, export_stage


def test_first_run_is_blessed_when_the_absolute_bar_holds():
    b = decide({"macro_f1": 0.8}, None, GateConfig(min_value=0.7))
    assert b["blessed"] and b["comparison"] == "first_run"
    assert any("first model" in r for r in b["reasons"])


def test_first_run_below_the_absolute_bar_is_not_blessed():
    b = decide({"macro_f1": 0.6}, None, GateConfig(min_value=0.7))
    assert not b["blessed"] and "below the absolute bar" in b["reasons"][0]


# ---------------------------------------------------------------------- the paired decision


N_CLASSES = 4


def _probs(y: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Probabilities that pick the true class where ``right``, the next class elsewhere."""
    pred = np.where(right, y, (y + 1) % N_CLASSES)
    return np.eye(N_CLASSES)[pred] * 0.7 + 0.3 / N_CLASSES


def _right(n: int, share: float, seed: int) -> np.ndarray:
    """Exactly round(share * n) of n images right, at places drawn with ``seed``."""
    right = np.zeros(n, bool)
    right[np.random.default_rng(seed).permutation(n)[: round(share * n)]] = True
    return right


def _gate(test: dict, champion: dict, champion_seen: set, challenger_seen: set,
          config: GateConfig) -> dict:
    """The gate's path from predictions to blessing (what run_gate does after the registry)."""
    sources = [f"photo-{i}" for i in test["ids"]]
    clean = clean_test_images(test["ids"], sources, Seen(frozenset(champion_seen), frozenset()),
                              Seen(frozenset(challenger_seen), frozenset()))
    champ_scores, mine, paired = compare_on_clean(test, champion, clean["ids"], config)
    whole = scores(np.asarray(test["y"]), np.asarray(test["ensemble"]))
    return decide(whole, champ_scores, config, champion_version=1, clean=clean,
                  challenger_clean=mine, paired=paired)


def _split_test(n: int = 400):
    ids = [f"{i:04d}" for i in range(n)]
    y = np.arange(n) % N_CLASSES
    return ids, y


def test_a_champion_that_memorised_its_training_images_is_scored_on_clean_ones_only():
    """The champion trained on half of this test split (another salt) and gets every one
    of those right; on the other half it is right 70% of the time, the challenger 85%
    everywhere. Only the clean half may count: there the challenger is clearly better
    (superiority shown); scoring both on every image would make them look alike."""
    ids, y = _split_test()
    half = set(ids[:200])
    champion_right = np.concatenate([np.ones(200, bool), _right(200, 0.7, 1)])
    champion = {"ids": ids, "y": y, "prob": _probs(y, champion_right), "thresholds": None}
    test = {"ids": ids, "y": y, "ensemble": _probs(y, _right(400, 0.85, 2)), "thresholds": None}
    blessing = _gate(test, champion, half, set(), GateConfig(min_delta=0.0))
    assert blessing["clean"]["clean_images"] == 200
    assert blessing["clean"]["excluded"] == {"champion_trained_or_validated": 200}
    assert blessing["paired"]["images"] == 200
    assert blessing["champion"] < 0.75 < blessing["challenger_compared"]
    assert blessing["interval"][0] > 0 and blessing["p_value"] <= 0.025 and blessing["blessed"]
    assert blessing["rule"] == "superiority"


def test_the_challengers_own_training_images_never_count_for_it():
    """The challenger trained on 200 of the test images (a given split that overlaps) and
    gets them all right; on the rest it is right 70% of the time, the champion 80%
    everywhere. On the clean images it is worse, and refused; counting its training
    images would have shown it non-inferior."""
    ids, y = _split_test()
    seen = set(ids[200:])
    mine = _right(400, 0.7, 3) | np.array([i in seen for i in ids])
    champion = {"ids": ids, "y": y, "prob": _probs(y, _right(400, 0.8, 4)), "thresholds": None}
    test = {"ids": ids, "y": y, "ensemble": _probs(y, mine), "thresholds": None}
    blessing = _gate(test, champion, set(), seen, GateConfig(min_delta=-0.01))
    assert blessing["clean"]["excluded"] == {"challenger_trained_or_validated": 200}
    assert blessing["comparison"] == "compared" and not blessing["blessed"]
    assert blessing["interval"][1] < 0 and blessing["rule"] == "non-inferiority"
    assert "not shown" in blessing["reasons"][-1]


def test_a_seen_source_group_excludes_a_re_encoded_copy():
    """Same source group (another file of the same photo), other content hash: excluded."""
    seen = Seen(frozenset({"aaaa"}), frozenset({"cats/001"}))
    clean = clean_test_images(["bbbb", "cccc", "dddd"], ["cats/001", "cats/002", "dogs/001"],
                              seen, Seen(frozenset(), frozenset({"dogs/001"})))
    assert clean["ids"] == ["cccc"]
    assert clean["excluded"] == {"champion_source_seen": 1, "challenger_source_seen": 1}
    # a champion that records no source groups (exported before): content hash only
    old = clean_test_images(["bbbb", "cccc"], ["cats/001", "cats/002"], Seen(frozenset({"aaaa"})),
                            Seen(frozenset(), frozenset()))
    assert old["ids"] == ["bbbb", "cccc"]


def test_non_inferiority_and_superiority_on_paired_predictions():
    """The same predictions pass non-inferiority (-0.01) and fail superiority (0): a
    challenger equal to its champion is not shown better. A tolerated regression is
    blessed only when the interval shows it, not on the point estimate."""
    ids, y = _split_test()
    same = _probs(y, _right(400, 0.8, 5))
    champion = {"ids": ids, "y": y, "prob": same, "thresholds": None}
    test = {"ids": ids, "y": y, "ensemble": same, "thresholds": None}
    equal = _gate(test, champion, set(), set(), GateConfig(min_delta=-0.01))
    assert equal["blessed"] and equal["interval"] == [0.0, 0.0] and equal["delta"] == 0.0
    assert not _gate(test, champion, set(), set(), GateConfig(min_delta=0.0))["blessed"]
    # independent errors, the challenger 1 point behind: the interval is far wider than
    # the 0.01 margin, so non-inferiority is not shown (the point estimate alone would be)
    test["ensemble"] = _probs(y, _right(400, 0.79, 6))
    wide = _gate(test, champion, set(), set(), GateConfig(min_delta=-0.05))
    assert wide["delta"] > -0.05 and wide["interval"][0] < -0.05 and not wide["blessed"]
    narrow = _gate(test, champion, set(), set(), GateConfig(min_delta=-0.2))
    assert narrow["blessed"] and narrow["p_value"] < 0.001
    loose = _gate(test, champion, set(), set(), GateConfig(min_delta=-0.05, confidence=0.5))
    assert loose["interval"][1] - loose["interval"][0] < wide["interval"][1] - wide["interval"][0]
    # the absolute bar holds whatever the comparison says
    assert not decide({"macro_f1": 0.5}, None, GateConfig(min_value=0.6))["blessed"]


def test_a_seen_record_is_trusted_only_with_its_cards_digest(tmp_path):
    """Fail closed: an emptied, truncated or missing seen_images.txt (or seen_sources.json)
    is no record, never "saw nothing"."""
    from triview.artifacts import SeenRecordError, read_seen_images, write_seen_images

    record = write_seen_images(tmp_path, ["aaaa", "bbbb", "cccc"], ["a/1", "b/2"])
    seen = read_seen_images(tmp_path, record)
    assert seen.ids == {"aaaa", "bbbb", "cccc"} and seen.sources == {"a/1", "b/2"}
    assert read_seen_images(tmp_path, {k: v for k, v in record.items() if k != "sources"}).sources is None
    for name, text in (("seen_images.txt", ""), ("seen_images.txt", "aaaa\n"),
                       ("seen_sources.json", "[]")):
        original = (tmp_path / name).read_text()
        (tmp_path / name).write_text(text)
        with pytest.raises(SeenRecordError, match="its model card records") as err:
            read_seen_images(tmp_path, record)
        assert err.value.reason == "champion_record_mismatch"
        (tmp_path / name).write_text(original)
    for broken in (None, {}, {**record, "file": "gone.txt"}):
        with pytest.raises(SeenRecordError) as err:
            read_seen_images(tmp_path, broken)
        assert err.value.reason == "champion_record_missing"


def test_a_comparison_without_the_paired_test_is_refused():
    with pytest.raises(ValueError, match="paired difference"):
        decide({"macro_f1": 0.8}, {"macro_f1": 0.7}, GateConfig(), champion_version=1)


def test_the_paired_macro_f1_is_sklearns_on_every_resample():
    from triview.paired import macro_f1_difference
    from triview.scoring import macro_f1

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 50)
    a, b = np.where(rng.random(50) < 0.8, y, 0), rng.integers(0, 5, 50)
    d = macro_f1_difference(y, a, b, resamples=200)
    assert d.delta == pytest.approx(macro_f1(y, a) - macro_f1(y, b), abs=1e-12)
    assert d.low <= d.delta <= d.high and d.images == 50
    Y, A = rng.integers(0, 2, (40, 3)), rng.integers(0, 2, (40, 3))
    assert macro_f1_difference(Y, A, Y, resamples=10).delta == pytest.approx(macro_f1(Y, A) - 1.0)


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
    # identical predictions: every resample's difference is 0, non-inferiority is shown
    assert second["interval"] == [0.0, 0.0] and second["p_value"] < 0.001
    assert second["rule"] == "non-inferiority" and second["paired"]["resamples"] == 10_000
    values = metrics.stage_values(rec)
    assert values["blessed"] == 1 and values["champion_macro_f1"] == pytest.approx(second["champion"])
    # the interval and p-value reach the metrics (KFP, Pushgateway) and the report
    assert values["gate_delta_low"] == values["gate_delta_high"] == values["gate_delta"] == 0.0
    assert values["gate_p_value"] == pytest.approx(second["p_value"])
    assert "95% interval" in (tmp_path / "e2" / "report.html").read_text()
    assert "p-value" in (tmp_path / "e2" / "report.html").read_text()

    # demanding an improvement the challenger does not bring -> not blessed, not promoted
    evaluate_stage(dirs, voter_dir, tmp_path / "e3", views_dir=cropped, registry=registry,
                   model_name="digits", gate_min_delta=0.05, gradcam_per_kind=0)
    third = json.loads((tmp_path / "e3" / "blessing.json").read_text())
    assert not third["blessed"] and third["rule"] == "superiority"
    assert "change > +0.0500" in third["reasons"][-1] and "not shown" in third["reasons"][-1]
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
    c_dir = contaminated / "models" / "digits" / "1"
    c_seen = c_dir / "seen_images.txt"
    _rerecord(c_dir, ids=seen + half)
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
    # the champion's predictions are the challenger's (the same ensemble)
    champ = champion_predictions(c_dir, cropped)
    test = {"ids": champ["ids"], "y": champ["y"], "ensemble": champ["prob"]}
    # a champion that trained on re-encoded copies of a quarter of the test photos: other
    # content hashes, the same source groups -> excluded
    regrouped = tmp_path / "regrouped"
    shutil.copytree(tmp_path / "registry", regrouped)
    quarter = test_ids[: len(test_ids) // 4]
    source_of = dict(zip(views["image_id"], views["source_id"]))
    _rerecord(regrouped / "models" / "digits" / "1",
              sources=mf.seen_source_ids(views) + [source_of[i] for i in quarter])
    verdict = run_gate(challenger, cropped, str(regrouped), "digits", test=test)
    assert verdict["clean"]["excluded"] == {"champion_source_seen": len(quarter)}
    assert verdict["paired"]["images"] == len(test_ids) - len(quarter)
    assert "champion source seen" in " ".join(verdict["reasons"])

    # fail closed: an emptied or truncated record (its SHA-256 no longer the card's) is
    # no record; nothing counts as clean, and the fallback decides
    for text in ("", "\n".join(seen[: len(seen) // 2]) + "\n"):
        c_seen.write_text(text)
        verdict = run_gate(challenger, cropped, str(contaminated), "digits", test=test)
        assert verdict["comparison"] == "too_few_clean" and not verdict["blessed"]
        assert verdict["clean"]["excluded"] == {"champion_record_mismatch": len(test_ids)}
    # a champion that does not record what it saw: nothing counts as clean
    c_seen.unlink()
    verdict = run_gate(challenger, cropped, str(contaminated), "digits", test=test)
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


def _rerecord(model_dir, ids=None, sources=None) -> None:
    """Rewrite a model folder's seen record and its card's digests, as an export that had
    trained on ``ids`` / ``sources`` would have written them."""
    from triview.artifacts import write_seen_images

    card_path = model_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    ids = sorted(ids) if ids is not None else (model_dir / "seen_images.txt").read_text().split()
    if sources is None:
        sources = json.loads((model_dir / "seen_sources.json").read_text())
    card["data"]["seen_images"] = write_seen_images(model_dir, ids, sorted(set(sources)))
    card_path.write_text(json.dumps(card))


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
