"""Crops that stay in their shards until a batch needs them (the ``stream`` loader).

:class:`ShardImages` stands where :class:`triview.train.data.ViewData` otherwise holds one
uint8 (N, 3, H, W) tensor of every crop. It keeps only where each crop lies (which shard,
at what offset, how many bytes: about 20 bytes a crop, against 150 KB decoded at 224 px),
and indexing it reads and decodes just those crops. Slicing and indexing return real
tensors, so the code that walks a tensor batch by batch (prediction, features, BatchNorm
recalibration) walks this the same way, and a branch's memory stays flat in the number of
photos. :meth:`ShardImages.subset` and :func:`concat` stay lazy.

Shards are read from a local folder (what KFP's launcher downloads for a task) with one
``pread`` per crop, or from an ``s3://`` prefix with one ranged GET per crop. Every
location is resolved through the folder's shard index when the array is built
(:func:`triview.shards.locate`): a reference outside the folder, to an unknown shard or
member, is refused before anything is read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from triview import shards, storage
from triview.crop import decode_png

#: The ``auto`` loader streams a split whose decoded crops would pass this many bytes.
AUTO_STREAM_BYTES = 2 * 1024 ** 3
_MAX_OPEN = 64  # open shard files kept per process


class ShardImages:
    """A lazy, read-only uint8 (N, 3, H, W) array of crops in shards (see the module)."""

    dtype = torch.uint8

    def __init__(self, files: list[str], file_of: np.ndarray, offset: np.ndarray,
                 size: np.ndarray, hw: tuple[int, int]) -> None:
        self.files = files                      # local paths or s3:// URIs
        self.file_of = np.asarray(file_of, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)  # -1: the whole file
        self.shape = torch.Size((len(self.file_of), 3, int(hw[0]), int(hw[1])))
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_refs(cls, root: str | os.PathLike, refs: Sequence[str]) -> "ShardImages":
        """The crops that the table references ``refs`` name in folder or ``s3://`` prefix
        ``root`` (shard members through its index, or plain files)."""
        root = str(root)
        if storage.is_s3(root):
            where = storage.join(root, shards.INDEX_FILE)
            data = storage.read_bytes_or_none(where)
            index = {} if data is None else shards.parse_index(data, where)
        else:
            index = shards.read_index(root)
        files: list[str] = []
        file_ids: dict[str, int] = {}
        file_of = np.empty(len(refs), np.int32)
        offset = np.empty(len(refs), np.int64)
        size = np.empty(len(refs), np.int64)
        for i, ref in enumerate(refs):
            rel, offset[i], size[i] = shards.locate(root, ref, index)
            if rel not in file_ids:
                file_ids[rel] = len(files)
                files.append(storage.join(root, rel))
            file_of[i] = file_ids[rel]
        images = cls(files, file_of, offset, size, (0, 0))
        if len(refs):
            h, w = images.decode(0).shape[:2]
            images.shape = torch.Size((len(refs), 3, h, w))
        return images

    def subset(self, idx) -> "ShardImages":
        """The crops at positions ``idx``, still unread."""
        idx = _positions(idx, len(self))
        out = ShardImages(self.files, self.file_of[idx], self.offset[idx], self.size[idx],
                          tuple(self.shape[2:]))
        return out

    @property
    def nbytes(self) -> int:
        """What the crops would take decoded."""
        return int(np.prod(self.shape))

    def shard_of(self) -> np.ndarray:
        """For each crop, the index of the file (shard) it lies in."""
        return self.file_of

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.file_of)

    def __getstate__(self) -> dict:  # to a spawned worker: no open files
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def _read(self, i: int) -> bytes:
        where, offset, size = self.files[self.file_of[i]], int(self.offset[i]), int(self.size[i])
        if storage.is_s3(where):
            if size < 0:
                return storage.get_bytes(where)
            data = storage.default_store().get_range(where, offset, size)
        elif size < 0:
            return Path(where).read_bytes()
        else:
            data = os.pread(self._fd(int(self.file_of[i])), size, offset)
        if len(data) != size:
            raise ValueError(f"shard {where} is truncated at byte {offset}")
        return data

    def _fd(self, file: int) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(file)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN:
                self.close()
            fd = self._fds[file] = os.open(self.files[file], os.O_RDONLY)
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def decode(self, i: int) -> np.ndarray:
        """Crop ``i`` as RGB uint8 (H, W, 3)."""
        where = f"the crop at byte {int(self.offset[i])} of {self.files[self.file_of[i]]}"
        image = decode_png(self._read(i), where)
        if self.shape[2] and image.shape[:2] != tuple(self.shape[2:]):
            raise ValueError(f"{where} is {image.shape[0]}x{image.shape[1]}, "
                             f"the others {self.shape[2]}x{self.shape[3]}")
        return image

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return torch.from_numpy(self.decode(_positions([key], len(self))[0])).permute(2, 0, 1)
        idx = _positions(key, len(self))
        out = torch.empty((len(idx), *self.shape[1:]), dtype=torch.uint8)
        for j, i in enumerate(idx):
            out[j] = torch.from_numpy(self.decode(int(i))).permute(2, 0, 1)
        return out

    def materialize(self) -> torch.Tensor:
        """Every crop, decoded into one tensor (the ``memory`` loader): one crop at a time
        into the tensor, never a second copy of all of them."""
        return self[:]


def _positions(key, n: int) -> np.ndarray:
    if isinstance(key, slice):
        return np.arange(n)[key]
    if isinstance(key, torch.Tensor):
        key = key.cpu().numpy()
    idx = np.asarray(key, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of range for {n} crops")
    return np.where(idx < 0, idx + n, idx)


def take(images, idx):
    """``images[idx]``; for :class:`ShardImages`, the lazy subset (nothing read)."""
    if isinstance(images, ShardImages):
        return images.subset(idx)
    return images[idx]


def concat(parts: list) -> "torch.Tensor | ShardImages":
    """Crops of several arrays one after the other: ``torch.cat`` for tensors, a lazy
    :class:`ShardImages` for shard-backed ones."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    if not all(isinstance(p, ShardImages) for p in parts):
        raise TypeError("cannot join crops in memory with crops in shards")
    sizes = {tuple(p.shape[2:]) for p in parts if len(p)}
    if len(sizes) > 1:
        raise ValueError(f"crops of different sizes cannot be joined: {sorted(sizes)}")
    ids: dict[str, int] = {}  # each file once, numbered in order of first use
    file_of = []
    for part in parts:
        remap = np.array([ids.setdefault(f, len(ids)) for f in part.files] or [0], np.int32)
        file_of.append(remap[part.file_of] if len(part) else part.file_of)
    return ShardImages(list(ids), np.concatenate(file_of), np.concatenate([p.offset for p in parts]),
                       np.concatenate([p.size for p in parts]), next(iter(sizes), (0, 0)))


def use_stream(loader: str, images: ShardImages) -> bool:
    """Whether the ``loader`` parameter streams these crops (``auto``: when they would take
    more than :data:`AUTO_STREAM_BYTES` decoded)."""
    if loader not in ("auto", "memory", "stream"):
        raise ValueError(f"loader {loader!r}: auto, memory or stream")
    return loader == "stream" or (loader == "auto" and images.nbytes > AUTO_STREAM_BYTES)
