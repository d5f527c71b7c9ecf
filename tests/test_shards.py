"""The crop-shard contract (triview.shards): WebDataset tar shards with an index, written
atomically, read back member by member through the index or in order by webdataset
itself, and never a read outside the folder."""

import io
import json
import tarfile

import pytest

from triview import shards


def _write(folder, items, max_bytes=shards.SHARD_BYTES, prefix="crops/whole"):
    with shards.ShardWriter(folder, prefix, max_bytes) as writer:
        refs = [writer.add(name, data) for name, data in items]
    shards.write_index(folder, writer.entries)
    return refs, writer.entries


def test_members_read_back_through_the_index_and_shards_roll_over_by_size(tmp_path):
    items = [(f"img{i:03d}.png", bytes([i]) * (700 + 13 * i)) for i in range(40)]
    refs, entries = _write(tmp_path, items, max_bytes=30 * 1024)
    # 40 members of 3-4 blocks with their header (~70 KB) in shards of at most 30 KB
    # (tar pads a closed archive to 10 KB records)
    assert len(entries) == 3
    for name, entry in entries.items():
        assert (tmp_path / name).stat().st_size == entry["bytes"] <= 30 * 1024
        assert entry["samples"] == len(entry["members"])
    assert sum(e["samples"] for e in entries.values()) == 40
    assert [shards.read_member(tmp_path, ref) for ref in refs] == [d for _, d in items]
    assert refs[0] == "crops/whole/000000.tar#img000.png"
    # every shard is a plain tar whose members are the items in writing order
    names = []
    for name in sorted(entries):
        with tarfile.open(tmp_path / name) as tar:
            names += tar.getnames()
    assert names == [n for n, _ in items]
    assert not list(tmp_path.rglob(".*"))  # no temporary file left behind


def test_webdataset_reads_the_shards_as_samples_keyed_by_image_id(tmp_path):
    wds = pytest.importorskip("webdataset", reason="webdataset is in the dev extra")
    items = [(f"id{i}.png", f"png-{i}".encode()) for i in range(7)]
    _, entries = _write(tmp_path, items, max_bytes=3 * 1024)
    urls = [str(tmp_path / name) for name in sorted(entries)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [(s["__key__"], s["png"]) for s in samples] == [(n[:-4], d) for n, d in items]


def test_a_member_larger_than_the_shard_size_gets_a_shard_of_its_own(tmp_path):
    refs, entries = _write(tmp_path, [("a.png", b"x" * 100), ("b.png", b"y" * 5000),
                                      ("c.png", b"z" * 100)], max_bytes=2048)
    assert [e["samples"] for _, e in sorted(entries.items())] == [1, 1, 1]
    assert shards.read_member(tmp_path, refs[1]) == b"y" * 5000


def test_a_failed_write_leaves_no_shard_and_no_index(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(tmp_path, "crops/whole") as writer:
            writer.add("a.png", b"1")
            raise RuntimeError("crop failed")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("name", ["a/b.png", "x#y.png", ".hidden.png"])
def test_member_names_that_would_break_the_reference_are_refused(tmp_path, name):
    with shards.ShardWriter(tmp_path, "crops/whole") as writer:
        with pytest.raises(ValueError, match="shard member name"):
            writer.add(name, b"1")


def test_a_member_written_twice_to_one_series_is_refused_before_it_is_written(tmp_path):
    with shards.ShardWriter(tmp_path, "crops/whole", max_bytes=10240) as writer:
        writer.add("a.png", b"1" * 9000)
        writer.add("b.png", b"2" * 9000)  # a second shard
        for name in ("a.png", "b.png"):
            with pytest.raises(ValueError, match="written twice to crops/whole/"):
                writer.add(name, b"3")
    assert [e["samples"] for _, e in sorted(writer.entries.items())] == [1, 1]


def test_nothing_outside_the_folder_is_opened(tmp_path):
    folder = tmp_path / "views"
    refs, _ = _write(folder, [("a.png", b"inside")])
    (tmp_path / "secret.tar").write_bytes(b"outside")
    index = json.loads((folder / shards.INDEX_FILE).read_text())
    for ref in ["../secret.tar", "/etc/passwd", "../secret.tar#a.png", "crops/../../secret.tar#a.png"]:
        with pytest.raises(ValueError, match="not a relative path inside its folder"):
            shards.read_member(folder, ref)
    # an index that names a shard outside the folder is refused as a whole
    index["shards"]["../secret.tar"] = {"samples": 1, "bytes": 7, "members": {"a.png": [0, 7]}}
    (folder / shards.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a relative path inside its folder"):
        shards.read_member(folder, refs[0])


def test_unknown_shards_members_and_truncated_shards_are_clear_errors(tmp_path):
    refs, entries = _write(tmp_path, [("a.png", b"a" * 600), ("b.png", b"b" * 600)])
    with pytest.raises(ValueError, match="is not in shards.json"):
        shards.read_member(tmp_path, "crops/whole/000009.tar#a.png")
    with pytest.raises(ValueError, match="is not a member of shard"):
        shards.read_member(tmp_path, "crops/whole/000000.tar#zz.png")
    shard = tmp_path / "crops/whole/000000.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # cut inside b.png
    assert shards.read_member(tmp_path, refs[0]) == b"a" * 600
    with pytest.raises(ValueError, match="truncated at 'b.png'"):
        shards.read_member(tmp_path, refs[1])


def test_an_index_of_another_format_is_refused_and_a_rewritten_index_is_reread(tmp_path):
    refs, entries = _write(tmp_path, [("a.png", b"first")])
    assert shards.read_member(tmp_path, refs[0]) == b"first"
    _write(tmp_path, [("a.png", b"second!")])  # same names, new shard and index
    assert shards.read_member(tmp_path, refs[0]) == b"second!"
    (tmp_path / shards.INDEX_FILE).write_text(json.dumps({"format": "tar", "version": 1, "shards": {}}))
    with pytest.raises(ValueError, match="not a version-1 webdataset shard index"):
        shards.read_member(tmp_path, refs[0])


def test_plain_files_still_read_as_before(tmp_path):
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "a.png").write_bytes(b"plain")
    assert shards.read_member(tmp_path, "crops/a.png") == b"plain"


def test_a_views_folder_holds_a_few_objects_however_many_crops(tmp_path):
    """calibrate-and-crop's output: its crops in one shard per view (they are small), so
    the artifact's object count does not grow with the photos."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_cache import _photos

    from triview import manifest as mf
    from triview.stages import calibrate_and_crop_stage, ingest_stage

    ingest_stage(str(_photos(tmp_path / "photos", 30)), tmp_path / "ingest", plot=False)
    calibrate_and_crop_stage(tmp_path / "ingest", tmp_path / "views", layout="horizontal", image_size=32)
    views = mf.read_views(tmp_path / "views")
    assert len(views) == 90
    tars = sorted(p.relative_to(tmp_path / "views").as_posix()
                  for p in (tmp_path / "views").rglob("*.tar"))
    # one shard per view and split (the crops are small): 9, plus the table and 4 JSON files
    assert tars == sorted(f"crops/{v}/{s}/000000.tar" for v in set(views["view"])
                          for s in ("train", "val", "test"))
    assert shards.objects(tmp_path / "views") == 9 + 5
    assert all(ref.split("#")[0] in tars for ref in views["path"])


def test_cropping_holds_a_few_chunks_in_flight_and_keeps_their_order():
    """calibrate-and-crop's pool: results come back in order, and no more than ``window``
    chunks are submitted ahead of what the writer has taken (Executor.map would submit all
    and keep every finished crop in memory until it is written)."""
    from concurrent.futures import Future

    from triview.crop import bounded_map

    taken: list[int] = []

    class Pool:
        submitted = 0

        def submit(self, fn, items):
            self.submitted += 1
            assert self.submitted - len(taken) // 10 <= 3, "more than 3 chunks ahead of the writer"
            future = Future()
            future.set_result(fn(items))
            return future

    for value in bounded_map(Pool(), lambda xs: [2 * x for x in xs], list(range(1000)), chunk=10, window=3):
        taken.append(value)
    assert taken == [2 * x for x in range(1000)]


def test_the_process_pool_writes_what_one_process_writes(tmp_path):
    """Past 200 photos calibrate-and-crop crops in worker processes: the same table and
    the same shard bytes as in one process."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_cache import _photos

    from triview.stages import calibrate_and_crop_stage, ingest_stage

    ingest_stage(str(_photos(tmp_path / "photos", 205)), tmp_path / "ingest", plot=False)
    for workers in (1, 2):
        calibrate_and_crop_stage(tmp_path / "ingest", tmp_path / f"views-{workers}", workers=workers,
                                 layout="horizontal", image_size=32)
    one, two = tmp_path / "views-1", tmp_path / "views-2"
    assert (one / "views.csv").read_bytes() == (two / "views.csv").read_bytes()
    tars = sorted(p.relative_to(one) for p in one.rglob("*.tar"))
    assert tars and tars == sorted(p.relative_to(two) for p in two.rglob("*.tar"))
    assert all((one / t).read_bytes() == (two / t).read_bytes() for t in tars)


def test_cropping_holds_no_table_of_its_crops(tmp_path):
    """calibrate-and-crop writes each crop and its table row as it goes: what the parent
    process allocates grows by well under a kilobyte per photo (the member names of the
    index), where holding the rows, their references and the index as dicts took ~3.6 KB."""
    import sys
    import tracemalloc
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_cache import _photos

    from triview.stages import calibrate_and_crop_stage, ingest_stage

    peaks = {}
    for n in (100, 400):
        ingest_stage(str(_photos(tmp_path / f"photos-{n}", n)), tmp_path / f"ingest-{n}", plot=False)
    for n in (100, 400, 100, 400):  # the first call pays for imports and caches
        tracemalloc.start()
        calibrate_and_crop_stage(tmp_path / f"ingest-{n}", tmp_path / f"views-{n}-{len(peaks)}",
                                 workers=1, layout="horizontal", image_size=32)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    per_photo = (peaks[400] - peaks[100]) / 300
    assert per_photo < 1000, per_photo


def _tarfile_bytes(items) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_shard_is_byte_for_byte_what_tarfile_writes(tmp_path):
    """The shard writer builds each ustar header itself (tarfile's path costs more than a
    small crop): the file is the one tarfile writes, for short, 100-byte, longer and
    non-ASCII names and sizes around the 512-byte block."""
    import random

    rnd = random.Random(0)
    names = ["a.png", "x" * 96, "y" * 98, "\u00e9t\u00e9\u20ac", "k" * 60 + ".jpg"]  # up to 100 bytes
    items = [(f"{rnd.choice(names)}{i}", rnd.randbytes(rnd.choice([0, 1, 511, 512, 513, 3000, 16383,
                                                                   16384, 100_001])))
             for i in range(40)]  # a large member is written as it is, a small one joined
    items[-1] = (items[-1][0], memoryview(rnd.randbytes(70_001))[1:])  # a view of a cache read
    refs, entries = _write(tmp_path, items)
    (name,) = entries
    assert (tmp_path / name).read_bytes() == _tarfile_bytes(items)
    assert [shards.read_member(tmp_path, ref) for ref in refs] == [bytes(d) for _, d in items]
    with pytest.raises(ValueError, match="too long"):  # as tarfile refuses it
        _write(tmp_path / "long", [("z" * 101, b"data")])


def test_the_index_is_streamed_as_json_would_write_it(tmp_path):
    items = [(f"k{i}\u00e9.png", bytes([i]) * (300 * i + 1)) for i in range(12)]
    _, entries = _write(tmp_path, items, max_bytes=4096)
    plain = {name: {"samples": e["samples"], "bytes": e["bytes"], "members": dict(e["members"].items())}
             for name, e in entries.items()}
    expected = json.dumps({"format": shards.FORMAT, "version": shards.VERSION,
                           "shards": dict(sorted(plain.items()))}, separators=(",", ":"))
    assert (tmp_path / shards.INDEX_FILE).read_text() == expected
    assert shards.read_index(tmp_path) == json.loads(expected)["shards"]
    for name, entry in entries.items():  # the compact members look up like the index's dict
        assert all(entry["members"][m] == where for m, where in plain[name]["members"].items())
        assert "nope.png" not in entry["members"] and len(entry["members"]) == entry["samples"]
    shards.write_index(tmp_path / "again", plain)  # plain dicts (a parsed index) too
    assert (tmp_path / "again" / shards.INDEX_FILE).read_text() == expected


def test_the_shard_reader_reads_and_checks_what_read_member_does(tmp_path):
    items = [(f"m{i}.png", bytes([i]) * (100 + i)) for i in range(20)]
    refs, entries = _write(tmp_path, items, max_bytes=8192)
    (tmp_path / "plain.png").write_bytes(b"plain")
    with shards.ShardReader(tmp_path) as reader:
        assert [reader.read(r) for r in refs] == [d for _, d in items]
        assert reader.read("plain.png") == b"plain"
        shard = refs[0].split("#")[0]
        for bad, match in ((f"{shard}#nope.png", "not a member"), ("crops/whole/999999.tar#m0.png", "not in"),
                           ("../outside.tar#m0.png", "inside its folder"), ("/etc/passwd", "inside its folder")):
            with pytest.raises(ValueError, match=match):
                reader.read(bad)
    last = refs[-1].split("#")[0]
    with open(tmp_path / last, "r+b") as f:
        f.truncate(600)
    with shards.ShardReader(tmp_path) as reader, pytest.raises(ValueError, match="truncated"):
        reader.read(refs[-1])
