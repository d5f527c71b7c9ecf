"""A view's crops of one split (in memory as one uint8 tensor, or left in their shards and
read batch by batch: the ``loader`` parameter), resampling, and the batches a training
epoch draws (with online augmentation prepared in the background: a thread for crops in
memory, DataLoader worker processes for streamed crops)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from triview import manifest as mf
from triview.augment import augment_batch
from triview.train.shardimages import ShardImages, concat, take, use_stream


@dataclass
class ViewData:
    images: torch.Tensor | ShardImages  # uint8 (N, 3, H, W), or where to read it
    labels: torch.Tensor       # int64 (N,) multi-class; float32 0/1 (N, C) multi-label
    image_ids: list[str]
    real: torch.Tensor | None = None  # bool (N,): a real crop (not an augmented copy)

    def subset(self, idx: torch.Tensor) -> "ViewData":
        real = None if self.real is None else self.real[idx]
        return ViewData(take(self.images, idx), self.labels[idx], [self.image_ids[i] for i in idx.tolist()], real)


def load_view(tables: list[tuple[Path, pd.DataFrame]], view: str, split: str,
              classes: list[str], task: str = "multiclass", loader: str = "memory") -> ViewData:
    """One view's crops of one split from one or more view tables (labels as class
    indices, or as 0/1 indicators for ``task="multilabel"``). ``loader``: ``memory`` decodes
    every crop into one tensor; ``stream`` leaves them in their shards
    (:class:`~triview.train.shardimages.ShardImages`); ``auto`` streams when they would
    take more than :data:`~triview.train.shardimages.AUTO_STREAM_BYTES` decoded."""
    parts, labels, ids, real = [], [], [], []
    for folder, table in tables:
        part = table[(table["view"] == view) & (table["split"] == split)]
        if not len(part):
            continue
        parts.append(ShardImages.from_refs(folder, part["path"].tolist()))
        if task == "multilabel":
            labels.extend(mf.encode_multilabel(part["labels"], classes).tolist())
        else:
            labels.extend(mf.encode_labels(part["label"], classes).tolist())
        ids.extend(part["image_id"].tolist())
        real.extend((part["augmented"] == 0).tolist() if "augmented" in part else [True] * len(part))
    if not parts:
        raise ValueError(f"no {split} crops for view {view!r}")
    images = concat(parts)
    dtype = torch.float32 if task == "multilabel" else torch.int64
    return ViewData(images if use_stream(loader, images) else images.materialize(),
                    torch.tensor(labels, dtype=dtype), ids, torch.tensor(real, dtype=torch.bool))


def apply_multiplicity(data: ViewData, plan: dict[str, int] | None) -> ViewData:
    """Repeat or drop training samples as balance's resampling plan says (augmented
    copies follow their source image)."""
    if not plan or all(v == 1 for v in plan.values()):
        return data
    index = [i for i, image_id in enumerate(data.image_ids) for _ in range(plan.get(image_id, 1))]
    if not index:
        raise ValueError("resampling left no training images")
    return data.subset(torch.tensor(index))


def uint8_batch(data: ViewData, idx: torch.Tensor, online, epoch: int):
    """The crops at ``idx`` (uint8 NCHW; with online augmentation, a fresh draw per epoch
    seeded by image id) and their labels."""
    images = data.images[idx]
    if online is not None:
        ids = [data.image_ids[i] for i in idx.tolist()]
        hwc = augment_batch(images.permute(0, 2, 3, 1).numpy(), ids, online, epoch)
        images = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    return images, data.labels[idx]


def _make_batch(data: ViewData, idx: torch.Tensor, memory_format, online, epoch: int):
    images, labels = uint8_batch(data, idx, online, epoch)
    return as_float(images).contiguous(memory_format=memory_format), labels


class _BatchReader(torch.utils.data.Dataset):
    """Item (positions, online, epoch) is that batch of ``data``: read, decoded and
    augmented where the DataLoader runs it (a worker process)."""

    def __init__(self, data: ViewData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, key):
        idx, online, epoch = key
        return uint8_batch(self.data, torch.from_numpy(idx), online, epoch)


class _Plan(torch.utils.data.Sampler):
    """The batches of the pass being run; replaced before each pass."""

    def __init__(self) -> None:
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class StreamLoader:
    """Batches of crops in shards through one ``torch.utils.data.DataLoader`` whose
    ``workers`` processes (0: this one) each read, decode and augment whole batches, two
    ahead each, and stay up from one pass to the next (a training run starts them once).
    Batches arrive in the pass's order, as uint8, and are turned into floats here: the
    very batches :func:`batches` makes from crops in memory."""

    def __init__(self, data: ViewData, memory_format=torch.contiguous_format, workers: int = 2):
        self.memory_format, self.plan = memory_format, _Plan()
        self.loader = torch.utils.data.DataLoader(
            _BatchReader(data), batch_size=None, sampler=self.plan, num_workers=workers,
            prefetch_factor=2 if workers else None, persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available())

    def __call__(self, order: torch.Tensor, batch_size: int, online=None, epoch: int = 0):
        """Yield (float batch, labels) of ``order`` in batches of ``batch_size``."""
        order = order.numpy()
        self.plan.keys = [(order[i:i + batch_size], online, epoch)
                          for i in range(0, len(order), batch_size)]
        for images, labels in self.loader:
            yield as_float(images).contiguous(memory_format=self.memory_format), labels

    def close(self) -> None:
        """Stop the worker processes."""
        self.loader = None


def batches(data: ViewData, order: torch.Tensor, batch_size: int,
            memory_format=torch.contiguous_format, online=None, epoch: int = 0, workers: int = 2):
    """Yield (float batch, labels) in ``order``. Crops in memory: with online augmentation
    the next batch is prepared on a background thread (OpenCV releases the GIL) while this
    one trains. Crops in shards: a :class:`StreamLoader` with ``workers`` processes."""
    if isinstance(data.images, ShardImages):
        loader = StreamLoader(data, memory_format, workers)
        try:
            yield from loader(order, batch_size, online, epoch)
        finally:
            loader.close()
        return
    starts = range(0, len(order), batch_size)
    if online is None:
        for i in starts:
            yield _make_batch(data, order[i:i + batch_size], memory_format, None, epoch)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = None
        for i in starts:
            nxt = pool.submit(_make_batch, data, order[i:i + batch_size], memory_format, online, epoch)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


@dataclass
class SplitCrops:
    """The real crops of one split for every view, aligned on image id."""
    views: list[ViewData]

    @property
    def inputs(self) -> list[torch.Tensor]:
        """Float [0, 1] NCHW tensors, one per view: what the exported ensemble takes."""
        return [as_float(d.images) for d in self.views]

    @property
    def labels(self) -> np.ndarray:
        return self.views[0].labels.numpy()

    @property
    def image_ids(self) -> list[str]:
        return self.views[0].image_ids


def load_split(views_dir: str | Path, views: list[str], split: str,
               task: str = "multiclass") -> SplitCrops:
    """Every real (not augmented) crop of ``split`` for each of ``views`` from a
    calibrate-and-crop folder; an error when the views do not hold the same images."""
    table = mf.read_views(views_dir)
    table = table[table["augmented"] == 0]
    classes = mf.read_classes(views_dir)
    data = [load_view([(Path(views_dir), table)], v, split, classes, task) for v in views]
    if any(d.image_ids != data[0].image_ids for d in data[1:]):
        raise ValueError(f"{split} crops of the views are not aligned on image id")
    return SplitCrops(data)
