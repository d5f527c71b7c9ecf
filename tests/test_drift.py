"""Drift between runs on real digits: near zero for a batch from the same distribution,
high for a shifted (inverted) batch; the class-distribution figures on their own."""
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from triview import drift
from triview.demo import write_digits
from triview.ingest import ingest


def write_batch(root: Path, per_class: int, total: int = 50, invert_after: int | None = None) -> Path:
    """``per_class`` images of each digit, drawn from its first ``total`` in a fixed random
    order (by hash of the file name), so that a larger batch holds every smaller one and
    old and new images come from the same writers; with ``invert_after`` the images past
    that many per class arrive inverted (another camera)."""
    write_digits(root, per_class=total)
    for folder in root.iterdir():
        ordered = sorted(folder.glob("*.jpg"), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
        for path in ordered[per_class:]:
            path.unlink()
        for path in ordered[invert_after if invert_after is not None else per_class:per_class]:
            cv2.imwrite(str(path), 255 - cv2.imread(str(path)))
    return root


def test_drift_is_near_zero_for_the_same_distribution_and_high_for_a_shifted_batch(tmp_path):
    write_batch(tmp_path / "old", 30)
    ingest(tmp_path / "old", tmp_path / "a")
    first = drift.measure(tmp_path / "a", None, sample=200, out_dir=tmp_path / "profile")
    assert not first["measured"] and "no champion profile" in first["reason"]
    reference = drift.read_profile(tmp_path / "profile")
    profile, embeddings = reference
    assert profile["n_images"] == 300 and len(profile["sample_ids"]) == 200
    assert embeddings.shape == (200, 1280) and profile["extractor"]["backbone"] == "efficientnet_lite0"
    assert sorted(profile["class_counts"]) == [str(d) for d in range(10)]

    write_batch(tmp_path / "same", 50)
    write_batch(tmp_path / "shifted", 50, invert_after=30)
    for name in ("same", "shifted"):
        ingest(tmp_path / name, tmp_path / f"{name}-ds")
    same = drift.measure(tmp_path / "same-ds", reference, sample=200)
    shifted = drift.measure(tmp_path / "shifted-ds", reference, sample=200)
    for d in (same, shifted):
        assert d["measured"] and d["new_images"] == 200 and d["images"] == 500
        assert d["embedding"]["n_reference"] == 200 and d["embedding"]["n_new"] == 200
    # same distribution: the classifier cannot tell old from new, nothing moved
    assert same["embedding"]["auc"] < 0.65 and same["embedding"]["p_value"] > 0.01
    assert same["classes"]["psi"] < 0.05 and same["classes"]["p_value"] > 0.05
    assert same["image"]["brightness"]["ks"] < 0.2 and same["image"]["sharpness"]["ks"] < 0.2
    # inverted digits: separable embeddings, brightness far off; classes did not move
    assert shifted["embedding"]["auc"] > 0.95 and shifted["embedding"]["p_value"] < 1e-6
    assert shifted["image"]["brightness"]["ks"] > 0.8
    assert shifted["classes"]["psi"] < 0.05
    values = drift.flat(shifted)
    assert values["drift_embedding_auc"] == shifted["embedding"]["auc"]
    assert values["drift_measured"] == 1 and "drift_brightness_ks" in values
    assert any("two-sample ROC-AUC" in line for line in drift.summary_lines(shifted))

    # the same data again: no new image, nothing to measure
    again = drift.measure(tmp_path / "a", reference, sample=200)
    assert not again["measured"] and again["new_images"] == 0 and "too few" in again["reason"]


def test_class_distribution_drift():
    old = {str(d): 30 for d in range(10)}
    assert drift.class_drift(old, {str(d): 20 for d in range(10)})["psi"] == pytest.approx(0.0)
    skewed = drift.class_drift(old, {"0": 150, "1": 50})
    assert skewed["psi"] > 1.0 and skewed["p_value"] < 1e-10
    assert skewed["new_share"]["0"] == 0.75 and skewed["reference_share"]["0"] == 0.1
    # a class the champion never saw counts as drift, not as an error
    assert drift.class_drift(old, {**old, "cat": 30})["psi"] > 0.1


def test_psi_is_the_population_stability_index_by_its_formula():
    """PSI = sum (q - p) ln(q / p) over the class shares: 50/50 -> 80/20 is
    0.3 ln 1.6 + 0.3 ln 2.5 = 0.4159 (a sum of absolute share differences would be 0.6),
    and a class missing on one side counts with its share floored at 1e-4."""
    assert drift.population_stability({"a": 50, "b": 50}, {"a": 80, "b": 20}) == pytest.approx(
        0.3 * np.log(1.6) + 0.3 * np.log(2.5), rel=1e-9)
    assert drift.population_stability({"a": 1}, {"b": 1}) == pytest.approx(
        2 * (1 - 1e-4) * np.log(1e4), rel=1e-9)


def test_the_stable_sample_keeps_its_members_as_data_grows():
    import hashlib

    def key(i):
        return hashlib.sha256(i.encode()).hexdigest()

    ids = [f"{i:04x}" for i in range(1000)]
    small = drift.stable_sample(ids[:500], 100)
    grown = drift.stable_sample(ids, 100)
    assert len(small) == len(grown) == 100 and drift.stable_sample(ids[::-1], 100) == grown
    # a member of the small sample leaves only for a newcomer that hashes lower
    left = set(small) - set(grown)
    newcomers = set(grown) - set(ids[:500])
    assert len(left) == len(newcomers) > 0
    assert min(key(i) for i in left) > max(key(i) for i in grown)
