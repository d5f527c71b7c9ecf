"""Augment: seeded photometric and geometric augmentation of the training crops only
(validation and test are never touched), built on OpenCV.

Offline mode writes ``copies`` augmented copies of every training crop; online mode
writes only the configuration, and the training loader applies the same
:func:`augment_image` to every batch (a fresh draw each epoch). Both are
deterministic given the seed. CLAHE and gray-world white balance are random
augmentations here, never a normalisation applied to every image.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

from triview import manifest as mf
from triview.crop import decode_png, encode_png, read_crop, write_png
from triview.params import config_class
from triview.shards import ShardReader, ShardWriter, write_index

AUG_DIR = "augmented"
BORDER_MODES = {
    "constant": cv2.BORDER_CONSTANT,
    "reflect": cv2.BORDER_REFLECT_101,
    "replicate": cv2.BORDER_REPLICATE,
}


CONFIG_FILE = "augment.json"
PREVIEW_FILE = "preview.png"


#: The augment stage's parameters (copies, mode, noise_std, max_rotation, border_mode,
#: flips, shift, zoom, brightness, contrast, clahe, gray_world, seed), from the spec.
AugmentConfig = config_class("AugmentConfig", "augment", module=__name__)


def _rng(seed: int, *key: object) -> np.random.Generator:
    """A generator that depends only on the seed and the sample's identity."""
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _gray_world(image: np.ndarray) -> np.ndarray:
    means = image.reshape(-1, 3).mean(0) + 1e-6
    return np.clip(image * (means.mean() / means), 0, 255).astype(np.uint8)


def _clahe(image: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def augment_image(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One random draw of every enabled augmentation; uint8 RGB (H, W, 3) in and out.

    A random resized crop comes first (with ``crop_scale`` < 1); rotation, zoom and shift
    are one affine warp; flips, colour operations and the Gaussian noise follow. The draw
    depends only on ``rng``.
    """
    h, w = image.shape[:2]
    if config.crop_scale < 1.0:
        image = random_resized_crop(image, config.crop_scale, rng)
    angle = rng.uniform(-config.max_rotation, config.max_rotation)
    scale = rng.uniform(1.0 - config.zoom, 1.0 + config.zoom)
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    matrix[:, 2] += rng.uniform(-config.shift, config.shift, 2) * (w, h)
    out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=BORDER_MODES[config.border_mode])
    if rng.random() < config.hflip:
        out = cv2.flip(out, 1)
    if rng.random() < config.vflip:
        out = cv2.flip(out, 0)
    if rng.random() < config.clahe:
        out = _clahe(out)
    if rng.random() < config.gray_world:
        out = _gray_world(out)
    gain = rng.uniform(1.0 - config.contrast, 1.0 + config.contrast)
    bias = rng.uniform(-config.brightness, config.brightness) * 255.0
    noise = rng.normal(0.0, config.noise_std * 255.0, size=out.shape)
    mean = out.mean()
    return np.clip((out.astype(np.float32) - mean) * gain + mean + bias + noise, 0, 255).astype(np.uint8)


def random_resized_crop(image: np.ndarray, min_area: float, rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A crop of ``min_area``..1 of the image's area with an aspect ratio in ``ratio``
    (log-uniform) at a random place, resized back to the image's size (torchvision's
    RandomResizedCrop, inside the view: nothing outside the crop is ever shown)."""
    h, w = image.shape[:2]
    area = rng.uniform(min_area, 1.0) * h * w
    aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
    cw = int(round(min(w, np.sqrt(area * aspect))))
    ch = int(round(min(h, np.sqrt(area / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return cv2.resize(image[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def augment_batch(images: np.ndarray, image_ids: list[str], config: AugmentConfig,
                  epoch: int) -> np.ndarray:
    """Online augmentation of a uint8 (N, H, W, 3) batch: a fresh draw per epoch,
    reproducible from (seed, image id, epoch)."""
    return np.stack([augment_image(img, config, _rng(config.seed, i, "online", epoch))
                     for img, i in zip(images, image_ids)])


def save_config(config: AugmentConfig, folder: Path) -> None:
    from dataclasses import asdict

    from triview.storage import atomic_write_text

    atomic_write_text(folder / CONFIG_FILE, json.dumps(asdict(config), indent=2))


def load_config(folder: str | Path) -> AugmentConfig | None:
    path = Path(folder) / CONFIG_FILE
    return AugmentConfig(**json.loads(path.read_text())) if path.is_file() else None


def preview_grid(samples: list[np.ndarray], config: AugmentConfig, path: Path, per_row: int = 4) -> None:
    """Each sample next to ``per_row`` augmented draws of it, one sample per row."""
    rows = []
    for k, img in enumerate(samples):
        draws = [augment_image(img, config, _rng(config.seed, "preview", k, j)) for j in range(per_row)]
        rows.append(np.concatenate([img] + draws, axis=1))
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 96 // samples[0].shape[0])
    grid = cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    write_png(path, grid)


def augment(views_dir: str | Path, out_dir: str | Path, config: AugmentConfig) -> int:
    """Write ``config.copies`` augmented copies of every training crop to ``out_dir``;
    returns the number of copies written.

    ``out_dir/views.csv`` lists only the new crops (``augmented`` = copy number; none in
    online mode); the real crops stay in ``views_dir``. Also writes ``augment.json`` (the
    configuration, which online training reads) and ``preview.png``. The views table is
    read a row at a time and the new one written as the copies are: neither is held.
    """
    src, out = Path(views_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = src / mf.VIEWS_FILE

    def train():  # the real training crops, read as they are used
        return (row for row in mf.iter_table(table, mf.VIEW_COLUMNS)
                if row["split"] == "train" and int(row["augmented"]) == 0)

    save_config(config, out)
    sample, views = [], set()
    for row in train():
        if row["view"] not in views:
            views.add(row["view"])
            sample.append(row["path"])
            if len(sample) == 3:
                break
    if sample:
        preview_grid([read_crop(src, p) for p in sample], config, out / PREVIEW_FILE)
    copies = config.copies if config.mode == "offline" else 0
    writers = {}
    with contextlib.ExitStack() as stack:
        written = stack.enter_context(mf.views_writer(out))
        reader = stack.enter_context(ShardReader(src))
        for rec in train() if copies else ():
            image = decode_png(reader.read(rec["path"]), f"crop {rec['path']} in {src}")
            if rec["view"] not in writers:
                writers[rec["view"]] = stack.enter_context(
                    ShardWriter(out, f"{AUG_DIR}/{rec['view']}/train"))
            for k in range(1, copies + 1):
                aug = augment_image(image, config, _rng(config.seed, rec["image_id"], rec["view"], k))
                ref = writers[rec["view"]].add(f"{rec['image_id']}_{k}.png", encode_png(aug))
                written.row([ref if name == "path" else k if name == "augmented" else rec[name]
                             for name in mf.VIEW_COLUMNS])
    write_index(out, {name: entry for w in writers.values() for name, entry in w.entries.items()})
    mf.write_classes(mf.read_classes(src), out)
    return written.rows
