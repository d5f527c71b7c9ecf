"""Augment: seeded Gaussian noise and random rotation, written as extra copies of
the training crops only (validation and test are never touched)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from triview import manifest as mf
from triview.crop import read_rgb, write_png

AUG_DIR = "augmented"
BORDER_MODES = {
    "constant": cv2.BORDER_CONSTANT,
    "reflect": cv2.BORDER_REFLECT_101,
    "replicate": cv2.BORDER_REPLICATE,
}


@dataclass
class AugmentConfig:
    copies: int = 1
    noise_std: float = 0.05      # Gaussian sigma as a fraction of the 0..255 range
    max_rotation: float = 50.0   # degrees; the angle is uniform in [-max, +max]
    border_mode: str = "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.border_mode not in BORDER_MODES:
            raise ValueError(f"border_mode must be one of {sorted(BORDER_MODES)}")
        if self.copies < 0 or self.noise_std < 0 or self.max_rotation < 0:
            raise ValueError("copies, noise_std and max_rotation must be >= 0")


def _rng(seed: int, *key: object) -> np.random.Generator:
    """A generator that depends only on the seed and the sample's identity."""
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def augment_image(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Rotate by a uniform angle in ±max_rotation, then add Gaussian noise; uint8 in/out."""
    h, w = image.shape[:2]
    angle = rng.uniform(-config.max_rotation, config.max_rotation)
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    rotated = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=BORDER_MODES[config.border_mode])
    noise = rng.normal(0.0, config.noise_std * 255.0, size=rotated.shape)
    return np.clip(rotated.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def augment(views_dir: str | Path, out_dir: str | Path, config: AugmentConfig) -> pd.DataFrame:
    """Write ``config.copies`` augmented copies of every training crop to ``out_dir``.

    ``out_dir/views.csv`` lists only the new crops (``augmented`` = copy number);
    the real crops stay in ``views_dir``.
    """
    src, out = Path(views_dir), Path(out_dir)
    views = mf.read_views(src)
    train = views[(views["split"] == "train") & (views["augmented"] == 0)]
    rows = []
    for rec in train.itertuples(index=False):
        image = read_rgb(src / rec.path)
        for k in range(1, config.copies + 1):
            aug = augment_image(image, config, _rng(config.seed, rec.image_id, rec.view, k))
            rel = f"{AUG_DIR}/{rec.view}/{rec.image_id}_{k}.png"
            write_png(out / rel, aug)
            rows.append({**rec._asdict(), "path": rel, "augmented": k})
    table = pd.DataFrame(rows, columns=list(mf.VIEW_COLUMNS))
    mf.write_views(table, out)
    mf.write_classes(mf.read_classes(src), out)
    return table
