"""The crop cache: the data contract of calibrate-and-crop's content-addressed cache, kept
across runs under ``<cache_root>/crops/`` (a folder or an ``s3://`` prefix).

A scheduled run on last week's photos plus a few new ones should decode, undistort and
crop only the new ones. Each entry holds the three view crops (PNG bytes) of one stored
photo and is addressed by everything that decides them:

* the photo: a digest of the bytes calibrate-and-crop reads (ingest's stored image), and
  whether it is decoded as a JPEG (DCT-scaled decoding);
* the recipe: the lens model (K, distortion, calibrated size, alpha, crop_roi), the crop
  geometry (layout, overlap, window, image_size, resize), the supersampling factor,
  :data:`RECIPE_VERSION` (raised whenever the cropping code changes its output) and
  OpenCV's version.

The recipe's digest names a folder; a run adds the entries it computed there as *packs*,
so that the cache, like the artifacts, holds a few large objects rather than one per photo
(a million photos would otherwise be a million GETs per run)::

    crops/<recipe>/<pack>.tar    a WebDataset shard: members <photo digest>.<view>.png
    crops/<recipe>/<pack>.json   {"format": "triview-crop-pack", "version": 1,
                                  "shard": "<pack>.tar", "views": [...],
                                  "entries": {"<photo digest>": [[offset, size, crc32], ...]}}

one ``[offset, size, crc32]`` per view, in the order of ``views``. A pack's index is written
after its shard, so a listed index always has its shard. Pack names begin with their UTC
time, so they sort in writing order, and a later pack's entry for a photo wins.

Safety: a changed parameter, lens or library never meets an old entry (another folder),
and an old recipe's folder can be deleted as a whole. Every read is checked against its
CRC-32: a damaged entry (a flipped byte, a truncated shard) is not used; an older entry of
the photo is read instead, or the photo is computed again and its new entry, in a newer
pack, replaces it. A cache that cannot be read or written (a
storage error) is turned off for the rest of the process with one warning: the run never
fails because of its cache. Shards and indexes are written atomically (a local rename, or
one S3 PUT each), so concurrent runs may share one cache.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import tempfile
import time
import zlib
from array import array
from pathlib import Path

from triview import storage
from triview.shards import SHARD_BYTES, TarAppender

log = logging.getLogger(__name__)

#: Raise when the cropping code changes what it writes for the same photo and recipe, or
#: the photo digest changes (2: SHA-256; a recipe's folder of another version is never read).
RECIPE_VERSION = 2
CROPS_PREFIX = "crops"
PACK_FORMAT = "triview-crop-pack"
PACK_VERSION = 1
_MAX_ENTRY = 1 << 30  # no crop PNG comes near this; an index that says more is damaged


def recipe_digest(recipe: dict) -> str:
    """The digest of everything besides the photo that decides its crops: ``recipe`` (the
    lens, the geometry, the supersampling: :func:`triview.crop.crop_recipe`) with
    :data:`RECIPE_VERSION` and OpenCV's version."""
    import cv2

    spec = {"version": RECIPE_VERSION, "opencv": cv2.__version__, **recipe}
    text = json.dumps(spec, sort_keys=True, default=list)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def photo_key(data: bytes, jpeg: bool) -> bytes:
    """The digest (20 bytes) of a stored photo's bytes and how they are decoded."""
    digest = hashlib.sha256(b"jpeg\0" if jpeg else b"other\0")  # SHA-256: hardware-assisted on
    digest.update(data)                                          # most CPUs, twice blake2b's speed
    return digest.digest()[:20]


def photo_digest(data: bytes, jpeg: bool) -> str:
    """:func:`photo_key` as the 40 hex digits that name a photo in a pack."""
    return photo_key(data, jpeg).hex()


def _key(photo: str | bytes) -> bytes:
    """A photo's key as its 20 bytes (it may come as its hex digits); a ValueError for
    anything else (a pack index with such a key would be refused whole)."""
    key = bytes.fromhex(photo) if isinstance(photo, str) else bytes(photo)
    if len(key) != 20:
        raise ValueError(f"a photo key is 20 bytes (40 hex digits), not {photo!r}")
    return key


def parse_pack_index(data: bytes, views: tuple[str, ...]) -> tuple[str, list[bytes], array] | None:
    """(shard name, its photo digests (20 bytes each), their spans: one flat array of
    offset, size, crc32 per view per photo, in the digests' order) of a pack's index; None
    when it is damaged, of another format or version, or holds other views. The checks run
    over whole columns (C loops), not value by value."""
    try:
        index = json.loads(data)
        if index.get("format") != PACK_FORMAT or index.get("version") != PACK_VERSION or \
                tuple(index.get("views", ())) != tuple(views):
            return None
        shard, entries = index["shard"], index["entries"]
        if not isinstance(shard, str) or "/" in shard or shard.startswith(".") or \
                not shard.endswith(".tar") or not isinstance(entries, dict):
            return None
        photos, per_photo = list(map(bytes.fromhex, entries)), list(entries.values())
        spans = list(itertools.chain.from_iterable(per_photo))
        if set(map(len, photos)) - {20} or set(map(len, per_photo)) - {len(views)} or \
                set(map(len, spans)) - {3}:
            return None
        values = list(itertools.chain.from_iterable(spans))
        if set(map(type, values)) - {int}:  # no floats, strings or booleans
            return None
        flat = array("q", values)  # a value past 64 bits: OverflowError
        if flat and (min(flat) < 0 or max(flat[1::3]) > _MAX_ENTRY or max(flat[2::3]) >= 2 ** 32):
            return None
        return shard, photos, flat
    except Exception:  # noqa: BLE001  (a damaged index: its entries are computed again)
        return None


class _PackWriter:
    """One pack being written: a tar in a temporary file (beside its place in a local
    cache, or in ``scratch`` for an ``s3://`` one) and its entries."""

    def __init__(self, folder: str, scratch: Path) -> None:
        now = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10 ** 9))
        self.name = f"{stamp}.{now % 10 ** 9:09d}-{secrets.token_hex(6)}"
        self.shard = storage.join(folder, f"{self.name}.tar")
        # locally the shard is written beside its place and renamed into it (storage.atomic_path)
        self._place = None if storage.is_s3(folder) else storage.atomic_path(self.shard)
        self.tmp = self._place.__enter__() if self._place is not None else \
            Path(tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tar", dir=scratch)[1])
        self.tar = TarAppender(open(self.tmp, "wb", buffering=1 << 20))
        self.entries: dict[str, list[list[int]]] = {}

    def add(self, photo: str, views: tuple[str, ...], pngs: dict[str, bytes]) -> None:
        self.entries[photo] = [[self.tar.add(f"{photo}.{view}.png", pngs[view]),
                                len(pngs[view]), zlib.crc32(pngs[view])] for view in views]

    def publish(self, folder: str, views: tuple[str, ...]) -> None:
        """Close the shard, move it into place, then write its index."""
        self.tar.close()
        if self._place is None:
            storage.default_store().upload_file(self.tmp, self.shard)
            self.tmp.unlink()
        else:
            self._place, place = None, self._place
            place.__exit__(None, None, None)
        storage.atomic_write_bytes(storage.join(folder, f"{self.name}.json"), json.dumps(
            {"format": PACK_FORMAT, "version": PACK_VERSION, "shard": f"{self.name}.tar",
             "views": list(views), "entries": self.entries}, separators=(",", ":")).encode())

    def discard(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)
        self._place = None

    @property
    def size(self) -> int:
        return self.tar.offset


class CropCache:
    """The entries of one recipe under ``root`` (a folder or ``s3://`` prefix): :meth:`get`
    reads one, :meth:`put` adds one to this run's pack, :meth:`close` publishes the pack.
    ``pack_bytes``: a pack is published and a new one begun before it passes this size."""

    def __init__(self, root: str, recipe: dict, views: tuple[str, ...],
                 pack_bytes: int = SHARD_BYTES) -> None:
        self.root = str(root)
        self.recipe = recipe_digest(recipe)
        self.folder = storage.join(self.root, CROPS_PREFIX, self.recipe)
        self.views = tuple(views)
        self.pack_bytes = pack_bytes
        self.off = False  # set by the first storage error
        # Every entry of the recipe's packs, held compactly (a million photos: about 150 MB,
        # not the ~800 MB of the parsed JSON): entry e is pack _pack[e], spans _spans[e*k:(e+1)*k]
        self._where: dict[bytes, int] | None = None  # photo digest -> its newest entry
        self._spans = array("q")  # per entry: offset, size, crc32 per view
        self._pack = array("i")   # per entry: its pack number
        self._shards: list[str] = []  # the packs' shard names, by pack number
        self._older: dict[bytes, list[int]] = {}  # a photo in more packs: its older entries
        self._local: dict[int, int] = {}  # pack number -> an open file descriptor
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._writer: _PackWriter | None = None

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="triview-cropcache-")
        return Path(self._scratch.name)

    def _index(self) -> dict[bytes, int]:
        """Every entry of the recipe's packs, read once (a later pack's entry wins)."""
        if self._where is None:
            self._where = {}
            try:
                names = [] if self.off else storage.children(self.folder)
                for name in names:
                    if name.startswith(".") or not name.endswith(".json"):
                        continue
                    parsed = parse_pack_index(
                        storage.read_bytes_or_none(storage.join(self.folder, name)) or b"", self.views)
                    if parsed is None:
                        continue
                    shard, photos, spans = parsed
                    self._shards.append(shard)
                    base, where = len(self._pack), self._where
                    self._pack.extend(array("i", [len(self._shards) - 1]) * len(photos))
                    self._spans.extend(spans)
                    for entry, photo in enumerate(photos, base):
                        if photo in where:  # kept, for when the newer one is damaged
                            self._older.setdefault(photo, []).insert(0, where[photo])
                        where[photo] = entry
            except Exception as exc:  # noqa: BLE001  (the run never fails because of its cache)
                self._give_up("read", self.folder, exc)
                self._where = {}
        return self._where

    def __contains__(self, photo: str | bytes) -> bool:
        return not self.off and _key(photo) in self._index()

    def _fd(self, number: int) -> int:
        """An open descriptor of pack ``number``'s shard (downloaded first from S3)."""
        if number not in self._local:
            where = storage.join(self.folder, self._shards[number])
            if storage.is_s3(where):
                path = self._scratch_dir() / self._shards[number]
                storage.default_store().download_file(where, path)
            else:
                path = Path(where)
            self._local[number] = os.open(path, os.O_RDONLY)
        return self._local[number]

    def get(self, photo: str | bytes) -> dict[str, bytes | memoryview] | None:
        """The views' PNG bytes of a photo digest (bytes-like: views of one read), or None
        (absent, damaged or unreadable).
        Of a photo in several packs the newest entry is read, an older one when it is damaged."""
        key = _key(photo)
        found = None if self.off else self._index().get(key)
        if found is None:
            return None
        pngs = self._read(found)
        if pngs is not None or self.off or key not in self._older:
            return pngs
        for entry in self._older[key]:
            pngs = self._read(entry)
            if pngs is not None or self.off:
                return pngs
        return None

    def _read(self, entry: int) -> dict[str, bytes] | None:
        number, width = self._pack[entry], 3 * len(self.views)
        try:
            fd = self._fd(number)
        except FileNotFoundError:  # a shard deleted under its index: computed again
            return None
        except Exception as exc:  # noqa: BLE001  (the run never fails because of its cache)
            self._give_up("read", storage.join(self.folder, self._shards[number]), exc)
            return None
        flat = self._spans[entry * width:(entry + 1) * width]
        values = iter(flat)
        spans = list(zip(values, values, values))  # (offset, size, crc32) per view
        start, end, total = flat[0], 0, 0
        for offset, size, _ in spans:
            start, end, total = min(start, offset), max(end, offset + size), total + size
        together = end - start <= total + 1024 * len(spans)
        try:
            # the views: one read, and views of it (not copies: a 224 px photo's crops are
            # ~300 KB, and every copy of them costs)
            block = memoryview(os.pread(fd, end - start, start)) if together else None
            pngs = {}
            for view, (offset, size, crc) in zip(self.views, spans):
                data = block[offset - start:offset - start + size] if together else \
                    os.pread(fd, size, offset)
                if len(data) != size or zlib.crc32(data) != crc:
                    return None  # damaged: computed again, and the new entry replaces it
                pngs[view] = data
        except OSError:  # an offset the file cannot seek to: damaged
            return None
        return pngs

    def put(self, photo: str | bytes, views: dict[str, bytes]) -> bool:
        """Add a photo's view PNGs to this run's pack; False when the cache cannot be written
        (a key that is not 20 bytes is a ValueError: it would spoil its pack's index)."""
        name = _key(photo).hex()
        if self.off:
            return False
        try:
            if self._writer is not None and self._writer.entries and \
                    self._writer.size + sum(map(len, views.values())) > self.pack_bytes:
                self._publish()
            if self._writer is None:
                self._writer = _PackWriter(self.folder, self._scratch_dir())
            self._writer.add(name, self.views, views)
        except Exception as exc:  # noqa: BLE001  (the run never fails because of its cache)
            self._give_up("write", self.folder, exc)
            return False
        return True

    def _publish(self) -> None:
        writer, self._writer = self._writer, None
        try:
            writer.publish(self.folder, self.views)
        except BaseException:
            writer.discard()
            raise

    def close(self) -> None:
        """Publish this run's last pack and release what reading held."""
        try:
            if self._writer is not None and not self.off:
                self._publish()
        except Exception as exc:  # noqa: BLE001  (the run never fails because of its cache)
            self._give_up("write", self.folder, exc)
        finally:
            if self._writer is not None:
                self._writer.discard()
                self._writer = None
            for fd in self._local.values():
                os.close(fd)
            self._local.clear()
            if self._scratch is not None:
                self._scratch.cleanup()
                self._scratch = None

    def __enter__(self) -> "CropCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _give_up(self, what: str, where: str, exc: Exception) -> None:
        """One storage error turns the cache off for the rest of this process: a store that
        is down would otherwise cost its retries and timeouts on every photo."""
        self.off = True
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        log.warning("crop cache: cannot %s %s (%s); the cache is off for the rest of this "
                    "process, the run goes on", what, where, exc)
