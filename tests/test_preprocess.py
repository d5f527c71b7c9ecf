import json

import cv2

import numpy as np
import pytest

from triview import manifest as mf
from triview.augment import AugmentConfig, augment, augment_image, _rng
from triview.params import stage_config
from conftest import DIGITS_AUGMENT


def digits_config(**overrides) -> AugmentConfig:
    """The digits demo's augmentation (the spec's defaults serve photos), with ``overrides``."""
    return AugmentConfig(**{**stage_config("augment", DIGITS_AUGMENT), **overrides})
from triview.balance import inverse_frequency_weights, read_balance
from triview.crop import CropGeometry, LensModel, crop_views, read_crop, read_rgb, undistort_maps, view_boxes


def test_view_boxes_overlap_and_cover_the_image():
    boxes = view_boxes(64, 48, CropGeometry(layout="horizontal", overlap=0.5))
    assert boxes == {"left": (0, 0, 32, 48), "center": (16, 0, 48, 48), "right": (32, 0, 64, 48)}
    thirds = view_boxes(90, 30, CropGeometry(layout="horizontal", overlap=0.0))
    assert thirds == {"left": (0, 0, 30, 30), "center": (30, 0, 60, 30), "right": (60, 0, 90, 30)}
    vertical = view_boxes(40, 100, CropGeometry(layout="vertical", overlap=0.25))
    assert list(vertical) == ["top", "center", "bottom"]
    assert vertical["top"] == (0, 0, 40, 40) and vertical["bottom"] == (0, 60, 40, 100)


@pytest.mark.parametrize("bad", [dict(layout="diagonal"), dict(overlap=1.0), dict(image_size=2)])
def test_bad_geometry_is_a_clear_error(bad):
    with pytest.raises(ValueError):
        CropGeometry(**bad)


def test_crops_see_different_parts_and_have_the_requested_size():
    image = np.zeros((60, 90, 3), np.uint8)
    image[:, :30] = 200   # only the left third is bright
    crops = crop_views(image, CropGeometry(layout="horizontal", overlap=0.0, image_size=16))
    assert all(c.shape == (16, 16, 3) for c in crops.values())
    assert crops["left"].mean() == pytest.approx(200) and crops["right"].mean() == 0


def test_identity_lens_has_no_maps_and_a_real_lens_undistorts():
    assert undistort_maps(LensModel(), 64, 48) is None
    lens = LensModel(K=[[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]], dist=[-0.4, 0.1, 0, 0, 0])
    maps = undistort_maps(lens, 64, 48)
    grid = np.zeros((48, 64, 3), np.uint8)
    grid[::8] = 255
    grid[:, ::8] = 255
    plain = crop_views(grid, CropGeometry(layout="horizontal", image_size=32))
    undistorted = crop_views(grid, CropGeometry(layout="horizontal", image_size=32), maps)
    assert any(np.abs(plain[v].astype(int) - undistorted[v]).mean() > 5 for v in plain)


def test_calibrate_and_crop_keeps_ids_splits_and_labels(ingested, cropped):
    images = mf.read_manifest(ingested)
    views = mf.read_views(cropped)
    assert len(views) == 3 * len(images)
    assert set(views["view"]) == {"left", "center", "right"}
    per_image = views.groupby("image_id").agg(n=("view", "size"), splits=("split", "nunique"),
                                              sources=("source_id", "nunique"))
    assert (per_image["n"] == 3).all() and (per_image["splits"] == 1).all()
    assert (per_image["sources"] == 1).all()
    merged = views.merge(images[["image_id", "split", "label"]], on="image_id", suffixes=("", "_img"))
    assert (merged["split"] == merged["split_img"]).all() and (merged["label"] == merged["label_img"]).all()
    crop = read_crop(cropped, views["path"].iloc[0])
    assert crop.shape == (32, 32, 3)
    geometry = json.loads((cropped / "geometry.json").read_text())
    assert geometry["views"] == ["left", "center", "right"] and geometry["lens"]["K"] is None


def test_class_weights_are_inverse_frequency():
    y = np.array([0] * 80 + [1] * 20)
    w = inverse_frequency_weights(y, 3)
    assert w[0] == pytest.approx(100 / (2 * 80)) and w[1] == pytest.approx(100 / (2 * 20))
    assert w[2] == 0  # absent from train


def test_balance_counts_every_split(cropped, balanced):
    result = read_balance(balanced)
    views = mf.read_views(cropped)
    n_train = views[views["split"] == "train"]["image_id"].nunique()
    assert sum(result["counts"]["train"].values()) == n_train
    assert len(result["class_weights"]) == 10 and min(result["class_weights"]) > 0


def test_augment_touches_train_only_and_is_deterministic(cropped, augmented, tmp_path):
    views = mf.read_views(cropped)
    aug = mf.read_views(augmented)
    assert set(aug["split"]) == {"train"} and (aug["augmented"] == 1).all()
    assert len(aug) == (views["split"] == "train").sum()
    again = tmp_path / "again"
    augment(cropped, again, digits_config(copies=1, seed=0))
    first = aug["path"].iloc[0]
    assert np.array_equal(read_crop(augmented, first), read_crop(again, first))
    original = read_crop(cropped, views[views["image_id"] == aug["image_id"].iloc[0]]
                         .query("view == @aug.view.iloc[0]")["path"].iloc[0])
    assert not np.array_equal(original, read_crop(augmented, first))
    # the copies travel as shards per view, all training crops
    assert {ref.split("#")[0].rsplit("/", 1)[0] for ref in aug["path"]} == \
        {f"augmented/{v}/train" for v in set(aug["view"])}


def test_noise_sigma_is_a_fraction_of_the_range():
    flat = np.full((64, 64, 3), 128, np.uint8)
    out = augment_image(flat, digits_config(noise_std=0.05, max_rotation=0), _rng(0, "x"))
    assert (out.astype(float) - 128).std() == pytest.approx(0.05 * 255, rel=0.05)


def test_rotation_stays_within_the_maximum():
    img = np.zeros((65, 65, 3), np.uint8)
    img[32, 32:] = 255  # a ray pointing right from the centre
    for k in range(20):
        out = augment_image(img, digits_config(noise_std=0, max_rotation=50), _rng(1, k))
        ys, xs = np.nonzero(out[..., 0] > 100)
        far = np.argmax((xs - 32) ** 2 + (ys - 32) ** 2)
        angle = np.degrees(np.arctan2(-(ys[far] - 32), xs[far] - 32))
        assert abs(angle) <= 50 + 3


def _only(**one) -> AugmentConfig:
    """Every augmentation off except ``one``."""
    off = dict(noise_std=0.0, max_rotation=0.0, hflip=0.0, vflip=0.0, shift=0.0, zoom=0.0,
               brightness=0.0, contrast=0.0, clahe=0.0, gray_world=0.0, crop_scale=1.0,
               border_mode="constant")
    return digits_config(**{**off, **one})


def _blob_offsets(config: AugmentConfig, draws: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A small blob 16 px right of the warp centre; its centroid (relative to the centre)
    before, and after each of ``draws`` augmentations."""
    yy, xx = np.mgrid[0:65, 0:65]
    img = np.zeros((65, 65, 3), np.uint8)
    img[..., 0] = np.round(250 * np.exp(-((xx - 48.5) ** 2 + (yy - 32.5) ** 2) / (2 * 1.5 ** 2)))

    def centroid(image):
        w = image[..., 0].astype(float)
        return np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum() - 32.5

    after = [centroid(augment_image(img, config, _rng(2, "measure", k))) for k in range(draws)]
    return centroid(img), np.array(after)


def test_rotation_zoom_and_shift_move_the_image_by_the_amounts_asked():
    """Measured on a blob: every draw stays within the asked range and the draws reach
    most of it, on both sides (a warp scaled down or switched off fails)."""
    before, after = _blob_offsets(_only(max_rotation=40.0))
    angles = np.degrees(np.arctan2(-after[:, 1], after[:, 0]) - np.arctan2(-before[1], before[0]))
    assert np.abs(angles).max() <= 40 + 1
    assert angles.max() >= 0.8 * 40 and angles.min() <= -0.8 * 40
    assert np.allclose(np.hypot(*after.T), np.hypot(*before), atol=0.3)  # a pure rotation

    before, after = _blob_offsets(_only(zoom=0.3))
    scale = np.hypot(*after.T) / np.hypot(*before)
    assert np.abs(scale - 1).max() <= 0.3 + 0.02
    assert scale.max() >= 1 + 0.8 * 0.3 and scale.min() <= 1 - 0.8 * 0.3

    before, after = _blob_offsets(_only(shift=0.1))
    moved = (after - before) / 65  # as a share of the side
    assert np.abs(moved).max() <= 0.1 + 0.01
    for axis in (0, 1):
        assert moved[:, axis].max() >= 0.08 and moved[:, axis].min() <= -0.08


def test_contrast_gain_stays_in_its_range_and_reaches_it():
    img = np.full((32, 32, 3), 100, np.uint8)
    img[:, 16:] = 160
    gains = np.array([augment_image(img, _only(contrast=0.4), _rng(3, "contrast", k)).astype(float).std()
                      / img.astype(float).std() for k in range(40)])
    assert np.abs(gains - 1).max() <= 0.4 + 0.02
    assert gains.max() >= 1 + 0.8 * 0.4 and gains.min() <= 1 - 0.8 * 0.4


def test_effective_number_weights_follow_cui_et_al():
    from triview.balance import effective_number_weights

    y = np.array([0] * 1000 + [1] * 10 + [2] * 100)
    w = effective_number_weights(y, 4, beta=0.99)
    raw = np.array([(1 - 0.99) / (1 - 0.99 ** n) for n in (1000, 10, 100)])
    assert np.allclose(w[:3], raw / raw.sum() * 3) and w[3] == 0
    assert w.sum() == pytest.approx(3) and w[1] > w[2] > w[0]
    # beta -> 0 gives equal weights; large beta approaches inverse frequency
    assert np.allclose(effective_number_weights(y, 3, beta=0.0), 1.0)
    with pytest.raises(ValueError):
        effective_number_weights(y, 3, beta=1.0)


def test_balance_weighting_is_selectable(cropped, tmp_path):
    from triview.balance import balance

    eff = balance(cropped, tmp_path / "e", weighting="effective_number", beta=0.9)
    assert eff["strategy"] == "effective_number" and sum(eff["class_weights"]) == pytest.approx(10)
    with pytest.raises(ValueError, match="weighting must be one of"):
        balance(cropped, tmp_path / "x", weighting="magic")


def _photo(w=640, h=480, seed=0):
    """A smooth, textured RGB test picture (gradients + blobs), like a real photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), (0, 0), 3)


LENS = LensModel(K=[[530.0, 0, 320], [0, 530.0, 240], [0, 0, 1]], dist=[-0.28, 0.1, 0, 0, 0],
                 image_size=(640, 480))


@pytest.mark.parametrize("lens", [LensModel(), LENS], ids=["identity", "calibrated"])
@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_fused_sampler_matches_undistort_then_crop(lens, resize):
    from triview.crop import ViewSampler

    image = _photo()
    geometry = CropGeometry(layout="horizontal", image_size=32, resize=resize)
    reference = crop_views(image, geometry, undistort_maps(lens, 640, 480))
    fused = ViewSampler(lens, geometry, 640, 480).sample(image)
    for view in geometry.views:
        diff = np.abs(reference[view].astype(float) - fused[view])
        assert diff.mean() < 2.0, (view, diff.mean())


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("lens", [LensModel(), LENS], ids=["identity", "calibrated"])
def test_cropper_on_large_files_matches_the_full_resolution_reference(tmp_path, suffix, lens):
    from triview.crop import _Cropper, choose_reduction

    image = _photo(1920, 1080)
    path = tmp_path / f"big{suffix}"
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    geometry = CropGeometry(layout="horizontal", image_size=32)
    assert choose_reduction(1920, 1080, geometry) == 8  # 960/8 = 120 px >= 2 x 32
    decoded = cv2.imread(str(path))
    reference = crop_views(decoded, geometry, undistort_maps(lens, 1920, 1080))
    fast = _Cropper(lens, geometry).views(path)  # RGB
    for view in geometry.views:
        ref = cv2.cvtColor(reference[view], cv2.COLOR_BGR2RGB).astype(float)
        assert np.abs(ref - fast[view]).mean() < 2.0, view


def test_window_fraction_centres_the_views():
    from triview.crop import view_fractions

    g = CropGeometry(layout="horizontal", window=0.3, overlap=0.5)
    f = view_fractions(g)
    assert f["left"] == pytest.approx((0.2, 0.5)) and f["right"] == pytest.approx((0.5, 0.8))
    assert view_boxes(100, 10, g)["center"] == (35, 0, 65, 10)
    with pytest.raises(ValueError, match="spans"):
        CropGeometry(layout="horizontal", window=0.5, overlap=0.2)


def test_letterbox_keeps_the_aspect_ratio():
    image = np.full((60, 90, 3), 255, np.uint8)
    views = crop_views(image, CropGeometry(layout="horizontal", overlap=0.0, image_size=30, resize="letterbox"))
    left = views["left"]  # a 30x60 crop -> 15x30 content with black bars left and right
    assert left.shape == (30, 30, 3)
    assert left[:, :7].max() == 0 and left[:, 8:22].min() == 255 and left[:, 23:].max() == 0


def test_resample_plan_over_and_under_sampling():
    from triview.balance import resample_plan

    ids = np.array([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(3)])
    labels = np.array(["a"] * 10 + ["b"] * 3)
    over = resample_plan(ids, labels, "oversample", seed=0)
    assert sum(over[i] for i in ids[:10]) == 10 and sum(over[i] for i in ids[10:]) == 10
    assert {over[i] for i in ids[10:]} <= {3, 4}  # repeats spread evenly
    under = resample_plan(ids, labels, "undersample", seed=0)
    assert sum(under[i] for i in ids[:10]) == 3 and all(under[i] == 1 for i in ids[10:])
    half = resample_plan(ids, labels, "oversample", target=0.5)
    assert sum(half[i] for i in ids[10:]) == 5
    assert resample_plan(ids, labels, "oversample", seed=1) != over
    with pytest.raises(ValueError, match="resample must be one of"):
        resample_plan(ids, labels, "smote")


def test_only_the_training_split_is_resampled(tmp_path):
    """An imbalanced real data set: val/test counts never change, train is balanced."""
    from triview.balance import balance
    from triview.demo import write_digits
    from triview.stages import calibrate_and_crop_stage, ingest_stage
    from triview.train import ViewData, apply_multiplicity
    import torch

    write_digits(tmp_path / "d", per_class=30)
    for p in sorted((tmp_path / "d" / "3").glob("*.jpg"))[10:]:
        p.unlink()  # class 3 keeps 10 images
    ingest_stage(str(tmp_path / "d"), tmp_path / "i")
    calibrate_and_crop_stage(tmp_path / "i", tmp_path / "c", image_size=16)
    plain = balance(tmp_path / "c", tmp_path / "b0")
    over = balance(tmp_path / "c", tmp_path / "b1", resample="oversample")
    under = balance(tmp_path / "c", tmp_path / "b2", resample="undersample")
    for result in (over, under):
        assert result["counts"]["val"] == plain["counts"]["val"]
        assert result["counts"]["test"] == plain["counts"]["test"]
        after = result["resample"]["train_counts_after"]
        assert len(set(after.values())) == 1  # every class equal in training
    assert over["resample"]["train_counts_after"]["3"] == max(plain["counts"]["train"].values())
    assert plain["imbalance_ratio"] > 2 and (tmp_path / "b0" / "class_counts.png").is_file()
    assert set(plain["labels"]["pos_weight"]) == set(plain["classes"])
    # the training loader applies the plan
    ids = list(over["train_multiplicity"])
    data = ViewData(torch.zeros(len(ids), 3, 4, 4, dtype=torch.uint8),
                    torch.zeros(len(ids), dtype=torch.int64), ids)
    assert len(apply_multiplicity(data, over["train_multiplicity"]).image_ids) == \
        sum(over["resample"]["train_counts_after"].values())


def test_each_augmentation_does_what_it_says():
    from triview.augment import augment_batch

    rng_img = np.random.default_rng(3)
    img = cv2.GaussianBlur(rng_img.integers(0, 255, (32, 32, 3), dtype=np.uint8), (0, 0), 1)
    img[..., 0] //= 2  # a colour cast for gray-world to remove
    base = dict(noise_std=0.0, max_rotation=0.0)
    same = augment_image(img, digits_config(**base), _rng(0, "x"))
    assert np.array_equal(same, img)
    assert np.array_equal(augment_image(img, digits_config(**base, hflip=1.0), _rng(0, "x")),
                          img[:, ::-1])
    assert np.array_equal(augment_image(img, digits_config(**base, vflip=1.0), _rng(0, "x")),
                          img[::-1])
    balanced = augment_image(img, digits_config(**base, gray_world=1.0), _rng(0, "x"))
    means = balanced.reshape(-1, 3).mean(0)
    assert means.max() - means.min() < 3 < np.ptp(img.reshape(-1, 3).mean(0))
    assert not np.array_equal(augment_image(img, digits_config(**base, clahe=1.0), _rng(0, "x")), img)
    bright = augment_image(img, digits_config(**base, brightness=0.3), _rng(5, "x"))
    assert abs(bright.mean() - img.mean()) > 1
    shifted = augment_image(img, digits_config(**base, shift=0.2), _rng(0, "y"))
    assert not np.array_equal(shifted, img)
    batch = np.stack([img, img])
    cfg = digits_config(shift=0.1)
    e1 = augment_batch(batch, ["a", "b"], cfg, epoch=1)
    assert np.array_equal(e1, augment_batch(batch, ["a", "b"], cfg, epoch=1))
    assert not np.array_equal(e1, augment_batch(batch, ["a", "b"], cfg, epoch=2))
    with pytest.raises(ValueError, match="'hflip' must be in \\[0, 1\\]"):
        digits_config(hflip=1.5)


def test_online_mode_writes_config_and_preview_but_no_copies(cropped, tmp_path):
    from triview.augment import load_config

    augment(cropped, tmp_path, digits_config(mode="online", zoom=0.1, seed=4))
    assert len(mf.read_views(tmp_path)) == 0
    cfg = load_config(tmp_path)
    assert cfg.mode == "online" and cfg.zoom == 0.1 and cfg.seed == 4
    preview = read_rgb(tmp_path / "preview.png")
    assert preview.shape[0] > 0 and preview.shape[1] == 5 * preview.shape[0] // 3


def test_ingested_jpegs_reach_the_cropper_as_jpegs(tmp_path, monkeypatch):
    """A JPEG that ingest kept byte for byte lies in a shard (``images/NNNNNN.tar#<id>.jpg``):
    calibrate-and-crop still decodes it as a JPEG (at a reduced DCT scale), by the member's
    suffix, not the shard's."""
    from sklearn.datasets import load_digits

    import triview.crop as crop
    from triview.ingest import ingest
    from triview.stages import calibrate_and_crop_stage

    digits = load_digits()
    for i in range(40):
        folder = tmp_path / "photos" / str(digits.target[i] % 2)
        folder.mkdir(parents=True, exist_ok=True)
        big = cv2.resize((digits.images[i] * 15).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / f"{i}.jpg"), cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    table = ingest(tmp_path / "photos", tmp_path / "ingested", workers=1, plot=False).manifest
    assert all(p.startswith("images/") and ".tar#" in p and p.endswith(".jpg") for p in table["path"])
    seen = []
    real = crop._Cropper.views_of_bytes

    def recording(self, data, jpeg):
        seen.append(jpeg)
        return real(self, data, jpeg)

    monkeypatch.setattr(crop._Cropper, "views_of_bytes", recording)
    calibrate_and_crop_stage(tmp_path / "ingested", tmp_path / "views", workers=1, image_size=16)
    assert len(seen) == len(table) and all(seen)


def test_a_table_written_row_by_row_is_the_table_pandas_writes(tmp_path):
    """calibrate-and-crop writes views.csv a row at a time (mf.TableWriter): the same bytes
    as writing the whole table, empty and NaN values alike; a bad split is refused and an
    error leaves no file."""
    import pandas as pd

    rows = [("a1", "left", "crops/left/train/000000.tar#a1.png", "ant", "ant;bee", "s,1", "train", 0),
            ("b\"2", "right", "x.png", "bee", float("nan"), "s2", "test", 3),
            ("c3", "center", "y.png", "", None, "s3", "val", 0)]
    with mf.TableWriter(tmp_path / "rows.csv", mf.VIEW_COLUMNS) as writer:
        for row in rows:
            writer.row(row)
    mf.write_table(pd.DataFrame(rows, columns=list(mf.VIEW_COLUMNS)), tmp_path / "whole.csv", mf.VIEW_COLUMNS)
    assert (tmp_path / "rows.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert writer.rows == 3
    with pytest.raises(mf.ManifestError, match="unknown split"):
        with mf.TableWriter(tmp_path / "bad.csv", mf.VIEW_COLUMNS) as writer:
            writer.row(rows[0])
            writer.row(rows[1][:6] + ("holdout", 0))
    assert not (tmp_path / "bad.csv").exists() and not list(tmp_path.glob(".*"))
    read = list(mf.iter_table(tmp_path / "rows.csv", mf.VIEW_COLUMNS))
    assert [r["image_id"] for r in read] == ["a1", "b\"2", "c3"] and read[1]["labels"] == ""
    header = ",".join(mf.VIEW_COLUMNS) + "\n"
    (tmp_path / "short.csv").write_text(header + "z9,left,z.png,ant,ant,s9,val\n\n")  # no `augmented`
    (short,) = mf.iter_table(tmp_path / "short.csv", mf.VIEW_COLUMNS)
    assert short["split"] == "val" and short["augmented"] == ""
    (tmp_path / "nosplit.csv").write_text(header + "z9,left,z.png\n")
    with pytest.raises(mf.ManifestError, match="unknown split"):
        list(mf.iter_table(tmp_path / "nosplit.csv", mf.VIEW_COLUMNS))
    with pytest.raises(mf.ManifestError, match="missing columns"):
        list(mf.iter_table(tmp_path / "short.csv", mf.IMAGE_COLUMNS))


def test_streaming_a_table_does_not_load_pandas(tmp_path):
    """A stage that reads and writes its tables row by row (calibrate-and-crop, augment) never
    imports pandas: its import is about a quarter of a second of every such task."""
    import subprocess
    import sys

    code = ("import sys; from triview import augment, crop, cropcache, manifest as mf\n"
            "with mf.TableWriter(sys.argv[1], mf.VIEW_COLUMNS) as w:\n"
            "    w.row(('a', 'left', 'a.png', 'x', 'x', 's', 'train', 0))\n"
            "assert [r['image_id'] for r in mf.iter_table(sys.argv[1], mf.VIEW_COLUMNS)] == ['a']\n"
            "print('pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.csv")], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "False"
