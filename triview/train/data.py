"""Crops in memory: one view's crops of one split as a uint8 tensor, resampling, and the
batches a training epoch draws (with online augmentation prepared in the background)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from triview import manifest as mf
from triview.augment import augment_batch
from triview.crop import read_crop


@dataclass
class ViewData:
    images: torch.Tensor       # uint8 (N, 3, H, W)
    labels: torch.Tensor       # int64 (N,) multi-class; float32 0/1 (N, C) multi-label
    image_ids: list[str]
    real: torch.Tensor | None = None  # bool (N,): a real crop (not an augmented copy)

    def subset(self, idx: torch.Tensor) -> "ViewData":
        real = None if self.real is None else self.real[idx]
        return ViewData(self.images[idx], self.labels[idx], [self.image_ids[i] for i in idx.tolist()], real)


def load_view(tables: list[tuple[Path, pd.DataFrame]], view: str, split: str,
              classes: list[str], task: str = "multiclass") -> ViewData:
    """Load one view's crops of one split from one or more view tables into memory
    (labels as class indices, or as 0/1 indicators for ``task="multilabel"``)."""
    arrays, labels, ids, real = [], [], [], []
    for folder, table in tables:
        part = table[(table["view"] == view) & (table["split"] == split)]
        for rec in part.itertuples(index=False):
            arrays.append(read_crop(folder, rec.path))
        if task == "multilabel":
            labels.extend(mf.encode_multilabel(part["labels"], classes).tolist())
        else:
            labels.extend(mf.encode_labels(part["label"], classes).tolist())
        ids.extend(part["image_id"].tolist())
        real.extend((part["augmented"] == 0).tolist() if "augmented" in part else [True] * len(part))
    if not arrays:
        raise ValueError(f"no {split} crops for view {view!r}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    dtype = torch.float32 if task == "multilabel" else torch.int64
    return ViewData(images, torch.tensor(labels, dtype=dtype), ids, torch.tensor(real, dtype=torch.bool))


def apply_multiplicity(data: ViewData, plan: dict[str, int] | None) -> ViewData:
    """Repeat or drop training samples as balance's resampling plan says (augmented
    copies follow their source image)."""
    if not plan or all(v == 1 for v in plan.values()):
        return data
    index = [i for i, image_id in enumerate(data.image_ids) for _ in range(plan.get(image_id, 1))]
    if not index:
        raise ValueError("resampling left no training images")
    return data.subset(torch.tensor(index))


def _make_batch(data: ViewData, idx: torch.Tensor, memory_format, online, epoch: int):
    images = data.images[idx]
    if online is not None:  # a fresh augmentation draw per epoch, seeded by image id
        ids = [data.image_ids[i] for i in idx.tolist()]
        hwc = augment_batch(images.permute(0, 2, 3, 1).numpy(), ids, online, epoch)
        images = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    return as_float(images).contiguous(memory_format=memory_format), data.labels[idx]


def batches(data: ViewData, order: torch.Tensor, batch_size: int,
            memory_format=torch.contiguous_format, online=None, epoch: int = 0):
    """Yield (float batch, labels) in ``order``. With online augmentation the next batch
    is prepared on a background thread (OpenCV releases the GIL) while this one trains."""
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
