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

The recipe's digest names a folder, the photo's digest the entry in it
(``crops/<recipe>/<photo[:2]>/<photo>.npz``), so a changed parameter, lens or library
never meets an old entry, and an old recipe's folder can be deleted as a whole. A damaged
entry (each member of the ``.npz`` carries its CRC-32) is not used but computed again and
rewritten, and a cache that cannot be read or written (a storage error) is turned off for the
rest of the process with one warning: the run never fails because of its cache. Entries are written atomically
(a local rename, or one S3 PUT), so concurrent workers and runs may share one cache.
"""
from __future__ import annotations

import hashlib
import io
import json

import logging

import numpy as np

from triview import storage

log = logging.getLogger(__name__)

#: Raise when the cropping code changes what it writes for the same photo and recipe.
RECIPE_VERSION = 1
CROPS_PREFIX = "crops"


def recipe_digest(recipe: dict) -> str:
    """The digest of everything besides the photo that decides its crops: ``recipe`` (the
    lens, the geometry, the supersampling: :func:`triview.crop.crop_recipe`) with
    :data:`RECIPE_VERSION` and OpenCV's version."""
    import cv2

    spec = {"version": RECIPE_VERSION, "opencv": cv2.__version__, **recipe}
    text = json.dumps(spec, sort_keys=True, default=list)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def photo_digest(data: bytes, jpeg: bool) -> str:
    """The digest of a stored photo's bytes and how they are decoded."""
    return hashlib.blake2b(data, digest_size=20, person=b"jpeg" if jpeg else b"other").hexdigest()


def encode_entry(views: dict[str, bytes]) -> bytes:
    """One entry: the views' PNG bytes as the members of an ``.npz`` (a ZIP: each member
    carries its CRC-32, checked on reading; no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **{f"view_{name}": np.frombuffer(png, dtype=np.uint8) for name, png in views.items()})
    return buf.getvalue()


def decode_entry(data: bytes, views: tuple[str, ...]) -> dict[str, bytes] | None:
    """The PNG bytes of ``views`` from an entry; None when it is damaged (truncated, not an
    npz, a member failing its CRC) or lacks a view."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[f"view_{name}"].tobytes() for name in views}
    except Exception:  # noqa: BLE001  (any damage: the run never fails because of its cache)
        return None


class CropCache:
    """The entries of one recipe under ``root`` (a folder or ``s3://`` prefix)."""

    def __init__(self, root: str, recipe: dict, views: tuple[str, ...]) -> None:
        self.root = str(root)
        self.recipe = recipe_digest(recipe)
        self.views = tuple(views)
        self.off = False  # set by the first storage error

    def location(self, photo: str) -> str:
        return storage.join(self.root, CROPS_PREFIX, self.recipe, photo[:2], f"{photo}.npz")

    def get(self, photo: str) -> dict[str, bytes] | None:
        """The views' PNG bytes of a photo digest, or None (absent, damaged or unreadable)."""
        if self.off:
            return None
        try:
            data = storage.read_bytes_or_none(self.location(photo))
        except Exception as exc:  # noqa: BLE001  (the run never fails because of its cache)
            self._give_up("read", photo, exc)
            return None
        return None if data is None else decode_entry(data, self.views)

    def put(self, photo: str, views: dict[str, bytes]) -> bool:
        """Store a photo's view PNGs; False when the cache cannot be written."""
        if self.off:
            return False
        try:
            storage.atomic_write_bytes(self.location(photo), encode_entry(views))
        except Exception as exc:  # noqa: BLE001  (the run never fails because of its cache)
            self._give_up("write", photo, exc)
            return False
        return True

    def _give_up(self, what: str, photo: str, exc: Exception) -> None:
        """One storage error turns the cache off for the rest of this process: a store that
        is down would otherwise cost its retries and timeouts on every photo."""
        self.off = True
        log.warning("crop cache: cannot %s %s (%s); the cache is off for the rest of this "
                    "process, the run goes on", what, self.location(photo), exc)
