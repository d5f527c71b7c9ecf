"""Ingest sources and label operations: CSV/Parquet multi-label tables, YOLO/Roboflow
ZIPs with data.yaml, carving a validation split, remap/drop/min-per-class."""
from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from triview import manifest as mf
from triview.cli import main
from triview.ingest import IngestError, ingest, parse_remap, source_id_of, split_position
from triview.shards import read_index, read_member, split_ref
from triview.validate import decode, near_duplicate_pairs


def _jpeg(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def multilabel(tmp_path):
    """40 images with 1-2 of the labels sky/sea/sand, listed in a table."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    label_sets = [("sky",), ("sea",), ("sand",), ("sky", "sea"), ("sea", "sand")]
    for i in range(40):
        name = f"beach {i:02d}.jpg"
        (folder / name).write_bytes(_jpeg(i))
        rows.append((f"photos/{name}", label_sets[i % len(label_sets)]))
    rows.append(("photos/missing.jpg", ("sky",)))
    rows.append(("photos/beach 00.jpg", ()))      # listed twice, once without labels
    return tmp_path, rows


def test_csv_with_semicolon_labels(multilabel):
    root, rows = multilabel
    pd.DataFrame({"path": [r for r, _ in rows], "labels": [";".join(ls) for _, ls in rows]}) \
        .to_csv(root / "labels.csv", index=False)
    result = ingest(root / "labels.csv", root / "out")
    assert result.n_input == len(rows) == len(result.manifest) + len(result.quarantine)
    reasons = dict(zip(result.quarantine["path"], result.quarantine["reason"]))
    assert reasons == {"photos/missing.jpg": "missing_file", "photos/beach 00.jpg": "no_label"}
    m = result.manifest.set_index("original_path")
    assert m.loc["photos/beach 03.jpg", "labels"] == "sky;sea"
    assert m.loc["photos/beach 03.jpg", "label"] == "sky"
    assert result.classes == ["sand", "sea", "sky"]
    assert result.statistics["multi_label"] is True
    stats = pd.read_csv(root / "out" / mf.STATS_FILE).set_index("class")
    assert stats.loc["sea", "images"] == 24   # a multi-label image counts for each label


def test_parquet_with_one_column_per_label_and_a_given_split(multilabel):
    root, rows = multilabel
    names = ["sky", "sea", "sand"]
    table = pd.DataFrame({"filename": [r for r, _ in rows[:40]],
                          **{n: [int(n in ls) for _, ls in rows[:40]] for n in names},
                          "split": ["train"] * 30 + ["valid"] * 5 + ["test"] * 5})
    table.to_parquet(root / "labels.parquet")
    result = ingest(root / "labels.parquet", root / "out")
    assert result.classes == names               # column order is the class map
    assert result.manifest.groupby("split").size().to_dict() == {"test": 5, "train": 30, "val": 5}
    assert (root / "out" / mf.MAPPING_FILE).read_text() == "0 sky\n1 sea\n2 sand\n"


def _roboflow_zip(path, splits=("train", "test"), names="names: ['ant', 'bee']\n", per=8):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ds/data.yaml", names)
        seed = 0
        for split in splits:
            for cls in ("ant", "bee", "1"):
                for k in range(per if split == "train" else 2):
                    zf.writestr(f"ds/{split}/{cls}/p{seed}_jpg.rf.{seed:020x}.jpg", _jpeg(seed))
                    seed += 1


def test_roboflow_zip_without_valid_split_carves_one_from_train(tmp_path):
    _roboflow_zip(tmp_path / "rf.zip")
    result = ingest(tmp_path / "rf.zip", tmp_path / "out", split_fractions=(0.7, 0.2, 0.1))
    m = result.manifest
    # folder "1" is names[1] = bee; test split kept exactly as given
    assert result.classes == ["ant", "bee"]
    given_test = m["original_path"].str.startswith("ds/test/")
    assert (m.loc[given_test, "split"] == "test").all()
    assert set(m.loc[~given_test, "split"]) == {"train", "val"}
    assert m.loc[m["split"] == "val", "label"].nunique() == 2
    with pytest.raises(IngestError, match="'old->new'"):
        parse_remap(["nonsense"])


def test_data_yaml_names_as_a_map_and_cli_validation_split(tmp_path):
    _roboflow_zip(tmp_path / "rf.zip", splits=("train",), names="names:\n  0: ant\n  1: bee\n")
    assert main(["ingest", "--data", str(tmp_path / "rf.zip"), "--out", str(tmp_path / "o"),
                 "--validation-split", "0.2", "--test-fraction", "0.2"]) == 0
    m = mf.read_manifest(tmp_path / "o")
    # 24 images ("1" is bee by its index): 20% each for val and test, by each photo's
    # salted hash: test below 0.2, val below 0.4 (unless a small class needed a move)
    import json

    forced = {f["source_id"] for f in
              json.loads((tmp_path / "o" / mf.DATASET_FILE).read_text())["split"]["forced"]}
    for sid, split in m.groupby("source_id")["split"].first().items():
        u = split_position(sid)
        assert sid in forced or split == ("test" if u < 0.2 else "val" if u < 0.4 else "train")
    assert set(m["split"]) == {"train", "val", "test"} and len(m) == 24


def test_label_operations_remap_drop_and_minimum(tmp_path):
    root = tmp_path / "d"
    counts = {"cat": 6, "kitty": 3, "dog": 7, "rare": 2, "junk": 4}
    seed = 0
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for _ in range(n):
            (root / cls / f"{seed}.jpg").write_bytes(_jpeg(seed))
            seed += 1
    result = ingest(root, tmp_path / "out", remap=parse_remap(["kitty->cat"]), drop=("junk",),
                    min_per_class=3)
    assert result.classes == ["cat", "dog"]
    assert (result.manifest["label"] == "cat").sum() == 9
    q = result.quarantine.groupby("reason").size().to_dict()
    assert q == {"dropped_label": 4, "class_below_minimum": 2}
    assert result.n_input == sum(counts.values()) == len(result.manifest) + len(result.quarantine)
    # the quarantined images were not left in the output folder: its shards hold exactly
    # the manifest's images
    index = read_index(tmp_path / "out")
    stored = [m for entry in index.values() for m in entry["members"]]
    assert sorted(stored) == sorted(split_ref(p)[1] for p in result.manifest["path"])
    for shard, entry in index.items():
        with tarfile.open(tmp_path / "out" / shard) as tar:
            assert sorted(tar.getnames()) == sorted(entry["members"])
    assert all(read_member(tmp_path / "out", p) for p in result.manifest["path"])


def test_too_few_images_for_the_splits_names_the_class_and_keeps_the_report(tmp_path, capsys):
    root = tmp_path / "d"
    for cls, n in (("a", 6), ("b", 6), ("c", 2)):
        (root / cls).mkdir(parents=True)
        for k in range(n):
            (root / cls / f"{k}.jpg").write_bytes(_jpeg(hash((cls, k)) % 10_000))
    (root / "c" / "broken.jpg").write_bytes(b"")
    assert main(["ingest", "--data", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'c' (2)" in err and "--min-per-class" in err and "Traceback" not in err
    assert pd.read_csv(tmp_path / "o" / mf.QUARANTINE_FILE)["reason"].tolist() == ["empty_file"]
    assert main(["ingest", "--data", str(root), "--out", str(tmp_path / "o2"),
                 "--min-per-class", "3"]) == 0


def test_decoder_details():
    webp = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(webp, format="WEBP")
    d = decode(webp.getvalue())
    assert d.reason is None and d.format == "WEBP" and d.keep_suffix == ".webp"
    bomb = io.BytesIO()
    Image.new("L", (300, 300)).save(bomb, format="PNG")
    assert decode(bomb.getvalue(), max_pixels=50_000).reason == "decompression_bomb"
    assert decode(b"GIF89a" + bytes(20)).reason == "undecodable"
    assert decode(b"Just text, no picture.").reason == "not_an_image"
    assert decode(b"\x00\x00\x00\x1cftypavif" + bytes(40)).reason == "unsupported_format"
    assert source_id_of("train/cat/IMG_1_jpg.rf.0123456789abcdef0123.jpg") == "train/cat/IMG_1_jpg"


def test_near_duplicate_pairs_are_exact_and_linear():
    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**63, 5000, dtype=np.int64)]
    hashes[10] = hashes[20] ^ 0b101          # distance 2
    hashes[30] = hashes[40] ^ (1 << 63 | 1)   # distance 2 across the outer bands
    pairs = near_duplicate_pairs(hashes, 3)
    assert (10, 20, 2) in pairs and (30, 40, 2) in pairs
    brute = {(i, j) for i in range(0, 50) for j in range(i + 1, 50)
             if bin(hashes[i] ^ hashes[j]).count("1") <= 3}
    assert brute <= {(i, j) for i, j, _ in pairs}


def test_special_files_and_a_broken_class_map_are_reported_not_fatal(tmp_path):
    import os

    root = tmp_path / "d"
    seed = 0
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for _ in range(4):
            (root / cls / f"{seed}.jpg").write_bytes(_jpeg(seed))
            seed += 1
    os.mkfifo(root / "a" / "pipe.jpg")            # reading it would block forever
    (root / "data.yaml").write_text("names: [unclosed\n")
    result = ingest(root, tmp_path / "out")
    q = result.quarantine.set_index("path")
    assert q.loc["a/pipe.jpg", "reason"] == "special_file"
    assert q.loc["data.yaml", "reason"] == "metadata" and "ignored" in q.loc["data.yaml", "detail"]
    assert result.classes == ["a", "b"] and len(result.manifest) == 8
    assert set(result.quarantine["reason"]) <= set(mf.QUARANTINE_REASONS)


def test_one_class_folder_is_a_class_not_a_wrapper_and_ingest_refuses_it(tmp_path):
    """``data/cat/*.jpg`` is one class, ``cat`` (it used to be taken for a wrapping folder,
    and every file quarantined as "not inside a class folder"); ingest refuses one class
    after decoding, with the layout that works, and keeps the quarantine report."""
    from triview.sources import open_source

    root = tmp_path / "one"
    (root / "cat").mkdir(parents=True)
    for k in range(4):
        (root / "cat" / f"{k}.jpg").write_bytes(_jpeg(k))
    source = open_source(root)
    assert {it.labels for it in source.items} == {("cat",)}
    with pytest.raises(IngestError, match=r"only one class, 'cat' \(4 usable images\).*<class>/<image>"):
        ingest(root, tmp_path / "out")
    assert (tmp_path / "out" / mf.QUARANTINE_FILE).is_file()
    # two classes, one of whose files are all unusable, leave one class after decoding
    (root / "dog").mkdir()
    (root / "dog" / "broken.jpg").write_bytes(b"")
    with pytest.raises(IngestError, match="only one class, 'cat'"):
        ingest(root, tmp_path / "out2")


def test_the_wrapping_folder_is_not_part_of_the_source_id(tmp_path):
    from triview.sources import open_source

    with zipfile.ZipFile(tmp_path / "w.zip", "w") as zf:
        for label in ("a", "b"):
            zf.writestr(f"export/{label}/x.jpg", _jpeg(ord(label)))
    items = open_source(tmp_path / "w.zip").items
    assert [(it.rel, it.data_path, it.labels) for it in items] == [
        ("export/a/x.jpg", "a/x.jpg", ("a",)), ("export/b/x.jpg", "b/x.jpg", ("b",))]
    assert source_id_of(items[0].data_path) == "a/x"
