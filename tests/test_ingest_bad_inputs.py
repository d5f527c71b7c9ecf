"""The committed bad-input corpus (tests/fixtures, made by make_bad_inputs.py): every
file is used or quarantined with exactly the expected reason, nothing crashes, and
what ingest keeps is 8-bit RGB that the next stage can read."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from s3_server import BUCKET, moto_server, s3_endpoint  # noqa: F401

from triview import manifest as mf
from triview.cli import main
from triview.ingest import IngestError, ingest
from triview.shards import read_member, split_ref

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def expected(prefix: str) -> dict[str, str]:
    with open(FIXTURES / "expected_bad_inputs.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {r["input"][len(prefix):]: r["outcome"] for r in rows if r["input"].startswith(prefix)}


def outcomes(out: Path) -> dict[str, str]:
    table = mf.read_manifest(out)
    q = pd.read_csv(out / mf.QUARANTINE_FILE, keep_default_na=False)
    got = {p: "used" for p in table["original_path"]}
    for path, reason in zip(q["path"], q["reason"]):
        assert path not in got, f"{path} both used and quarantined"
        got[path] = reason
    assert len(got) == len(table) + len(q), "one row per input file"
    assert set(q["reason"]) <= set(mf.QUARANTINE_REASONS), "machine-readable reasons only"
    return got


def test_fixture_is_small_and_reproducible(tmp_path):
    size = sum(p.lstat().st_size for p in FIXTURES.rglob("*") if p.is_file() or p.is_symlink())
    assert size < 1_000_000
    spec = importlib.util.spec_from_file_location("make_bad_inputs", FIXTURES / "make_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(tmp_path)
    assert (tmp_path / "expected_bad_inputs.csv").read_text() == \
        (FIXTURES / "expected_bad_inputs.csv").read_text()


def test_folder_corpus_every_file_accounted_with_its_reason(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ingest", "--data", str(FIXTURES / "bad_inputs"), "--out", str(out)]) == 0
    want = expected("bad_inputs/")
    n_files = sum(1 for p in (FIXTURES / "bad_inputs").rglob("*") if p.is_file() or p.is_symlink())
    assert len(want) == n_files
    assert outcomes(out) == want
    assert f"{n_files} files" in capsys.readouterr().out

    table = mf.read_manifest(out).set_index("original_path")
    for rel, row in table.iterrows():   # what calibrate-and-crop will read
        bgr = cv2.imdecode(np.frombuffer(read_member(out, row["path"]), np.uint8), cv2.IMREAD_COLOR)
        assert bgr is not None and bgr.dtype == np.uint8 and bgr.shape[:2] == (row["height"], row["width"])
    assert tuple(table.loc["cat/rotated exif.jpg", ["width", "height"]]) == (40, 48)
    assert table.loc["cat/webp saved as.jpg", "path"].endswith(".webp")
    assert table.loc["cat/webp saved as.jpg", "format"] == "webp"
    src16 = np.asarray(Image.open(FIXTURES / "bad_inputs/cat/sixteen bit.png"), dtype=np.float64) / 257
    with Image.open(io.BytesIO(read_member(out, table.loc["cat/sixteen bit.png", "path"]))) as img:
        assert img.mode == "RGB"
        assert abs(np.asarray(img.convert("L"), dtype=np.float64).mean() - src16.mean()) < 2
    with Image.open(io.BytesIO(read_member(out, table.loc["cat/nested/deeper/ålpha ü.png", "path"]))) as img:
        assert img.mode == "RGB"   # alpha composited on white, not dropped to black
    assert classes_of(out) == ["cat", "dog", "bird ü"]   # data.yaml order
    assert (out / mf.MAPPING_FILE).read_text(encoding="utf-8") == "0 cat\n1 dog\n2 bird ü\n"

    near = pd.read_csv(out / mf.NEAR_DUPLICATES_FILE)
    assert {"cat/plain one.jpg", "dog/near copy of cat.jpg"} == set(near.iloc[0][["path_a", "path_b"]])
    stats = json.loads((out / mf.STATS_JSON_FILE).read_text())
    assert stats["exact_duplicates"] == 1 and stats["near_duplicate_pairs"] >= 1
    assert stats["input_files"] == n_files == stats["used"] + stats["quarantined"]
    assert set(stats["formats"]) >= {"jpeg", "png", "webp", "gif", "bmp", "tiff"}
    per_class = pd.read_csv(out / mf.STATS_FILE)
    assert list(per_class["class"]) == ["cat", "dog", "bird ü"]
    assert (out / mf.STATS_PLOT_FILE).stat().st_size > 1000
    version = json.loads((out / mf.DATASET_FILE).read_text())["dataset_version"]
    assert version == mf.dataset_version(out) == stats["dataset_version"]
    assert set(json.loads((out / mf.DATASET_FILE).read_text())["counts"]) >= {"train", "val", "test"}


def classes_of(out: Path) -> list[str]:
    return mf.read_classes(out)


def test_zip_corpus_every_entry_accounted_and_nothing_extracted(tmp_path):
    out = tmp_path / "work" / "out"
    assert main(["ingest", "--data", str(FIXTURES / "bad_inputs.zip"), "--out", str(out)]) == 0
    assert outcomes(out) == expected("bad_inputs.zip:")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]
    assert not Path("/etc/absolute.jpg").exists()
    table = mf.read_manifest(out)
    # splits come from the train/valid/test folders; the "2" folder is data.yaml's index 2
    assert table.groupby("split").size().to_dict() == {"train": 12, "val": 3, "test": 3}
    assert set(table["label"]) == {"cat", "dog", "bird"}
    assert (table["original_path"].str.split("/").str[1].map(
        {"train": "train", "valid": "val", "test": "test"}) == table["split"]).all()
    assert mf.read_classes(out) == ["cat", "dog", "bird"]


def test_ingest_output_feeds_calibrate_and_crop(tmp_path):
    from triview.stages import calibrate_and_crop_stage

    ingest(FIXTURES / "bad_inputs", tmp_path / "ingested")
    calibrate_and_crop_stage(tmp_path / "ingested", tmp_path / "cropped", image_size=16)
    views = mf.read_views(tmp_path / "cropped")
    assert len(views) == 3 * len(mf.read_manifest(tmp_path / "ingested"))


def test_s3_prefix_source_and_s3_output(s3_endpoint, tmp_path):
    from triview.storage import S3Store

    store = S3Store()
    root = FIXTURES / "bad_inputs"
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            store.put_bytes(f"s3://{BUCKET}/raw/{p.relative_to(root).as_posix()}", p.read_bytes())
    out = tmp_path / "out"
    assert main(["ingest", "--data", f"s3://{BUCKET}/raw", "--out", str(out)]) == 0
    want = {k: v for k, v in expected("bad_inputs/").items() if v != "symlink_escape"}
    assert outcomes(out) == want
    local = mf.read_manifest(out)

    # the same ingest written straight to the bucket, manifest last
    result = ingest(f"s3://{BUCKET}/raw", f"s3://{BUCKET}/ingested")
    keys = {k for k, _ in store.list(f"s3://{BUCKET}/ingested")}
    assert {"ingested/manifest.csv", "ingested/quarantine.csv", "ingested/dataset.json"} <= keys
    assert {f"ingested/{split_ref(p)[0]}" for p in local["path"]} | {"ingested/shards.json"} <= keys
    assert store.get_bytes(f"s3://{BUCKET}/ingested/manifest.csv") == (out / mf.MANIFEST_FILE).read_bytes()
    assert result.dataset_version == mf.dataset_version(out)


def test_unreadable_input_is_a_clear_error_not_a_trace(tmp_path, capsys):
    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 broken")
    assert main(["ingest", "--data", str(tmp_path / "not.zip"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    (only_bad / "a").mkdir(parents=True)
    (only_bad / "b").mkdir()
    for i in range(3):   # two classes of three files each: the layout passes the pre-flight check
        (only_bad / "a" / f"x{i}.jpg").write_bytes(b"")
        (only_bad / "b" / f"y{i}.jpg").write_bytes(b"not a jpeg")
    # readable, but nothing usable: the CLI still accounts for every file and exits 0
    assert main(["ingest", "--data", str(only_bad), "--out", str(tmp_path / "o2")]) == 0
    assert "no usable images" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "o2" / mf.QUARANTINE_FILE)["reason"].tolist() == ["empty_file"] * 3 + ["not_an_image"] * 3
    assert len(mf.read_manifest(tmp_path / "o2")) == 0
    with pytest.raises(IngestError, match="all quarantined"):   # the pipeline stage refuses
        ingest(only_bad, tmp_path / "o3")


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_and_single_process_agree(tmp_path, workers):
    from triview.demo import write_digits

    write_digits(tmp_path / "d", per_class=25)   # 250 files: above the pool threshold
    a = ingest(tmp_path / "d", tmp_path / f"o{workers}", workers=workers)
    b = ingest(tmp_path / "d", tmp_path / "ref", workers=1)
    assert a.dataset_version == b.dataset_version


def test_s3_source_through_the_process_pool(s3_endpoint, tmp_path):
    from triview.demo import write_digits
    from triview.storage import S3Store

    write_digits(tmp_path / "d", per_class=21)   # 210 objects: above the pool threshold
    store = S3Store()
    for p in sorted((tmp_path / "d").rglob("*.jpg")):
        store.put_bytes(f"s3://{BUCKET}/digits/{p.relative_to(tmp_path / 'd').as_posix()}",
                        p.read_bytes())
    pooled = ingest(f"s3://{BUCKET}/digits", tmp_path / "pooled", workers=2)
    local = ingest(tmp_path / "d", tmp_path / "local", workers=1)
    assert len(pooled.manifest) == 210 and len(pooled.quarantine) == 0
    assert pooled.dataset_version == local.dataset_version


def test_links_byte_cap_and_unreadable_folders_are_quarantined_with_their_reasons(tmp_path,
                                                                                monkeypatch):
    """``broken_symlink``, ``symlink_dir``, ``too_large`` and ``read_error`` (a folder the
    listing cannot open: tests run as root, who can open any folder, so its ``scandir``
    fails by injection, as a permission error would)."""
    import os

    from triview.demo import write_digits

    data = tmp_path / "data"
    write_digits(data, per_class=6)
    (data / "3" / "gone.jpg").symlink_to(data / "3" / "nothing-here.jpg")
    (data / "4" / "folder-link").symlink_to(data / "5")
    big = data / "6" / "big.jpg"
    big.write_bytes((data / "6" / "digit_0006.jpg").read_bytes() + b"\0" * 200_000)
    locked = data / "7" / "locked"
    locked.mkdir()
    (locked / "inside.jpg").write_bytes((data / "7" / "digit_0007.jpg").read_bytes())
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    ingest(data, out, max_file_bytes=100_000)
    got = outcomes(out)
    assert got["3/gone.jpg"] == "broken_symlink"
    assert got["4/folder-link"] == "symlink_dir"
    assert got["6/big.jpg"] == "too_large"
    assert got["7/locked/"] == "read_error"
    assert "7/locked/inside.jpg" not in got
    assert got["6/digit_0006.jpg"] == "used"


def test_s3_single_zip_and_parquet_objects(s3_endpoint, tmp_path):
    """An ``s3://`` source that is one ZIP object, or one Parquet table object whose paths
    lie below its prefix: read as the local ZIP / table would be."""
    from triview.demo import write_digits
    from triview.storage import S3Store

    store = S3Store()
    store.put_bytes(f"s3://{BUCKET}/zips/bad_inputs.zip", (FIXTURES / "bad_inputs.zip").read_bytes())
    out = tmp_path / "zip"
    assert main(["ingest", "--data", f"s3://{BUCKET}/zips/bad_inputs.zip", "--out", str(out)]) == 0
    assert outcomes(out) == expected("bad_inputs.zip:")

    write_digits(tmp_path / "d", per_class=5)
    rows = []
    for p in sorted((tmp_path / "d").rglob("*.jpg")):
        rel = p.relative_to(tmp_path / "d").as_posix()
        store.put_bytes(f"s3://{BUCKET}/table/{rel}", p.read_bytes())
        rows.append((rel, p.parent.name))
    table = pd.DataFrame(rows, columns=["path", "label"])
    table.to_parquet(tmp_path / "labels.parquet", index=False)
    store.put_bytes(f"s3://{BUCKET}/table/labels.parquet", (tmp_path / "labels.parquet").read_bytes())
    result = ingest(f"s3://{BUCKET}/table/labels.parquet", tmp_path / "parquet")
    assert len(result.manifest) == len(rows) and result.classes == sorted(set(table["label"]))
