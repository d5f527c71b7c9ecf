"""`triview predict`: raw images through the training preprocessing and the exported
ensemble; JSON and table output, per-class counts, clear errors for bad inputs."""
import json

import numpy as np
import pytest

from s3_server import BUCKET, moto_server, s3_endpoint  # noqa: F401  (fixtures)
from triview import manifest as mf
from triview.cli import main
from triview.runtime import load_runtime
from triview.registry import ModelRegistry
from triview.train.data import load_split
from conftest import stored_photos


@pytest.fixture(scope="module")
def model_dir(exported):
    return exported


@pytest.fixture(scope="module")
def test_images(ingested, cropped):
    """The ingested test images, in the order of the cropped views' test rows."""
    images = mf.read_manifest(ingested).set_index("image_id")["path"]
    views = mf.read_views(cropped)
    rows = views[(views["split"] == "test") & (views["view"] == views["view"].iloc[0])
                 & (views["augmented"] == 0)]
    return [str(p) for p in stored_photos(ingested, [images[i] for i in rows["image_id"]])], \
        rows["label"].tolist()


def test_json_output_matches_the_model_on_the_training_crops(model_dir, cropped, test_images, capsys):
    paths, _ = test_images
    assert main(["predict", "--model", str(model_dir), *paths, "--format", "json",
                 "--threshold", "0.0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(paths)
    results = [json.loads(line) for line in lines]
    assert [r["path"] for r in results] == paths
    run, card = load_runtime(model_dir)
    crops = load_split(cropped, card["views"], "test").inputs
    expected = run([c.numpy() for c in crops])
    for r, prob in zip(results, expected):
        assert set(r) == {"path", "labels"} and set(r["labels"][0]) == {"label", "score"}
        got = {x["label"]: x["score"] for x in r["labels"]}
        assert len(got) == len(card["classes"])  # threshold 0: every class, best first
        assert r["labels"][0]["label"] == card["classes"][int(prob.argmax())]
        assert max(abs(got[c] - float(p)) for c, p in zip(card["classes"], prob)) < 1e-5
        assert [x["score"] for x in r["labels"]] == sorted(got.values(), reverse=True)


def test_table_output_counts_images_per_class(model_dir, test_images, capsys):
    paths, _ = test_images
    assert main(["predict", "--model", str(model_dir), *paths[:20]]) == 0
    out = capsys.readouterr().out
    assert "labels (score)" in out and "share" in out and "20 images predicted" in out
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[2].endswith("%"):
            counts[parts[0]] = int(parts[1])
    assert sum(counts.values()) == 20 and len(counts) == 10


def test_bad_images_are_clear_errors_and_the_rest_still_predicted(model_dir, test_images, tmp_path,
                                                                 capsys):
    paths, _ = test_images
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(open(paths[0], "rb").read()[:200])
    missing = tmp_path / "missing.jpg"
    rc = main(["predict", "--model", str(model_dir), paths[0], str(text), str(empty), str(truncated),
               str(missing), "--format", "json"])
    captured = capsys.readouterr()
    assert rc == 1
    results = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert len(results) == 5 and results[0]["labels"] and "error" not in results[0]
    errors = {r["path"]: r["error"] for r in results[1:]}
    assert errors[str(text)] == "not an image" and errors[str(empty)] == "empty file"
    assert errors[str(truncated)].startswith(("truncated", "undecodable"))
    assert errors[str(missing)] == "no such file"
    assert f"{text}: not an image" in captured.err


def test_predict_from_the_registry_champion_and_bad_model_locations(model_dir, test_images, tmp_path,
                                                                    capsys):
    reg = ModelRegistry(str(tmp_path / "reg"), "digits")
    reg.promote(reg.publish(model_dir))
    paths, _ = test_images
    assert main(["predict", "--model", str(tmp_path / "reg" / "models" / "digits"), paths[0],
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"]
    assert main(["predict", "--model", str(tmp_path), paths[0]]) == 2
    assert "neither an exported model" in capsys.readouterr().err


def test_predictions_from_raw_images_are_mostly_right(model_dir, test_images):
    from triview.predict import Predictor

    paths, labels = test_images
    results = Predictor(str(model_dir)).predict(paths)
    accuracy = np.mean([r.labels[0][0] == y for r, y in zip(results, labels)])
    assert accuracy > 0.3  # 3 epochs on 400 digits: far above chance (0.1)


def test_predict_from_an_s3_model_and_exif_rotated_photos(model_dir, test_images, s3_endpoint, tmp_path):
    """A model folder on S3 predicts what the local one does; a photo stored sideways
    with an EXIF orientation is turned upright before the crops are cut."""
    from PIL import Image

    from triview import storage
    from triview.predict import Predictor

    paths, _ = test_images
    storage.copy_tree(model_dir, f"s3://{BUCKET}/models/digits")
    local = Predictor(str(model_dir)).predict(paths[:4], threshold=0.0)
    remote = Predictor(f"s3://{BUCKET}/models/digits").predict(paths[:4], threshold=0.0)
    assert [r.labels for r in remote] == [r.labels for r in local]

    upright = Image.open(paths[0]).convert("RGB").resize((96, 64))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    sideways.save(tmp_path / "exif.png", exif=exif)
    sideways.save(tmp_path / "sideways.png")
    scores = {name: dict(r.labels) for name, r in zip(
        ("upright", "exif", "sideways"),
        Predictor(str(model_dir)).predict([str(tmp_path / f"{n}.png") for n in ("upright", "exif", "sideways")],
                                          threshold=0.0))}
    assert scores["exif"] == pytest.approx(scores["upright"], abs=1e-6)
    assert scores["sideways"] != pytest.approx(scores["upright"], abs=1e-3)  # orientation matters


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    small = (rng.random((height // 16 + 1, width // 16 + 1, 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def test_one_decode_gives_the_views_the_training_path_cuts(model_dir):
    """Predictor decodes each file once (PIL, a kept JPEG at the DCT scale cropping will
    use) and cuts the views from those pixels; calibrate-and-crop decodes what ingest
    stored (the original bytes or a normalised PNG) with OpenCV. The views are the same
    bytes, for JPEGs at DCT scales 1 to 8, grey JPEGs, PNGs, and files ingest normalises
    (EXIF-rotated JPEG, RGBA PNG)."""
    import io

    from PIL import Image

    from triview import crop, validate
    from triview.predict import Predictor

    predictor = Predictor(str(model_dir))

    def encoded(array, fmt, **kw) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    rotated = Image.fromarray(_photo(640, 480, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6
    files = {f"jpeg {w}x{h}": encoded(_photo(w, h, w), "JPEG", quality=90)
             for w, h in ((97, 61), (320, 240), (640, 480), (1280, 960), (2600, 1900),
                                                          (4100, 3000))}
    files["grey jpeg"] = encoded(_photo(1600, 1200, 1)[:, :, 0], "JPEG")
    files["png"] = encoded(_photo(1500, 1000, 2), "PNG")
    files["rgba png"] = encoded(np.dstack([_photo(500, 400, 4), _photo(500, 400, 5)[:, :, 0]]), "PNG")
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif)
    files["exif-rotated jpeg"] = buffer.getvalue()
    reductions = set()
    for name, data in files.items():
        stored = validate.decode(data, min_size=1)
        if not stored.keep_suffix:
            buffer = io.BytesIO()
            stored.image.save(buffer, format="PNG")
        kept = data if stored.keep_suffix else buffer.getvalue()
        want = predictor.cropper.views_of_bytes(kept, jpeg=stored.keep_suffix == ".jpg")
        got = predictor.views_of_bytes(data)
        assert got.keys() == want.keys()
        for view in want:
            assert np.array_equal(got[view], want[view]), (name, view)
        if stored.keep_suffix == ".jpg":
            reductions.add(crop.choose_reduction(*stored.source_size, predictor.geometry))
    assert reductions == {1, 2, 4, 8}


def test_the_predictor_decodes_each_file_once(model_dir, monkeypatch):
    """Validation's decode is the only one: the cropper's own decoder is never called."""
    import io

    from PIL import Image

    from triview import crop
    from triview.predict import Predictor

    def second_decode(*args, **kwargs):
        raise AssertionError("decoded a second time")

    monkeypatch.setattr(crop, "decode_bgr_bytes", second_decode)
    predictor = Predictor(str(model_dir))
    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.fromarray(_photo(1280, 960, 7)).save(buffer, format=fmt)
        assert set(predictor.views_of_bytes(buffer.getvalue())) == set(predictor.card["views"])


def test_a_run_folder_is_a_model(model_dir, test_images, tmp_path, capsys):
    """`triview predict --model RUN_OUT` (and serve's check) find the model through the
    run's run_summary.json; a summary whose model is gone names it."""
    from triview.serving import check_model
    from triview.summary import SUMMARY_FILE

    paths, _ = test_images
    out = tmp_path / "runs" / "photos"
    out.mkdir(parents=True)
    (out / SUMMARY_FILE).write_text(json.dumps({"artifacts": {"model": str(model_dir)}}))
    assert main(["predict", "--model", str(out), *paths[:3], "--format", "json"]) == 0
    from_run = capsys.readouterr().out
    assert main(["predict", "--model", str(model_dir), *paths[:3], "--format", "json"]) == 0
    assert from_run == capsys.readouterr().out and len(from_run.splitlines()) == 3
    check_model(str(out))
    (out / SUMMARY_FILE).write_text(json.dumps({"artifacts": {"model": str(tmp_path / "gone")}}))
    assert main(["predict", "--model", str(out), *paths[:1]]) == 2
    assert "names the model folder" in capsys.readouterr().err
