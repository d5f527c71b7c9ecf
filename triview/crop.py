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
    """Pinhole camera with OpenCV distortion coefficients; ``K=None`` means identity."""
    K: list[list[float]] | None = None
    dist: list[float] = field(default_factory=list)

    @property
    def is_identity(self) -> bool:
        return self.K is None

    @classmethod
    def from_json(cls, path: str | Path) -> "LensModel":
        data = json.loads(Path(path).read_text())
        return cls(K=data["K"], dist=list(np.ravel(data.get("dist", []))))


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


def undistort_maps(lens: LensModel, width: int, height: int):
    """Remap tables for one (camera, image size); ``None`` for the identity lens."""
    if lens.is_identity:
        return None
    K = np.asarray(lens.K, dtype=np.float64)
    dist = np.asarray(lens.dist, dtype=np.float64)
    return cv2.initUndistortRectifyMap(K, dist, None, K, (width, height), cv2.CV_16SC2)


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


def crop_views(image: np.ndarray, geometry: CropGeometry, maps=None) -> dict[str, np.ndarray]:
    """Undistort (when ``maps`` is given) and cut the views, each resized to image_size."""
    if maps is not None:
        image = cv2.remap(image, maps[0], maps[1], interpolation=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT)
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
    maps_cache: dict[tuple[int, int], object] = {}
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
    return CropGeometry(**data["geometry"]), LensModel(**data["lens"])
