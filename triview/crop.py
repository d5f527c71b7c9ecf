"""Calibrate-and-crop: undistort each image with a lens model, then cut three
overlapping views and resize each to ``image_size``.

The lens model is the identity when no calibration is given; a calibrated model
(K, distortion) is applied through remap tables computed once per image size.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import cv2
import numpy as np

from triview.params import defaults

DEFAULTS = defaults("calibrate-and-crop")
from triview.shards import (SHARD_BYTES, ShardReader, ShardWriter, copy_shards, member_ref, read_index,
                            read_member, split_ref, write_index)
from triview.storage import atomic_path, atomic_write_text

if TYPE_CHECKING:  # pandas only where the manifest is written: the predictor runs without it
    import pandas as pd

LAYOUTS = {
    "horizontal": ("left", "center", "right"),
    "vertical": ("top", "center", "bottom"),
    # three centred windows, each keeping the image's aspect: the whole photo, then closer
    # in. For photos of one whole object (an insect, a product) every view keeps it.
    "nested": ("whole", "middle", "inner"),
}
NESTED_INNER = 0.5  # the inner view's share of each axis when window is 0
CROPS_DIR = "crops"
GEOMETRY_FILE = "geometry.json"
#: In the output of one shard of a fanned-out calibrate-and-crop: which part of the manifest
#: it cropped ({"shard", "shards", "photos"}: its index, their number, the manifest's photos).
PART_FILE = "part.json"


@dataclass
class LensModel:
    """Pinhole camera with OpenCV distortion coefficients; ``K=None`` means identity.

    ``image_size`` is the (width, height) K was calibrated at; images of another
    size get K scaled to theirs. ``alpha`` (0..1) chooses the new camera matrix
    with ``getOptimalNewCameraMatrix`` (0: only valid pixels, 1: all source
    pixels); ``None`` keeps K. ``crop_roi`` cuts the result to the valid region.
    """
    K: list[list[float]] | None = None
    dist: list[float] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    alpha: float | None = None
    crop_roi: bool = False

    @property
    def is_identity(self) -> bool:
        return self.K is None

    @classmethod
    def from_file(cls, path: str | Path, alpha: float | None = None,
                  crop_roi: bool = False) -> "LensModel":
        """From a calibration JSON written by ``triview calibrate`` or an OpenCV YAML/XML."""
        from triview.calibration import load_intrinsics

        cal = load_intrinsics(path)
        return cls(K=cal.K, dist=list(cal.dist),
                   image_size=tuple(cal.image_size) if cal.image_size else None,
                   alpha=alpha, crop_roi=crop_roi)

    def camera_matrix(self, width: int, height: int) -> np.ndarray:
        K = np.asarray(self.K, dtype=np.float64).copy()
        if self.image_size and tuple(self.image_size) != (width, height):
            sx, sy = width / self.image_size[0], height / self.image_size[1]
            K[0, :] *= sx
            K[1, :] *= sy
        return K


RESIZE_MODES = ("stretch", "letterbox")


@dataclass
class CropGeometry:
    """Where the three views lie and how they are resized.

    ``horizontal`` / ``vertical``: ``window`` is the share of the layout axis one view
    spans (0: derived from the overlap so that the three views exactly cover the axis);
    adjacent views share ``overlap`` of a window. ``nested``: centred windows of 1, (1 +
    w) / 2 and w of each axis, w = ``window`` (0: 0.5); ``overlap`` is not used.
    ``resize`` is ``stretch`` (fill image_size²) or ``letterbox`` (keep the aspect ratio,
    pad with black).
    """
    layout: str = DEFAULTS["layout"]
    overlap: float = DEFAULTS["overlap"]
    image_size: int = DEFAULTS["image_size"]
    window: float = DEFAULTS["window"]
    resize: str = DEFAULTS["resize"]

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {self.layout!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if not 0.0 <= self.window <= 1.0:
            raise ValueError(f"window must be in (0, 1] (or 0 for automatic), got {self.window}")
        if self.layout != "nested" and self.span > 1.0 + 1e-9:
            raise ValueError(f"window {self.window} with overlap {self.overlap} spans "
                             f"{self.span:.3f} of the image (> 1)")

    @property
    def window_fraction(self) -> float:
        """Share of the layout axis of one view (nested: of the smallest, the inner one)."""
        if self.layout == "nested":
            return self.window if self.window > 0 else NESTED_INNER
        return self.window if self.window > 0 else 1.0 / (3.0 - 2.0 * self.overlap)

    @property
    def span(self) -> float:
        """Share of the layout axis the three views cover together."""
        return self.window_fraction * (3.0 - 2.0 * self.overlap)

    @property
    def views(self) -> tuple[str, str, str]:
        return LAYOUTS[self.layout]


@dataclass
class UndistortMaps:
    map1: np.ndarray
    map2: np.ndarray
    roi: tuple[int, int, int, int] | None   # x, y, w, h of the valid region, when cropping


def undistort_maps(lens: LensModel, width: int, height: int) -> UndistortMaps | None:
    """Remap tables for one (camera, image size), computed once and reused for every
    image of that size; ``None`` for the identity lens."""
    if lens.is_identity:
        return None
    K = lens.camera_matrix(width, height)
    dist = np.asarray(lens.dist, dtype=np.float64)
    new_K, roi = K, None
    if lens.alpha is not None:
        new_K, valid = cv2.getOptimalNewCameraMatrix(K, dist, (width, height), lens.alpha,
                                                     (width, height))
        if lens.crop_roi and valid[2] > 0 and valid[3] > 0:
            roi = tuple(int(v) for v in valid)
    map1, map2 = cv2.initUndistortRectifyMap(K, dist, None, new_K, (width, height), cv2.CV_16SC2)
    return UndistortMaps(map1, map2, roi)


def undistort(image: np.ndarray, maps: UndistortMaps | None) -> np.ndarray:
    if maps is None:
        return image
    out = cv2.remap(image, maps.map1, maps.map2, interpolation=cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT)
    if maps.roi is not None:
        x, y, w, h = maps.roi
        out = out[y:y + h, x:x + w]
    return out


def view_fractions(geometry: CropGeometry) -> dict[str, tuple[float, float]]:
    """Start and end of each view along the layout axis, as fractions of it (centred)."""
    window = geometry.window_fraction
    step = window * (1.0 - geometry.overlap)
    offset = (1.0 - geometry.span) / 2.0
    return {name: (offset + i * step, offset + i * step + window)
            for i, name in enumerate(geometry.views)}


def view_boxes(width: int, height: int, geometry: CropGeometry) -> dict[str, tuple[int, int, int, int]]:
    """Pixel boxes ``(x0, y0, x1, y1)`` of the three views; each spans the full other axis
    (nested: centred boxes, the same share of both axes)."""
    if geometry.layout == "nested":
        inner = geometry.window_fraction
        boxes = {}
        for name, share in zip(geometry.views, (1.0, (1.0 + inner) / 2.0, inner)):
            w, h = max(1, int(round(width * share))), max(1, int(round(height * share)))
            x0, y0 = (width - w) // 2, (height - h) // 2
            boxes[name] = (x0, y0, x0 + w, y0 + h)
        return boxes
    along = width if geometry.layout == "horizontal" else height
    boxes = {}
    for name, (f0, f1) in view_fractions(geometry).items():
        a0 = max(0, int(round(f0 * along)))
        a1 = min(along, int(round(f1 * along)))
        boxes[name] = (a0, 0, a1, height) if geometry.layout == "horizontal" else (0, a0, width, a1)
    return boxes



@dataclass(frozen=True)
class _UndistortedFrame:
    """A lens's undistorted image of a ``width``×``height`` photo: the camera matrix, the
    new one of the undistorted image and the region kept of it (``crop_roi``)."""
    K: np.ndarray
    new_K: np.ndarray
    dist: np.ndarray
    region: tuple[int, int, int, int]

    @classmethod
    def of(cls, lens: LensModel, width: int, height: int) -> _UndistortedFrame:
        K = lens.camera_matrix(width, height)
        dist = np.asarray(lens.dist, dtype=np.float64)
        new_K, region = K, (0, 0, width, height)
        if lens.alpha is not None:
            new_K, valid = cv2.getOptimalNewCameraMatrix(K, dist, (width, height), lens.alpha,
                                                         (width, height))
            if lens.crop_roi and valid[2] > 0 and valid[3] > 0:
                region = tuple(int(v) for v in valid)
        return cls(K, new_K, dist, region)

    def to_source(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Undistorted pixel -> normalised ray -> distorted source pixel (flattened)."""
        rays = np.stack([(xs - self.new_K[0, 2]) / self.new_K[0, 0],
                         (ys - self.new_K[1, 2]) / self.new_K[1, 1], np.ones_like(xs)],
                        -1).reshape(-1, 1, 3)
        proj, _ = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), self.K, self.dist)
        return proj[:, 0, 0], proj[:, 0, 1]


def view_boxes_in_photo(lens: LensModel, geometry: CropGeometry, width: int, height: int
                        ) -> dict[str, tuple[float, float, float, float]]:
    """Where each view was cut from a ``width``×``height`` photo as taken: ``(x0, y0, x1,
    y1)`` in its pixels. With the identity lens these are :func:`view_boxes`; with a lens
    the crop is cut from the undistorted image, so its outline on the raw photo is curved,
    and the box is that outline's bounding box (the outline mapped back through the
    distortion as :class:`ViewSampler` maps every pixel), clipped to the photo."""
    if lens.is_identity:
        return {k: tuple(float(v) for v in b) for k, b in view_boxes(width, height, geometry).items()}
    frame = _UndistortedFrame.of(lens, width, height)
    rx, ry, rw, rh = frame.region
    t = np.linspace(0.0, 1.0, 33)
    boxes = {}
    for name, (x0, y0, x1, y1) in view_boxes(rw, rh, geometry).items():
        along_x, along_y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
        xs = rx + np.concatenate([along_x, np.full_like(t, x1), along_x, np.full_like(t, x0)])
        ys = ry + np.concatenate([np.full_like(t, y0), along_y, np.full_like(t, y1), along_y])
        px, py = frame.to_source(xs, ys)
        px, py = np.clip(px, 0, width), np.clip(py, 0, height)
        boxes[name] = (float(px.min()), float(py.min()), float(px.max()), float(py.max()))
    return boxes


def crop_views(image: np.ndarray, geometry: CropGeometry,
               maps: UndistortMaps | None = None) -> dict[str, np.ndarray]:
    """Undistort (when ``maps`` is given) and cut the views, each resized to image_size."""
    image = undistort(image, maps)
    h, w = image.shape[:2]
    return {name: resize_view(image[y0:y1, x0:x1], geometry)
            for name, (x0, y0, x1, y1) in view_boxes(w, h, geometry).items()}


def letterbox_size(width: int, height: int, side: int) -> tuple[int, int]:
    scale = side / max(width, height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def _pad_to_square(image: np.ndarray, side: int, value: float = 0, scale: int = 1) -> np.ndarray:
    """Centre ``image`` on a side² canvas; with ``scale`` the bars are those of the
    image at 1/scale size, times scale (so supersampled and final bars line up)."""
    h, w = image.shape[:2]
    top, left = ((side - h) // scale // 2) * scale, ((side - w) // scale // 2) * scale
    return cv2.copyMakeBorder(image, top, side - h - top, left, side - w - left,
                              cv2.BORDER_CONSTANT, value=value)


def resize_view(crop: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """Resize one crop to image_size² (stretch, or letterbox with black bars)."""
    side = geometry.image_size
    if geometry.resize == "stretch":
        return cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
    size = letterbox_size(crop.shape[1], crop.shape[0], side)
    return _pad_to_square(cv2.resize(crop, size, interpolation=cv2.INTER_AREA), side)


#: Views are sampled at this multiple of image_size, then area-averaged down (anti-aliasing).
SUPERSAMPLE = 2
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))


def choose_reduction(width: int, height: int, geometry: CropGeometry) -> int:
    """Largest JPEG DCT-scaling factor (1, 2, 4, 8) that still leaves every view at
    least SUPERSAMPLE x image_size pixels on its shorter side."""
    shorter = _view_short_side(width, height, geometry)
    for factor, _ in _REDUCED_FLAGS:
        if shorter / factor >= SUPERSAMPLE * geometry.image_size:
            return factor
    return 1


def decode_bgr(path: str | Path, reduction: int = 1) -> np.ndarray:
    """Decode an image file to 8-bit BGR, optionally at 1/2, 1/4 or 1/8 scale (JPEG
    decodes those directly from its DCT coefficients, far cheaper than a full decode)."""
    flag = dict(_REDUCED_FLAGS).get(reduction, cv2.IMREAD_COLOR)
    image = cv2.imread(str(path), flag)
    if image is None:
        raise ValueError(f"cannot decode image {path}")
    return image


def decode_bgr_bytes(data: bytes, reduction: int = 1) -> np.ndarray:
    """:func:`decode_bgr` of an image file's bytes (the same OpenCV decoder, from memory)."""
    flag = dict(_REDUCED_FLAGS).get(reduction, cv2.IMREAD_COLOR)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if image is None:
        raise ValueError("cannot decode image")
    return image


class ViewSampler:
    """Undistort + crop + resize of all three views fused into one small remap per view.

    Built once per (lens, geometry, source size, decoded size). For every output pixel
    of a view (sampled at up to SUPERSAMPLE x image_size, then area-averaged down) it
    computes where that point of the undistorted view lies in the distorted source —
    the same model ``initUndistortRectifyMap`` uses, evaluated only at the few thousand
    points the views need — and scales it to the (possibly DCT-reduced) decoded image.
    Each image then costs three small remaps instead of a full-frame remap, and the
    result matches :func:`crop_views` (full undistort, crop, area resize).
    """

    def __init__(self, lens: LensModel, geometry: CropGeometry, width: int, height: int,
                 reduction: int = 1, decoded_size: tuple[int, int] | None = None) -> None:
        """``width``×``height`` is the source image; the sampler reads images decoded
        at ``decoded_size`` (default: ceil(size / reduction), as JPEG DCT scaling gives)."""
        self.geometry = geometry
        w, h = decoded_size or (-(-width // reduction), -(-height // reduction))
        self.decoded_size = (w, h)
        frame = None if lens.is_identity else _UndistortedFrame.of(lens, width, height)
        rx, ry, rw, rh = (0, 0, width, height) if frame is None else frame.region
        boxes = view_boxes(rw, rh, geometry)
        # source pixels per output pixel, at the decoded scale
        shorter = min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes.values()) * w / width
        self.supersample = int(max(1, min(SUPERSAMPLE, shorter // geometry.image_size)))
        side = geometry.image_size * self.supersample
        self.maps = {}
        for name, (x0, y0, x1, y1) in boxes.items():
            if geometry.resize == "stretch":
                tw = th = side
            else:
                iw, ih = letterbox_size(x1 - x0, y1 - y0, geometry.image_size)
                tw, th = iw * self.supersample, ih * self.supersample
            # output pixel centres in undistorted source coordinates
            gx = rx + x0 + (np.arange(tw) + 0.5) * (x1 - x0) / tw - 0.5
            gy = ry + y0 + (np.arange(th) + 0.5) * (y1 - y0) / th - 0.5
            GX, GY = np.meshgrid(gx, gy)
            if frame is None:
                sx, sy = GX, GY
            else:
                sx, sy = frame.to_source(GX, GY)
                sx, sy = sx.reshape(th, tw), sy.reshape(th, tw)
            # source pixel centres -> decoded pixel centres
            fx = ((sx + 0.5) * (w / width) - 0.5).astype(np.float32)
            fy = ((sy + 0.5) * (h / height) - 0.5).astype(np.float32)
            if geometry.resize == "letterbox":  # -1 lies outside the image: black bars
                fx = _pad_to_square(fx, side, -1, self.supersample)
                fy = _pad_to_square(fy, side, -1, self.supersample)
            self.maps[name] = cv2.convertMaps(fx, fy, cv2.CV_16SC2)

    def sample(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if (image.shape[1], image.shape[0]) != self.decoded_size:
            raise ValueError(f"sampler built for {self.decoded_size}, image is "
                             f"{image.shape[1]}x{image.shape[0]}")
        side = self.geometry.image_size
        out = {}
        for name, (m1, m2) in self.maps.items():
            big = cv2.remap(image, m1, m2, interpolation=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT)
            out[name] = big if self.supersample == 1 else \
                cv2.resize(big, (side, side), interpolation=cv2.INTER_AREA)
        return out


def read_rgb(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_crop(folder: str | Path, ref: str) -> np.ndarray:
    """One crop of a views table as RGB: ``ref`` is the row's ``path``, a shard member
    (:mod:`triview.shards`) or a plain file in ``folder``."""
    return decode_png(read_member(folder, ref), f"crop {ref} in {folder}")


def decode_png(data: bytes, what: str) -> np.ndarray:
    """A stored crop's bytes as RGB uint8 (H, W, 3); ``what`` names it in the error."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode {what}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode a crop as PNG")
    return buf.tobytes()


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    data = encode_png(rgb)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe")


class _Cropper:
    """Per-process state: one ViewSampler per (source size, decoded size)."""

    def __init__(self, lens: LensModel, geometry: CropGeometry) -> None:
        self.lens, self.geometry = lens, geometry
        self.samplers: dict[tuple[int, int, int, int], ViewSampler] = {}

    def views(self, path: Path) -> dict[str, np.ndarray]:
        """The three RGB views of one image file."""
        path = Path(path)
        return self.views_of_bytes(path.read_bytes(), jpeg=path.suffix.lower() in _JPEG_SUFFIXES)

    def views_of_bytes(self, data: bytes, jpeg: bool) -> dict[str, np.ndarray]:
        """The three RGB views of one stored image's bytes (as ingest stores it: the
        original JPEG/PNG/WebP/BMP, or a normalised PNG); ``jpeg`` allows DCT-scaled decoding.
        Training (calibrate-and-crop), ``triview predict`` and the KServe predictor all
        crop through here."""
        src_w, src_h = _image_size(data)
        reduction = choose_reduction(src_w, src_h, self.geometry) if jpeg else 1
        views = self.views_of_image(decode_bgr_bytes(data, reduction), (src_w, src_h))
        return {k: cv2.cvtColor(v, cv2.COLOR_BGR2RGB) for k, v in views.items()}

    def views_of_image(self, image: np.ndarray, source_size: tuple[int, int]) -> dict[str, np.ndarray]:
        """The three views of an image already decoded (``source_size`` is the file's size;
        ``image`` may be its DCT-reduced decode), in ``image``'s channel order."""
        # Where DCT scaling could not shrink enough (not a JPEG, or a huge photo), area-
        # average down first so the remap never samples more than 2 source px per output.
        extra = int(_view_short_side(image.shape[1], image.shape[0], self.geometry)
                    // (2 * SUPERSAMPLE * self.geometry.image_size))
        if extra >= 2:
            image = cv2.resize(image, (max(1, image.shape[1] // extra),
                                       max(1, image.shape[0] // extra)),
                               interpolation=cv2.INTER_AREA)
        key = (*source_size, image.shape[1], image.shape[0])
        if key not in self.samplers:
            self.samplers[key] = ViewSampler(self.lens, self.geometry, *source_size,
                                             decoded_size=(image.shape[1], image.shape[0]))
        return self.samplers[key].sample(image)


def _view_short_side(width: int, height: int, geometry: CropGeometry) -> float:
    if geometry.layout == "nested":
        return min(width, height) * geometry.window_fraction
    along, across = (width, height) if geometry.layout == "horizontal" else (height, width)
    return min(along * geometry.window_fraction, across)


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.size


_WORKER: _Cropper | None = None


def _init_worker(lens: LensModel, geometry: CropGeometry) -> None:
    global _WORKER

    cv2.setNumThreads(1)  # one image per process; no nested thread pools
    _WORKER = _Cropper(lens, geometry)


def crop_recipe(lens: LensModel, geometry: CropGeometry) -> dict:
    """Everything besides a photo's bytes that decides its crops (the crop cache's key)."""
    return {"lens": asdict(lens), "geometry": asdict(geometry), "supersample": SUPERSAMPLE}


def _is_jpeg(ref: str) -> bool:
    """Whether a stored photo is decoded as a JPEG: by the suffix of the member (or file)
    the manifest's reference names, never the shard's."""
    shard, member = split_ref(ref)
    return os.path.splitext(member or shard)[1].lower() in _JPEG_SUFFIXES


def _crop_task(args: tuple[str, str]) -> dict[str, bytes]:
    """Crop one stored photo (ingest's folder, the manifest's reference to it: a shard
    member, or a plain file) into its view PNGs."""
    src, ref = args
    crops = _WORKER.views_of_bytes(read_member(src, ref), _is_jpeg(ref))
    return {view: encode_png(crop) for view, crop in crops.items()}


def _crop_chunk(tasks: list[tuple[str, str]]) -> list[dict[str, bytes]]:
    return [_crop_task(t) for t in tasks]


_POOL_MIN = 200  # photos to crop: fewer are cropped in-process (a pool's start costs more)
_MISSES_HELD = 1 << 16  # the cache's misses whose references the lookup keeps for the pool;
                        # past that (a first run) the manifest is read again for them


def _pool_context():
    """The crop pool's multiprocessing context, its server started now (a no-op when it
    runs). forkserver, because forking a parent whose OpenCV/OpenMP threads are running
    can deadlock; the server preloads this module, so each worker forks from a process that
    has imported OpenCV and NumPy instead of importing them itself, and a server started
    early (the cache lookup starts it at its 200th miss) does that import while the parent
    reads on."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    preload = getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", ["__main__"])
    context.set_forkserver_preload(list(dict.fromkeys([*preload, __name__])))  # added to, not replaced
    forkserver.ensure_running()
    return context


def bounded_map(pool, fn, items, chunk: int, window: int):
    """``fn`` over ``items`` (any iterable) in chunks on ``pool``, yielding each item's
    result in order, with at most ``window`` chunks in flight: the crops that wait for the
    writer stay a few chunks, however many photos there are (``Executor.map`` submits every
    chunk at once and keeps every finished result until it is consumed)."""
    from collections import deque

    items, pending = iter(items), deque()
    while batch := list(itertools.islice(items, chunk)):
        pending.append(pool.submit(fn, batch))
        if len(pending) >= window:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


@dataclass(frozen=True)
class Cropped:
    """What :func:`calibrate_and_crop` wrote: the photos, the crops (rows of ``views.csv``)
    and the photos whose crops were read from the cache."""

    photos: int
    crops: int
    cache_hits: int


def calibrate_and_crop(dataset_dir: str | Path, out_dir: str | Path, geometry: CropGeometry,
                       lens: LensModel | None = None, workers: int = 0,
                       cache_root: str = "", part: tuple[int, int] = (0, 1),
                       shard_bytes: int = SHARD_BYTES) -> Cropped:
    """Crop every manifest image into views under ``out_dir``; write ``views.csv`` (row
    by row, as the crops are written: the parent holds no table of crops).

    Views are materialised as small PNGs (image_size²): decoding a full photo costs far
    more than reading a crop, so each photo is decoded once, not once per epoch. They are
    written into WebDataset tar shards per view and split (``crops/<view>/<split>/``,
    :mod:`triview.shards`, at most ``shard_bytes`` each) with an index, in manifest order,
    so that a reader of one view's training crops reads nothing else.
    ``workers`` processes share the work (0: one per core; small inputs stay in-process).
    ``cache_root`` (a folder or ``s3://`` prefix): the content-addressed crop cache
    (:mod:`triview.cropcache`); photos cropped before with the same lens and geometry are
    read from it, new ones are cropped and added. ``part`` = (shard, shards): crop only that contiguous part of
    the manifest, one of ``shards`` of (nearly) equal size, and write :data:`PART_FILE`
    (a fan-out over shards, merged by :func:`collect_parts`).
    Also writes ``classes.json`` and ``geometry.json`` (crop geometry and lens).
    """
    from concurrent.futures import ProcessPoolExecutor

    from triview import manifest as mf

    lens = lens or LensModel()
    src, out = Path(dataset_dir), Path(out_dir)
    shard, shards = part
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: expected 0 <= shard < shards")
    manifest = src / mf.MANIFEST_FILE
    photos = None  # counted first only where it is needed before the lookup counts them
    if shards > 1 or not cache_root:
        photos = sum(1 for _ in mf.iter_table(manifest, mf.IMAGE_COLUMNS))
    start, stop = (shard * photos // shards, (shard + 1) * photos // shards) if photos is not None \
        else (0, None)

    def rows():  # this part's manifest rows, read as they are used: the table is never held
        return itertools.islice(mf.iter_table(manifest, mf.IMAGE_COLUMNS), start, stop)

    out.mkdir(parents=True, exist_ok=True)
    workers = workers or (os.cpu_count() or 1)
    hits = 0
    writers = {(view, split): ShardWriter(out, f"{CROPS_DIR}/{view}/{split}", shard_bytes)
               for view in geometry.views for split in mf.SPLITS}
    with contextlib.ExitStack() as stack:
        table = stack.enter_context(mf.views_writer(out))  # row by row; in place after the shards
        for writer in writers.values():
            stack.enter_context(writer)
        cache, keys, cached, missed = None, bytearray(), bytearray(), None  # a digest: 20 bytes
        if cache_root:
            from triview.cropcache import CropCache, photo_key

            cache = stack.enter_context(CropCache(cache_root, crop_recipe(lens, geometry), geometry.views))
            reader = stack.enter_context(ShardReader(src))
            missed, misses = [], 0  # the misses' references, while they are few
            for rec in rows():
                key = photo_key(reader.read(rec["path"]), _is_jpeg(rec["path"]))
                keys += key
                cached.append(key in cache)
                if not cached[-1]:
                    misses += 1
                    if misses > _MISSES_HELD:
                        missed = None
                    if missed is not None:
                        missed.append(rec["path"])
                    if misses == _POOL_MIN and workers > 1:  # a pool will crop them: its
                        _pool_context()                      # server starts (and loads) now
            if stop is None:
                photos = stop = len(cached)
        if missed is not None:
            tasks = ((str(src), ref) for ref in missed)
        else:  # every photo, or the misses read again from the manifest
            tasks = ((str(src), rec["path"]) for i, rec in enumerate(rows()) if not (cache and cached[i]))
        if workers > 1 and stop - start - sum(cached) >= _POOL_MIN:
            pool = stack.enter_context(ProcessPoolExecutor(
                workers, mp_context=_pool_context(), initializer=_init_worker,
                initargs=(lens, geometry)))
            results = bounded_map(pool, _crop_chunk, tasks, chunk=64, window=2 * workers)
        else:
            _init_worker(lens, geometry)
            results = map(_crop_task, tasks)
        by_split = {split: [(view, writers[view, split]) for view in geometry.views] for split in mf.SPLITS}
        for i, rec in enumerate(rows()):
            key = bytes(keys[20 * i:20 * i + 20])
            pngs = cache.get(key) if cache and cached[i] else None
            if pngs is not None:
                hits += 1
            else:
                if cache and cached[i]:  # a damaged entry: cropped here, and stored again
                    _WORKER or _init_worker(lens, geometry)
                    pngs = _crop_task((str(src), rec["path"]))
                else:
                    pngs = next(results)
                if cache is not None:
                    cache.put(key, pngs)
            image_id, split = rec["image_id"], rec["split"]
            member = f"{image_id}.png"
            for view, writer in by_split[split]:
                table.row((image_id, view, writer.add(member, pngs[view]), rec["label"], rec["labels"],
                           rec["source_id"], split, 0))
    write_index(out, {name: entry for w in writers.values() for name, entry in w.entries.items()})
    mf.write_classes(mf.read_classes(src), out)
    atomic_write_text(out / GEOMETRY_FILE, json.dumps(
        {"geometry": asdict(geometry), "views": list(geometry.views), "lens": asdict(lens)}, indent=2))
    if shards > 1:
        atomic_write_text(out / PART_FILE, json.dumps({"shard": shard, "shards": shards,
                                                       "photos": photos}))
    return Cropped(photos=stop - start, crops=table.rows, cache_hits=hits)


def collect_parts(part_dirs: list[str | Path], out_dir: str | Path) -> pd.DataFrame:
    """Merge the outputs of a calibrate-and-crop fan-out (each with :data:`PART_FILE`) into
    one folder that is what a single calibrate-and-crop would have written: the crops, one
    ``views.csv`` in manifest order, ``classes.json``, ``geometry.json`` (and a calibration).
    A missing or repeated shard, or shards of another geometry, lens or class list, is an
    error; a crop path that is not a member of one of its part's crop shards is refused.
    The crop shards are copied whole (renumbered per view and split), never unpacked."""
    import pandas as pd

    from triview import manifest as mf

    parts = []
    for folder in map(Path, part_dirs):
        info = folder / PART_FILE
        if not info.is_file():
            raise ValueError(f"{folder} is not a shard of calibrate-and-crop (no {PART_FILE})")
        parts.append((json.loads(info.read_text()), folder))
    parts.sort(key=lambda part: part[0]["shard"])
    counts = {(p["shards"], p["photos"]) for p, _ in parts}
    shards = parts[0][0]["shards"] if parts else 0
    if len(counts) != 1 or [p["shard"] for p, _ in parts] != list(range(shards)):
        raise ValueError(f"expected shards 0..{shards - 1} of one manifest once each, got "
                         f"{sorted((p['shard'], p['shards']) for p, _ in parts)}")
    first = parts[0][1]
    geometry, classes = json.loads((first / GEOMETRY_FILE).read_text()), mf.read_classes(first)
    for _, folder in parts[1:]:
        if json.loads((folder / GEOMETRY_FILE).read_text()) != geometry or mf.read_classes(folder) != classes:
            raise ValueError(f"{folder} was cropped with another geometry, lens or class list "
                             f"than {first}")
    out = Path(out_dir)
    tables, index, counters = [], {}, {}
    for _, folder in parts:
        table = mf.read_views(folder).copy()
        shards = read_index(folder)
        rename = {}
        for name in shards:  # sorted: per view and split, in writing order
            series = PurePosixPath(name).parent
            if series.parent.parent != PurePosixPath(CROPS_DIR) or \
                    series.parent.name not in geometry["views"] or series.name not in mf.SPLITS:
                raise ValueError(f"{folder}: shard {name!r} is not below {CROPS_DIR}/<view>/<split>/")
            rename[name] = f"{series}/{counters.setdefault(series, 0):06d}.tar"
            counters[series] += 1
        paths = []
        for rel in table["path"]:
            shard, member = split_ref(rel)
            if member is None or shard not in rename:
                raise ValueError(f"{folder}: crop path {rel!r} is not a member of a shard below "
                                 f"{CROPS_DIR}/")
            paths.append(member_ref(rename[shard], member))
        table["path"] = paths
        index.update(copy_shards(folder, out, rename))
        tables.append(table)
    write_index(out, index)
    views = pd.concat(tables, ignore_index=True)
    if views["image_id"].nunique() != parts[0][0]["photos"]:
        raise ValueError(f"the shards hold {views['image_id'].nunique()} photos, the manifest "
                         f"{parts[0][0]['photos']}")
    mf.write_views(views, out)
    mf.write_classes(classes, out)
    atomic_write_text(out / GEOMETRY_FILE, json.dumps(geometry, indent=2))
    if (first / "calibration.json").is_file():
        atomic_write_text(out / "calibration.json", (first / "calibration.json").read_text())
    return views


def read_geometry(folder: str | Path) -> tuple[CropGeometry, LensModel]:
    data = json.loads((Path(folder) / GEOMETRY_FILE).read_text())
    lens = data["lens"]
    if lens.get("image_size"):
        lens["image_size"] = tuple(lens["image_size"])
    return CropGeometry(**data["geometry"]), LensModel(**lens)
