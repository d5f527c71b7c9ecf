"""Calibrate-and-crop: undistort each image with a lens model, then cut three
overlapping views and resize each to ``image_size``.

The lens model is the identity when no calibration is given; a calibrated model
(K, distortion) is applied through remap tables computed once per image size.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from triview import manifest as mf
from triview.storage import atomic_path, atomic_write_text

LAYOUTS = {
    "horizontal": ("left", "center", "right"),
    "vertical": ("top", "center", "bottom"),
}
CROPS_DIR = "crops"
GEOMETRY_FILE = "geometry.json"


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


@dataclass
class CropGeometry:
    layout: str = "horizontal"
    overlap: float = 0.5
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {self.layout!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")

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


def view_boxes(width: int, height: int, geometry: CropGeometry) -> dict[str, tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)`` of the three views.

    Adjacent windows share ``overlap`` of a window's extent, so a window spans
    ``extent / (3 - 2 * overlap)`` along the layout axis and the full other axis.
    """
    along = width if geometry.layout == "horizontal" else height
    window = along / (3.0 - 2.0 * geometry.overlap)
    step = window * (1.0 - geometry.overlap)
    boxes = {}
    for i, name in enumerate(geometry.views):
        a0 = int(round(i * step))
        a1 = min(along, int(round(i * step + window)))
        boxes[name] = (a0, 0, a1, height) if geometry.layout == "horizontal" else (0, a0, width, a1)
    return boxes


def crop_views(image: np.ndarray, geometry: CropGeometry,
               maps: UndistortMaps | None = None) -> dict[str, np.ndarray]:
    """Undistort (when ``maps`` is given) and cut the views, each resized to image_size."""
    image = undistort(image, maps)
    h, w = image.shape[:2]
    size = (geometry.image_size, geometry.image_size)
    return {name: cv2.resize(image[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA)
            for name, (x0, y0, x1, y1) in view_boxes(w, h, geometry).items()}


def read_rgb(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def calibrate_and_crop(dataset_dir: str | Path, out_dir: str | Path, geometry: CropGeometry,
                       lens: LensModel | None = None) -> pd.DataFrame:
    """Crop every manifest image into views under ``out_dir``; write ``views.csv``.

    Also copies ``classes.json`` and writes ``geometry.json`` (crop geometry and lens).
    """
    lens = lens or LensModel()
    src, out = Path(dataset_dir), Path(out_dir)
    table = mf.read_manifest(src)
    maps_cache: dict[tuple[int, int], UndistortMaps | None] = {}
    rows = []
    for rec in table.itertuples(index=False):
        image = read_rgb(src / rec.path)
        key = (image.shape[1], image.shape[0])
        if key not in maps_cache:
            maps_cache[key] = undistort_maps(lens, *key)
        for view, crop in crop_views(image, geometry, maps_cache[key]).items():
            rel = f"{CROPS_DIR}/{view}/{rec.image_id}.png"
            write_png(out / rel, crop)
            rows.append({"image_id": rec.image_id, "view": view, "path": rel, "label": rec.label,
                         "labels": rec.labels, "source_id": rec.source_id, "split": rec.split,
                         "augmented": 0})
    views = pd.DataFrame(rows, columns=list(mf.VIEW_COLUMNS))
    mf.write_views(views, out)
    mf.write_classes(mf.read_classes(src), out)
    atomic_write_text(out / GEOMETRY_FILE, json.dumps(
        {"geometry": asdict(geometry), "views": list(geometry.views), "lens": asdict(lens)}, indent=2))
    return views


def read_geometry(folder: str | Path) -> tuple[CropGeometry, LensModel]:
    data = json.loads((Path(folder) / GEOMETRY_FILE).read_text())
    lens = data["lens"]
    if lens.get("image_size"):
        lens["image_size"] = tuple(lens["image_size"])
    return CropGeometry(**data["geometry"]), LensModel(**lens)
