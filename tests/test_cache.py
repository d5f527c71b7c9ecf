"""The content-addressed cache across runs (``cache_root``): a run on grown data crops and
extracts only its new photos, reuses the rest byte for byte, and never meets an entry of
another recipe, lens, image size or weight file."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import HEAD_ONLY_TRAIN  # noqa: E402
from s3_server import BUCKET, moto_server, s3_endpoint  # noqa: E402,F401  (fixtures)

CROP = {"layout": "horizontal", "image_size": 32}


def _photos(folder: Path, n: int, start: int = 0) -> Path:
    """``n`` distinct labelled photos (digits under a per-photo colour and shift), the same
    bytes for the same index whichever call writes them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        img = cv2.resize((digits.images[i] * 16).astype(np.uint8), (64, 48), interpolation=cv2.INTER_NEAREST)
        rgb = np.stack([img * rng.uniform(0.5, 1.0) for _ in range(3)], -1).astype(np.uint8)
        rgb = np.roll(rgb, int(rng.integers(-4, 5)), axis=1)
        out = folder / ("even" if digits.target[i] % 2 == 0 else "odd") / f"p{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), rgb)
    return folder


def _crop(data: Path, out: Path, **params) -> dict:
    from triview.stages import calibrate_and_crop_stage, ingest_stage

    ingest_stage(str(data), out / "ingest", plot=False)
    return calibrate_and_crop_stage(out / "ingest", out / "views", **{**CROP, **params})


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("held", [1 << 16, 2])
def test_a_run_on_grown_data_crops_only_its_new_photos_and_matches_an_uncached_run(tmp_path, monkeypatch,
                                                                                   held):
    """``held``: how many misses' references the lookup keeps; past it (2 here, a first run at
    scale) the misses are read again from the manifest, to the same crops."""
    import triview.crop

    monkeypatch.setattr(triview.crop, "_MISSES_HELD", held)
    data = _photos(tmp_path / "photos", 60)
    cache = str(tmp_path / "cache")
    first = _crop(data, tmp_path / "r1", cache_root=cache)
    assert first["cache"] == {"hits": 0, "computed": 60}
    _photos(data, 6, start=60)  # the photo set grows by 10 %
    grown = _crop(data, tmp_path / "r2", cache_root=cache)
    assert grown["cache"] == {"hits": 60, "computed": 6}
    plain = _crop(data, tmp_path / "r3")  # no cache at all
    assert "cache" not in plain
    assert _tree(tmp_path / "r2" / "views" / "crops") == _tree(tmp_path / "r3" / "views" / "crops")
    assert (tmp_path / "r2/views/views.csv").read_bytes() == (tmp_path / "r3/views/views.csv").read_bytes()


def _lens_file(tmp_path: Path) -> str:
    import json

    path = tmp_path / "lens.json"
    path.write_text(json.dumps({"K": [[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]],
                                "dist": [-0.3, 0.1, 0, 0, 0], "image_size": [64, 48]}))
    return str(path)


@pytest.mark.parametrize("change", ["image_size", "overlap", "layout", "resize", "lens",
                                    "lens_alpha", "recipe_version"])
def test_anything_that_changes_the_crops_misses_the_cache(tmp_path, change, monkeypatch):
    data = _photos(tmp_path / "photos", 12)
    cache = str(tmp_path / "cache")
    base = {"calibration_file": _lens_file(tmp_path)} if change == "lens_alpha" else {}
    assert _crop(data, tmp_path / "a", cache_root=cache, **base)["cache"]["computed"] == 12
    assert _crop(data, tmp_path / "b", cache_root=cache, **base)["cache"]["hits"] == 12
    params = {"image_size": {"image_size": 40}, "overlap": {"overlap": 0.3},
              "layout": {"layout": "vertical"}, "resize": {"resize": "letterbox"},
              "lens": {"calibration_file": _lens_file(tmp_path)},
              "lens_alpha": {**base, "lens_alpha": 0.5}, "recipe_version": {}}[change]
    if change == "recipe_version":
        from triview import cropcache

        monkeypatch.setattr(cropcache, "RECIPE_VERSION", cropcache.RECIPE_VERSION + 1)
    changed = _crop(data, tmp_path / "c", cache_root=cache, **params)
    assert changed["cache"] == {"hits": 0, "computed": 12}
    plain = _crop(data, tmp_path / "d", **params)
    assert _tree(tmp_path / "c" / "views" / "crops") == _tree(tmp_path / "d" / "views" / "crops")


def _pack(cache: Path) -> tuple[Path, dict]:
    """The one pack of a cache: its shard and its index's entries."""
    import json

    (index,) = sorted(cache.rglob("*.json"))
    return index.with_suffix(".tar"), json.loads(index.read_text())["entries"]


def test_a_damaged_entry_is_cropped_again_and_rewritten(tmp_path):
    data = _photos(tmp_path / "photos", 10)
    cache = tmp_path / "cache"
    _crop(data, tmp_path / "a", cache_root=str(cache))
    shard, entries = _pack(cache)
    assert len(entries) == 10 and len(list(cache.rglob("*"))) == 4  # crops/<recipe>/<pack>.{tar,json}
    spans = sorted(entries.values())
    raw = bytearray(shard.read_bytes())
    offset, size, _ = spans[0][1]
    raw[offset + size // 2] ^= 0xFF  # one flipped byte inside one view's PNG of the first photo
    last_view_end = max(o + n for o, n, _ in spans[-1])
    shard.write_bytes(bytes(raw[:last_view_end - 1]))  # truncated inside the last photo
    again = _crop(data, tmp_path / "b", cache_root=str(cache))
    assert again["cache"] == {"hits": 8, "computed": 2}
    assert _tree(tmp_path / "a" / "views" / "crops") == _tree(tmp_path / "b" / "views" / "crops")
    assert len(list(cache.rglob("*.json"))) == 2  # the two photos again, in a newer pack
    assert _crop(data, tmp_path / "c", cache_root=str(cache))["cache"]["hits"] == 10  # the newer wins


def _cropped_once(tmp_path: Path, n: int) -> tuple[Path, Path, Path, Path]:
    """``n`` photos cropped once into an empty cache: (photos, cache, its pack's shard and index)."""
    data, cache = _photos(tmp_path / "photos", n), tmp_path / "cache"
    _crop(data, tmp_path / "a", cache_root=str(cache))
    shard, _ = _pack(cache)
    return data, cache, shard, shard.with_suffix(".json")


def test_a_damaged_pack_index_or_a_missing_shard_costs_only_reuse(tmp_path):
    data, cache, shard, index = _cropped_once(tmp_path, 6)
    index.write_text(index.read_text()[:-20])  # not JSON any more
    assert _crop(data, tmp_path / "b", cache_root=str(cache))["cache"] == {"hits": 0, "computed": 6}
    for old in cache.rglob("*.json"):  # every index left, its shard gone
        old.with_suffix(".tar").unlink()
    assert _crop(data, tmp_path / "c", cache_root=str(cache))["cache"] == {"hits": 0, "computed": 6}
    assert _tree(tmp_path / "a" / "views" / "crops") == _tree(tmp_path / "c" / "views" / "crops")


def test_a_pack_index_naming_a_shard_outside_its_folder_is_not_followed(tmp_path):
    import json

    data, cache, shard, index = _cropped_once(tmp_path, 6)
    outside = tmp_path / "elsewhere.tar"
    shard.rename(outside)
    (index.parent / "ab").mkdir()  # a folder beside the packs (an older cache's layout)
    for name in ("../../../elsewhere.tar", str(outside), "ab/../../../../elsewhere.tar"):
        spec = json.loads(index.read_text())
        spec["shard"] = name
        index.write_text(json.dumps(spec))
        assert _crop(data, tmp_path / "b", cache_root=str(cache))["cache"]["hits"] == 0
        for new in cache.rglob("*"):  # the run's own new pack: away, for the next name
            if new.is_file() and new != index:
                new.unlink()


def test_cache_packs_are_webdataset_shards_with_one_member_per_view(tmp_path):
    import tarfile

    from triview.crop import read_geometry

    data = _photos(tmp_path / "photos", 8)
    cache = tmp_path / "cache"
    _crop(data, tmp_path / "a", cache_root=str(cache))
    views = read_geometry(tmp_path / "a" / "views")[0].views
    shard, entries = _pack(cache)
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        for photo, spans in entries.items():
            for view, (offset, size, _) in zip(views, spans):
                member = tar.getmember(f"{photo}.{view}.png")
                assert (member.offset_data, member.size) == (offset, size)
    assert len(names) == 24  # 8 photos, 3 views


def test_the_cache_on_s3_serves_the_next_run(s3_endpoint, tmp_path):
    from triview import storage

    data = _photos(tmp_path / "photos", 8)
    cache = f"s3://{BUCKET}/cache"
    assert _crop(data, tmp_path / "a", cache_root=cache)["cache"]["computed"] == 8
    assert _crop(data, tmp_path / "b", cache_root=cache)["cache"] == {"hits": 8, "computed": 0}
    assert _tree(tmp_path / "a" / "views" / "crops") == _tree(tmp_path / "b" / "views" / "crops")
    assert len(storage.default_store().list(f"{cache}/crops/")) == 2  # one pack: its shard and index


def _save_weights(path: Path, nudge: bool = False) -> str:
    import torch

    from triview.models import create_backbone

    torch.manual_seed(0)
    state = create_backbone("efficientnet_lite0", 10, 32).state_dict()
    if nudge:  # one value of one tensor: another weight file
        name = next(k for k, v in state.items() if v.dtype.is_floating_point and v.dim() == 4)
        state[name].view(-1)[0] += 0.5
    torch.save(state, path)
    return str(path)


def test_features_are_reused_across_runs_and_missed_for_other_weights(cropped, augmented,
                                                                      balanced, tmp_path):
    from triview.artifacts import load_predictions
    from triview.stages import train_branch_stage
    from triview.train import features

    cache = str(tmp_path / "cache")
    weights = _save_weights(tmp_path / "w.pt")
    params = {**HEAD_ONLY_TRAIN, "weights": weights, "cache_root": cache}

    def run(name, **extra):
        features._OPEN.clear()  # each run a new process: the store is read from disk
        rec = train_branch_stage(cropped, augmented, balanced, "center", tmp_path / name,
                                 **{**params, **extra})
        return rec["feature_cache"], load_predictions(tmp_path / name)

    (first, p1), (second, p2) = run("a"), run("b")
    assert first["computed"] > 0 and second == {"reused": first["reused"] + first["computed"],
                                                "computed": 0}
    np.testing.assert_allclose(p1["test_prob"], p2["test_prob"], atol=1e-6)
    third, _ = run("c", weights=_save_weights(tmp_path / "w2.pt", nudge=True))
    assert third["computed"] == first["computed"]  # another weight file: nothing reused
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2  # one folder per network
    for shard in (tmp_path / "cache" / "features").rglob("*.npz"):  # damaged: computed again
        shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    fourth, p4 = run("d")
    assert fourth["computed"] == first["computed"]
    np.testing.assert_allclose(p1["test_prob"], p4["test_prob"], atol=1e-6)


def _tiny_net_and_crops():
    import torch

    from triview.models import BranchNet, create_backbone

    torch.manual_seed(0)
    net = BranchNet(create_backbone("shufflenet_v2_x0_5", 3, 24), "imagenet").eval()
    return net, torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)


def test_a_feature_store_that_cannot_be_written_or_read_never_fails_the_run(tmp_path, caplog):
    import torch

    from triview.train.features import FeatureStore
    from triview.train.loop import head_inputs

    net, images = _tiny_net_and_crops()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # every write below it fails
    with caplog.at_level("WARNING", logger="triview.train.features"):
        got = FeatureStore(str(blocked)).features(net, images, head_inputs)
    assert torch.allclose(got, head_inputs(net, images)) and "cannot write" in caplog.text
    assert FeatureStore(str(blocked)).features(net, images, head_inputs) is not None
    store = tmp_path / "store"
    FeatureStore(str(store)).features(net, images, head_inputs)
    (shard,) = store.rglob("*.npz")
    from triview.train.features import crop_digests

    keys = np.array(crop_digests(images))  # this store's own keys, features that do not pair up
    np.savez(shard, keys=keys, features=np.zeros((len(keys) - 1, 4), np.float32))
    calls = []
    again = FeatureStore(str(store)).features(net, images, lambda n, x: calls.append(len(x)) or head_inputs(n, x))
    assert calls == [5] and torch.allclose(again, got)  # the mismatched shard was skipped


def test_a_crop_cache_that_cannot_be_written_never_fails_the_run(tmp_path, caplog):
    data = _photos(tmp_path / "photos", 6)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="triview.cropcache"):
        rec = _crop(data, tmp_path / "a", cache_root=str(blocked))
    assert rec["cache"] == {"hits": 0, "computed": 6} and "cannot write" in caplog.text
    plain = _crop(data, tmp_path / "b")
    assert plain["items_out"] == rec["items_out"]
    assert _tree(tmp_path / "a" / "views" / "crops") == _tree(tmp_path / "b" / "views" / "crops")


def test_the_feature_store_on_s3(s3_endpoint):
    import torch

    from triview.train.features import FeatureStore
    from triview.train.loop import head_inputs

    net, images = _tiny_net_and_crops()
    calls = []

    def compute(n, x):
        calls.append(len(x))
        return head_inputs(n, x)

    root = f"s3://{BUCKET}/cache/features"
    first = FeatureStore(root).features(net, images, compute)
    again = FeatureStore(root).features(net, images[[4, 1]], compute)  # another process
    assert calls == [5] and torch.equal(again, first[[4, 1]])


def test_the_photo_key_covers_the_bytes_and_how_they_are_decoded():
    from triview.cropcache import photo_digest

    keys = {photo_digest(b"photo", True), photo_digest(b"photo", False), photo_digest(b"photo!", True)}
    assert len(keys) == 3


def test_a_cache_whose_store_fails_is_skipped_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    """A storage error (here: nothing listens at the S3 endpoint) on reading or writing
    either cache costs the reuse, never the run."""
    import torch

    from s3_server import free_port
    from triview.train.features import FeatureStore
    from triview.train.loop import head_inputs

    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("S3_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    data = _photos(tmp_path / "photos", 6)
    broken = "s3://triview/cache"
    with caplog.at_level("WARNING"):
        rec = _crop(data, tmp_path / "a", cache_root=broken)
        net, images = _tiny_net_and_crops()
        got = FeatureStore(f"{broken}/features").features(net, images, head_inputs)
    assert rec["cache"] == {"hits": 0, "computed": 6}
    assert torch.allclose(got, head_inputs(net, images))
    # one warning each: the first error turns the cache off (no retries and timeouts per photo)
    crop_warnings = [r for r in caplog.records if r.name == "triview.cropcache"]
    feature_warnings = [r for r in caplog.records if r.name == "triview.train.features"]
    assert len(crop_warnings) == 1 and "cannot read" in crop_warnings[0].getMessage()
    assert len(feature_warnings) == 1 and "cannot list" in feature_warnings[0].getMessage()
    assert "off for the rest of this process" in caplog.text


def test_the_network_key_covers_torch_and_the_feature_code(monkeypatch):
    import torch

    from triview.train import features

    net, _ = _tiny_net_and_crops()
    key = features.network_digest(net)
    assert features.network_digest(net) == key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert features.network_digest(net) != key
    monkeypatch.undo()
    monkeypatch.setattr(features, "FEATURE_VERSION", features.FEATURE_VERSION + 1)
    assert features.network_digest(net) != key


def test_the_cache_holds_its_index_compactly(tmp_path):
    """A cached re-run reads every pack's index before it crops: held as Python objects
    (a dict of lists of lists per photo) that was about 800 bytes per photo, 0.8 GB for a
    million; held as one dict of digests and flat arrays it is under 300."""
    import tracemalloc

    from triview.cropcache import CropCache

    recipe, views = {"lens": "identity", "geometry": "horizontal-32"}, ("left", "center", "right")
    photos = [f"{i * 7919:040x}" for i in range(3000)]
    with CropCache(str(tmp_path), recipe, views, pack_bytes=1 << 20) as cache:
        for i, photo in enumerate(photos):
            cache.put(photo, {v: i.to_bytes(4, "big") * 300 + v.encode() for v in views})
    assert len(list(tmp_path.rglob("*.json"))) > 2  # several packs
    with CropCache(str(tmp_path), recipe, views) as again:
        tracemalloc.start()
        try:
            assert photos[0] in again
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert held / len(photos) < 300
        assert again.get(photos[1234]) == {v: (1234).to_bytes(4, "big") * 300 + v.encode() for v in views}


def test_a_run_adds_packs_of_bounded_size_and_the_next_reads_them_all(tmp_path):
    from triview.cropcache import CropCache

    recipe = {"lens": "identity", "geometry": "horizontal-32"}
    views = ("left", "center", "right")
    entries = {f"{i:040x}": {v: bytes([i]) * (400 + 50 * i) + v.encode() for v in views} for i in range(12)}
    with CropCache(str(tmp_path), recipe, views, pack_bytes=8192) as cache:
        for photo, pngs in entries.items():
            assert cache.put(photo, pngs)
    packs = sorted(tmp_path.rglob("*.tar"))
    assert len(packs) > 2 and all(p.stat().st_size <= 8192 + 10240 for p in packs)
    assert len(list(tmp_path.rglob("*.json"))) == len(packs) and not list(tmp_path.rglob(".*"))
    with CropCache(str(tmp_path), recipe, views) as again:
        assert all(again.get(photo) == pngs for photo, pngs in entries.items())
        assert again.get("f" * 40) is None
    with CropCache(str(tmp_path), {**recipe, "geometry": "vertical-32"}, views) as other:
        assert all(other.get(photo) is None for photo in entries)  # another recipe: nothing


def test_of_a_photo_in_two_packs_the_newer_is_read_and_the_older_when_it_is_damaged(tmp_path):
    import json

    from triview.cropcache import CropCache

    recipe, views = {"lens": "identity"}, ("left", "center", "right")
    photo = "ab" * 20
    for generation in (b"old", b"new"):
        with CropCache(str(tmp_path), recipe, views) as cache:
            cache.put(photo, {v: generation + v.encode() for v in views})
    with CropCache(str(tmp_path), recipe, views) as cache:
        assert cache.get(photo)["left"] == b"newleft"
    newer = max(tmp_path.rglob("*.json"), key=lambda p: p.name)
    (offset, size, _), *_ = json.loads(newer.read_text())["entries"][photo]
    shard = newer.with_suffix(".tar")
    raw = bytearray(shard.read_bytes())
    raw[offset] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with CropCache(str(tmp_path), recipe, views) as cache:
        assert cache.get(photo) == {v: b"old" + v.encode() for v in views}


def test_a_photo_key_is_its_20_bytes_as_bytes_or_hex(tmp_path):
    """A key of another length would spoil its pack's whole index: put refuses it."""
    from triview.cropcache import CropCache, photo_digest, photo_key

    views = ("left", "right")
    key = photo_key(b"photo", True)
    assert len(key) == 20 and photo_digest(b"photo", True) == key.hex()
    with CropCache(str(tmp_path), {"lens": "identity"}, views) as cache:
        for bad in ("ab" * 19, "zz" * 20, key + b"!", b""):
            with pytest.raises(ValueError):
                cache.put(bad, {v: b"png" for v in views})
        assert cache.put(key, {v: v.encode() for v in views})
    assert len(list(tmp_path.rglob("*.json"))) == 1
    with CropCache(str(tmp_path), {"lens": "identity"}, views) as cache:
        assert key in cache and key.hex() in cache and bytearray(key) in cache
        assert cache.get(key) == cache.get(key.hex()) == {v: v.encode() for v in views}


@pytest.mark.parametrize("span", [[-1, 10, 0], [0, 2 ** 40, 0], [0, 10, -5], ["0", 10, 0], [0, 10],
                                  [0, 10, 2 ** 32], [0.0, 10, 0], [True, 10, 0], [0, 10, 2 ** 70],
                                  [0, 10, 0, 0]])
def test_a_pack_index_with_impossible_spans_is_not_used(tmp_path, span):
    import json

    from triview.cropcache import CropCache

    recipe, views = {"lens": "identity"}, ("left", "center", "right")
    photo = "cd" * 20
    with CropCache(str(tmp_path), recipe, views) as cache:
        cache.put(photo, {v: v.encode() * 50 for v in views})
    (index,) = tmp_path.rglob("*.json")
    spec = json.loads(index.read_text())
    spec["entries"][photo][1] = span
    index.write_text(json.dumps(spec))
    with CropCache(str(tmp_path), recipe, views) as cache:
        assert photo not in cache and cache.get(photo) is None


def test_views_far_apart_in_a_pack_are_read_one_by_one(tmp_path, monkeypatch):
    import json
    import os

    from triview import cropcache

    from triview.cropcache import CropCache

    recipe, views = {"lens": "identity"}, ("left", "center", "right")
    with CropCache(str(tmp_path), recipe, views) as cache:
        for i in range(40):
            cache.put(f"{i:040x}", {v: bytes([i]) * 3000 + v.encode() for v in views})
    (index,) = tmp_path.rglob("*.json")
    spec = json.loads(index.read_text())
    first, last = f"{0:040x}", f"{39:040x}"
    spec["entries"][first][2] = spec["entries"][last][2]  # its right view: the last photo's
    index.write_text(json.dumps(spec))
    reads, real = [], os.pread
    monkeypatch.setattr(cropcache.os, "pread", lambda fd, n, at: reads.append(n) or real(fd, n, at))
    with CropCache(str(tmp_path), recipe, views) as cache:
        got = cache.get(first)
    assert max(reads) < 4096  # not the 40 photos between them
    assert got["left"] == bytes([0]) * 3000 + b"left" and got["right"] == bytes([39]) * 3000 + b"right"
