"""The stream loader: crops left in their shards (triview.train.shardimages) and read batch
by batch by DataLoader worker processes, the same batches as the in-memory loader."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import digits_train
from s3_server import BUCKET, moto_server, s3_endpoint  # noqa: F401
from triview import manifest as mf
from triview import shards
from triview.crop import read_crop
from triview.train.data import StreamLoader, batches, load_view
from triview.train.loop import _shard, by_shard
from triview.train.shardimages import AUTO_STREAM_BYTES, ShardImages, concat, take, use_stream


def _tables(cropped, augmented=None):
    tables = [(Path(cropped), mf.read_views(cropped))]
    if augmented is not None:
        tables.append((Path(augmented), mf.read_views(augmented)))
    return tables


def test_streamed_crops_read_what_the_table_names(cropped, augmented):
    """Indexing, slicing and lazy subsets of shard-backed crops give the crops that
    read_crop gives, for the crop folder and the augmented copies joined."""
    tables = _tables(cropped, augmented)
    classes = mf.read_classes(cropped)
    streamed = load_view(tables, "left", "train", classes, loader="stream")
    memory = load_view(tables, "left", "train", classes, loader="memory")
    assert isinstance(streamed.images, ShardImages) and isinstance(memory.images, torch.Tensor)
    assert streamed.images.shape == memory.images.shape
    assert streamed.image_ids == memory.image_ids and torch.equal(streamed.labels, memory.labels)
    assert torch.equal(streamed.images[:], memory.images)
    rows = [(folder, ref) for folder, t in tables
            for ref in t.query("view == 'left' and split == 'train'")["path"]]
    for i in (0, len(rows) // 2, len(rows) - 1):  # the augmented copies come last
        assert np.array_equal(streamed.images[i].permute(1, 2, 0).numpy(), read_crop(*rows[i]))
    pick = torch.tensor([5, 0, len(rows) - 1, 5])
    sub = streamed.subset(pick)
    assert isinstance(sub.images, ShardImages) and torch.equal(sub.images[:], memory.images[pick])
    assert torch.equal(streamed.images[-1], memory.images[-1])
    with pytest.raises(IndexError):
        streamed.images[[len(rows)]]


def test_the_stream_loader_gives_the_in_memory_batches(cropped, augmented):
    """Worker processes read, decode and augment online the very batches (bit for bit, in
    the epoch's order) that the in-memory loader makes."""
    from triview.augment import AugmentConfig

    tables = _tables(cropped, augmented)
    classes = mf.read_classes(cropped)
    streamed = load_view(tables, "right", "train", classes, loader="stream")
    memory = load_view(tables, "right", "train", classes, loader="memory")
    online = AugmentConfig(mode="online", shift=0.1, max_rotation=10.0, seed=3)
    order = torch.randperm(len(memory.labels), generator=torch.Generator().manual_seed(0))
    for epoch, workers in ((1, 2), (2, 0)):
        want = list(batches(memory, order, 24, torch.channels_last, online, epoch))
        got = list(batches(streamed, order, 24, torch.channels_last, online, epoch, workers))
        assert len(got) == len(want) == -(-len(order) // 24)
        for (x, y), (a, b) in zip(got, want):
            assert torch.equal(x, a) and torch.equal(y, b)
            assert x.is_contiguous(memory_format=torch.channels_last)
    # augmentation really ran in the workers: another epoch draws other pixels
    # one loader serves pass after pass (its workers stay up); augmentation runs in them:
    # another epoch draws other pixels, and a pass without augmentation gives the crops
    loader = StreamLoader(streamed, workers=2)
    one = [x for x, _ in loader(order, 24, online, 1)]
    pids = [w.pid for w in loader.loader._iterator._workers]
    two = [x for x, _ in loader(order, 24, online, 2)]
    assert [w.pid for w in loader.loader._iterator._workers] == pids and len(pids) == 2
    plain = [x for x, _ in loader(order[:50], 24)]
    assert len(one) == len(two) and not torch.equal(one[0], two[0])
    assert torch.equal(torch.cat(plain), memory.images[order[:50]].float() / 255)
    loader.close()


def test_streamed_crops_are_not_held_in_memory(cropped):
    """Building the stream view allocates a small share of what the decoded crops take."""
    table = _tables(cropped)
    classes = mf.read_classes(cropped)
    shards.read_index(cropped)  # the index (cached per process) is the folder's, not N crops'
    tracemalloc.start()
    streamed = load_view(table, "center", "train", classes, loader="stream")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert streamed.images.nbytes > 300 * 3 * 32 * 32 * 0.9
    assert peak < streamed.images.nbytes / 4, (peak, streamed.images.nbytes)


def test_auto_streams_above_two_gib():
    def fake(n, side):
        return ShardImages(["x"], np.zeros(n, np.int32), np.zeros(n), np.full(n, 1), (side, side))

    side = 1024
    per_crop = 3 * side * side
    at_limit = fake(AUTO_STREAM_BYTES // per_crop, side)
    assert at_limit.nbytes <= 2 * 1024 ** 3 < at_limit.nbytes + per_crop
    assert not use_stream("auto", at_limit) and use_stream("auto", fake(at_limit.shape[0] + 1, side))
    assert use_stream("stream", fake(1, 8)) and not use_stream("memory", fake(10 ** 6, side))
    with pytest.raises(ValueError, match="auto, memory or stream"):
        use_stream("disk", fake(1, 8))


def test_each_rank_reads_its_own_shards():
    """Under DDP with streamed crops every rank gets ceil(N / world) positions from shards
    no other rank reads; with fewer shards than ranks, the plain round-robin share."""
    rng = np.random.default_rng(0)
    shard_of = np.repeat(np.arange(7), [40, 40, 40, 40, 40, 40, 13])
    n = len(shard_of)
    for epoch in range(3):
        order = torch.from_numpy(rng.permutation(n))
        shares = [by_shard(shard_of, order, r, 2) for r in range(2)]
        assert all(len(s) == -(-n // 2) for s in shares)
        owned = [set(shard_of[s.numpy()].tolist()) for s in shares]
        assert not owned[0] & owned[1] and owned[0] | owned[1] == set(range(7))
        for s in shares:  # a rank's crops keep the epoch's order
            pos = {int(v): k for k, v in enumerate(order)}
            firsts = [pos[int(v)] for v in s.numpy()]
            head = firsts[:len(set(s.numpy().tolist()))]
            assert head == sorted(head)
        covered = set(torch.cat(shares).tolist())
        assert len(covered) >= n - 40  # at most the surplus of one shard waits an epoch
    one = np.zeros(50, np.int64)
    order = torch.randperm(50)
    assert torch.equal(by_shard(one, order, 1, 2), _shard(order, 1, 2))
    assert torch.equal(by_shard(shard_of, torch.arange(n), 0, 1), torch.arange(n))


def test_a_damaged_shard_is_a_clear_error(cropped, tmp_path):
    import shutil

    folder = tmp_path / "views"
    shutil.copytree(cropped, folder)
    table = mf.read_views(folder)
    classes = mf.read_classes(folder)
    streamed = load_view([(folder, table)], "center", "test", classes, loader="stream")
    shard = Path(streamed.images.files[0])
    data = bytearray(shard.read_bytes())
    offset, size = int(streamed.images.offset[0]), int(streamed.images.size[0])
    data[offset:offset + size] = b"\0" * size  # not a PNG any more
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot decode the crop at byte"):
        streamed.images[0]
    shard.write_bytes(bytes(data[:offset + 10]))
    with pytest.raises(ValueError, match="truncated"):
        streamed.images[[0]]
    bad = table.copy()
    row = bad.index[(bad["view"] == "center") & (bad["split"] == "test")][0]
    bad.loc[row, "path"] = "../" + bad.loc[row, "path"]
    with pytest.raises(ValueError, match="not a relative path inside its folder"):
        load_view([(folder, bad)], "center", "test", classes, loader="stream")


def test_crops_of_another_size_are_refused(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((16, 8, 3), np.uint8))
    images = ShardImages.from_refs(tmp_path, ["a.png", "b.png"])  # plain files read too
    assert images.shape == (2, 3, 8, 8) and images[0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="is 16x8, the others 8x8"):
        images[:]


def test_streamed_crops_read_from_s3(cropped, s3_endpoint):
    """The same crops from an s3:// prefix (ranged GETs on a real S3 server)."""
    from triview.storage import S3Store

    store = S3Store()
    for path in Path(cropped).rglob("*"):
        if path.is_file():
            store.upload_file(path, f"s3://{BUCKET}/views/{path.relative_to(cropped).as_posix()}")
    table = mf.read_views(cropped).query("view == 'center' and split == 'val'")
    remote = ShardImages.from_refs(f"s3://{BUCKET}/views", table["path"].tolist())
    local = ShardImages.from_refs(cropped, table["path"].tolist())
    assert remote.files[0].startswith("s3://") and torch.equal(remote[:], local[:])
    assert torch.equal(concat([remote.subset([1]), local.subset([0])])[:],
                       torch.stack([local[1], local[0]]))


def test_take_and_concat_keep_tensors_as_tensors(cropped):
    x = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 2, 2)
    assert torch.equal(take(x, torch.tensor([1])), x[[1]])
    assert torch.equal(concat([x, x]), torch.cat([x, x]))
    lazy = ShardImages.from_refs(cropped, mf.read_views(cropped)["path"].tolist()[:2])
    with pytest.raises(TypeError):
        concat([x, lazy])


@pytest.mark.slow
def test_a_branch_trained_on_streamed_crops_is_the_in_memory_one(cropped, augmented, balanced, tmp_path,
                                                                  monkeypatch):
    """Fine-tuning with loader=stream (two worker processes) trains the same branch as
    loader=memory: the same batches, the same weights, the same predictions."""
    from triview.stages import train_branch_stage
    from triview.artifacts import load_predictions

    import triview.train.loop as loop

    made = []

    class Recording(loop.StreamLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.loader.num_workers)

    monkeypatch.setattr(loop, "StreamLoader", Recording)
    runs = {}
    for loader in ("memory", "stream"):
        rec = train_branch_stage(cropped, augmented, balanced, "center", tmp_path / loader,
                                 **digits_train(epochs=2, seed=1, loader=loader, loader_workers=2,
                                                freeze_bn=False, precise_bn=64))
        runs[loader] = (rec, load_predictions(tmp_path / loader))
    (mem, p_mem), (st, p_st) = runs["memory"], runs["stream"]
    assert st["parameter_digest"] == mem["parameter_digest"]
    assert np.array_equal(p_st["test_prob"], p_mem["test_prob"])
    assert st["best_epoch"] == mem["best_epoch"] and st["epochs_run"] == 2
    assert made == [2]  # one loader with two worker processes served the whole stream run


def _reshard(folder: Path, view: str, split: str, max_bytes: int) -> dict[str, str]:
    """Rewrite ``view``/``split``'s crops of a views folder into small shards; returns each
    image id's shard."""
    table = mf.read_views(folder)
    rows = (table["view"] == view) & (table["split"] == split)
    index = shards.read_index(folder)
    writer = shards.ShardWriter(folder, f"crops/{view}/{split}-small", max_bytes=max_bytes)
    refs = []
    for ref in table.loc[rows, "path"]:
        refs.append(writer.add(shards.split_ref(ref)[1], shards.read_member(folder, ref)))
    index.update(writer.close())
    shards.write_index(folder, index)
    table.loc[rows, "path"] = refs
    mf.write_views(table, folder)
    return dict(zip(table.loc[rows, "image_id"], [shards.split_ref(r)[0] for r in refs]))


@pytest.mark.slow
def test_under_ddp_each_rank_streams_its_own_shards(cropped, balanced, tmp_path, monkeypatch):
    """Two gloo ranks with loader=stream: each draws ceil(N / 2) crops of an epoch from
    shards the other never reads, and both end with the same weights."""
    import json
    import shutil

    from triview.stages import train_branch_stage

    folder = tmp_path / "views"
    shutil.copytree(cropped, folder)
    shard_of = _reshard(folder, "center", "train", max_bytes=40_000)
    assert len(set(shard_of.values())) >= 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "branch"
    rec = train_branch_stage(folder, None, balanced, "center", out, **digits_train(
        epochs=2, batch_size=32, seed=0, ddp_procs=2, loader="stream", loader_workers=1))
    ranks = [json.loads((out / "ddp" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert rec["world_size"] == 2
    assert ranks[0]["parameter_digest"] == ranks[1]["parameter_digest"] == rec["parameter_digest"]
    drawn = [ranks[r]["last_epoch_image_ids"] for r in range(2)]
    assert len(drawn[0]) == len(drawn[1]) == -(-len(shard_of) // 2)
    read = [{shard_of[i] for i in d} for d in drawn]
    assert read[0] and read[1] and not read[0] & read[1]
