import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from triview import manifest as mf
from triview.cli import main
from triview.demo import write_digits
from triview.ingest import IngestError, ingest
from triview.shards import read_index, read_member, split_ref


@pytest.fixture()
def messy(tmp_path):
    """Real digits plus every kind of bad file the skeleton must account for."""
    root = tmp_path / "messy"
    write_digits(root, per_class=10)
    good = sorted((root / "1").glob("*.jpg"))[0]
    (root / "1" / "empty.jpg").write_bytes(b"")
    (root / "2" / "notes.jpg").write_text("this is not an image")
    data = good.read_bytes()
    (root / "3" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    shutil.copy(good, root / "4" / "copy of one.jpg")          # exact duplicate, other class
    shutil.copy(good, root / "loose.jpg")                        # no class folder
    (root / "5" / "nested" / "deeper").mkdir(parents=True)
    with Image.open(sorted((root / "5").glob("*.jpg"))[0]) as img:  # same picture, other bytes
        img.save(root / "5" / "nested" / "deeper" / "ü b.png")
    return root


def test_every_input_file_is_used_or_quarantined_with_a_reason(messy, tmp_path):
    out = tmp_path / "out"
    result = ingest(messy, out)
    n_files = sum(1 for p in messy.rglob("*") if p.is_file())
    assert result.n_input == n_files == len(result.manifest) + len(result.quarantine)
    reasons = dict(zip(result.quarantine["path"], result.quarantine["reason"]))
    assert reasons["1/empty.jpg"] == "empty_file"
    assert reasons["2/notes.jpg"] == "not_an_image"
    assert reasons["3/truncated.jpg"] == "truncated"
    assert reasons["loose.jpg"] == "no_label"
    dup = [p for p, r in reasons.items() if r == "exact_duplicate"]
    assert len(dup) == 1
    # the nested PNG with a space and a non-ASCII name is used
    assert len(result.manifest) == 101
    assert "5/nested/deeper/ü b.png" in set(result.manifest["original_path"])
    on_disk = mf.read_manifest(out)
    assert set(on_disk.columns) >= set(mf.IMAGE_COLUMNS)
    # every image stored once, in WebDataset shards with their index, and nothing else
    index = read_index(out)
    assert set(index) == {"images/000000.tar"} and not [p for p in (out / "images").iterdir()
                                                         if p.name != "000000.tar"]
    members = {m for entry in index.values() for m in entry["members"]}
    assert sorted(members) == sorted(split_ref(p)[1] for p in on_disk["path"])
    assert all(p.startswith("images/000000.tar#") for p in on_disk["path"])
    with tarfile.open(out / "images" / "000000.tar") as tar:  # a plain tar any tool reads
        assert sorted(tar.getnames()) == sorted(members)
    q = pd.read_csv(out / mf.QUARANTINE_FILE)
    assert list(q.columns) == list(mf.QUARANTINE_COLUMNS) and len(q) == 5


def test_split_is_stratified_grouped_and_stable(ingested, digits_dir, tmp_path):
    table = mf.read_manifest(ingested)
    counts = table.groupby(["label", "split"]).size().unstack()
    assert (counts > 0).all().all(), "every class appears in every split"
    shares = table["split"].value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.15, abs=0.04)  # 400 images: 15 % +- 2 SD
    assert shares["val"] == pytest.approx(0.15, abs=0.04)
    assert table.groupby("source_id")["split"].nunique().max() == 1
    by_id = table.set_index("image_id")["split"]
    # the same input gives the same split; the split is a function of the salt only
    again = ingest(digits_dir, tmp_path / "again").manifest
    assert (again.set_index("image_id")["split"] == by_id).all()
    other = ingest(digits_dir, tmp_path / "other", split_salt="redraw").manifest
    assert (other.set_index("image_id")["split"] != by_id).mean() > 0.15
    stats = json.loads((ingested / mf.STATS_JSON_FILE).read_text())
    dataset = json.loads((ingested / mf.DATASET_FILE).read_text())
    assert dataset["split"]["salt"] == "triview-split-v1" == stats["split"]["salt"]
    assert dataset["split"]["method"] == "hash" and dataset["split"]["forced"] == []
    balance = stats["split"]["class_balance"]
    assert balance["test"]["images"] == (table["split"] == "test").sum()
    assert sum(balance["train"]["class_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert 0 < balance["test"]["max_share_difference"] < 0.1


def test_a_growing_data_set_keeps_every_image_in_its_split(tmp_path):
    """The scheduled-retraining case: the second run sees the first run's 200 images and
    100 new ones; no common image changes split, so no test image was ever trained on."""
    write_digits(tmp_path / "small", per_class=20)
    write_digits(tmp_path / "grown", per_class=30)  # the first 20 per class are the same files
    small = ingest(tmp_path / "small", tmp_path / "a").manifest.set_index("original_path")
    grown = ingest(tmp_path / "grown", tmp_path / "b").manifest.set_index("original_path")
    common = small.index.intersection(grown.index)
    assert len(common) == 200
    assert (small.loc[common, "split"] == grown.loc[common, "split"]).all()
    seen_before = set(small.index[small["split"].isin(["train", "val"])])
    assert not seen_before & set(grown.index[grown["split"] == "test"])


def test_small_classes_get_an_image_in_every_split_and_the_move_is_reported(tmp_path):
    write_digits(tmp_path / "d", per_class=3)
    result = ingest(tmp_path / "d", tmp_path / "out")
    counts = result.manifest.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert (counts == 1).all().all()  # 3 photos per class: one in each split
    forced = json.loads((tmp_path / "out" / mf.DATASET_FILE).read_text())["split"]["forced"]
    assert forced and {f["split"] for f in forced} <= {"train", "val", "test"}
    moved = result.manifest.set_index("source_id")["split"]
    assert all(moved[f["source_id"]] == f["split"] for f in forced)
    with pytest.raises(IngestError, match="fewer than 3 source images"):
        write_digits(tmp_path / "two", per_class=2)
        ingest(tmp_path / "two", tmp_path / "o2")


def test_zip_input_with_a_wrapping_folder(tmp_path):
    src = tmp_path / "src" / "dataset"
    write_digits(src, per_class=6)
    archive = tmp_path / "digits.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in src.rglob("*.jpg"):
            zf.write(p, p.relative_to(tmp_path / "src").as_posix())
    result = ingest(archive, tmp_path / "out")
    assert len(result.manifest) == 60 and result.classes == [str(d) for d in range(10)]


def test_zip_slip_is_quarantined_and_nothing_is_extracted(tmp_path):
    write_digits(tmp_path / "src", per_class=4)
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "src").rglob("*.jpg")):
            zf.write(p, p.relative_to(tmp_path / "src").as_posix())
        zf.writestr("../outside.jpg", (tmp_path / "src" / "0" / "digit_0000.jpg").read_bytes())
        zf.writestr("/abs/evil.jpg", b"x")
    result = ingest(archive, tmp_path / "work" / "out")
    reasons = dict(zip(result.quarantine["path"], result.quarantine["reason"]))
    assert reasons == {"../outside.jpg": "zip_unsafe_path", "/abs/evil.jpg": "zip_unsafe_path"}
    assert not (tmp_path / "work" / "outside.jpg").exists() and not Path("/abs/evil.jpg").exists()


def test_class_too_small_to_split_names_the_class(tmp_path):
    write_digits(tmp_path / "d", per_class=5)
    for p in sorted((tmp_path / "d" / "7").glob("*.jpg"))[2:]:
        p.unlink()
    with pytest.raises(IngestError, match="'7' \\(2\\)"):
        ingest(tmp_path / "d", tmp_path / "out")


def test_ingest_cli(tmp_path, capsys):
    write_digits(tmp_path / "d", per_class=5)
    assert main(["ingest", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 0
    assert "50 files" in capsys.readouterr().out
    assert (tmp_path / "o" / mf.MANIFEST_FILE).is_file()
    assert main(["ingest", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_decodable_originals_are_kept_byte_for_byte_and_rotated_ones_normalised(tmp_path):
    root = tmp_path / "d"
    write_digits(root, per_class=3)
    rotated = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rotated.save(root / "1" / "rotated.jpg", exif=exif)
    cmyk = Image.new("CMYK", (30, 30), (0, 255, 255, 0))
    cmyk.save(root / "2" / "cmyk.jpg")
    result = ingest(root, tmp_path / "out")
    m = result.manifest.set_index("original_path")
    plain = m.loc["0/" + sorted(p.name for p in (root / "0").glob("*.jpg"))[0]]
    assert plain["path"].endswith(".jpg")
    assert read_member(tmp_path / "out", plain["path"]) == (root / plain.name).read_bytes()
    rot = m.loc["1/rotated.jpg"]
    assert rot["path"].endswith(".png") and (rot["width"], rot["height"]) == (20, 40)
    assert m.loc["2/cmyk.jpg"]["path"].endswith(".png")
    with Image.open(io.BytesIO(read_member(tmp_path / "out", m.loc["2/cmyk.jpg"]["path"]))) as img:
        assert img.mode == "RGB" and img.getpixel((5, 5))[0] > 200


def test_progress_bar_on_request(tmp_path, capsys):
    write_digits(tmp_path / "d", per_class=3)
    ingest(tmp_path / "d", tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "ingest" in err and "30/30" in err


def test_a_val_split_given_for_some_classes_is_carved_for_the_others(tmp_path):
    """train/ for every class, val/ for digits 0-4 only: digits 5-9 get a val split carved
    from their own photos (and every class a test split), which dataset.json names."""
    write_digits(tmp_path / "flat", per_class=12)
    root = tmp_path / "given"
    for folder in sorted((tmp_path / "flat").iterdir()):
        photos = sorted(folder.glob("*.jpg"))
        for i, photo in enumerate(photos):
            split = "val" if folder.name in "01234" and i < 3 else "train"
            (root / split / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / split / folder.name / photo.name)
    result = ingest(root, tmp_path / "out")
    table = result.manifest
    per_class = table.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert (per_class[["train", "val", "test"]] > 0).all().all(), per_class
    given_val = table["original_path"].str.startswith("val/")
    assert (table.loc[given_val, "split"] == "val").all()          # given splits stay put
    assert not ((table["label"] <= "4") & ~given_val & (table["split"] == "val")).any()
    split = json.loads((tmp_path / "out" / mf.DATASET_FILE).read_text())["split"]
    assert split["carved_for_class"] == {str(d): ["test", "val"] for d in range(5, 10)}


def test_a_class_given_only_as_val_is_refused_by_name(tmp_path):
    write_digits(tmp_path / "flat", per_class=6)
    root = tmp_path / "given"
    for folder in sorted((tmp_path / "flat").iterdir()):
        split = "val" if folder.name == "7" else "train"
        shutil.copytree(folder, root / split / folder.name)
    with pytest.raises(IngestError, match="no image outside the given val/test split.*'7'"):
        ingest(root, tmp_path / "out")
