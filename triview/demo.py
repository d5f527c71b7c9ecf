"""Demo data from a real data set: scikit-learn's bundled handwritten digits.

The 8x8 scans are upscaled so that each of the left/centre/right crops sees only
part of a digit, and written as JPEG files in class folders, an ordinary
image-folder data set. Nothing is downloaded: the digits ship with scikit-learn.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits


def write_digits(out_dir: str | Path, size: int = 64, per_class: int | None = None,
                 quality: int = 95) -> dict[str, int]:
    """Write the digits as ``out_dir/<digit>/digit_<index>.jpg``; return images per class.

    ``per_class`` keeps only the first N images of each class (for small test runs).
    """
    digits = load_digits()
    out = Path(out_dir)
    counts: dict[str, int] = {}
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        label = str(int(target))
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        # 0..16 ink levels -> 8-bit, then a smooth upscale (the scans are 8x8).
        gray = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
        big = cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC)
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"could not encode digit {index}")
        (folder / f"digit_{index:04d}.jpg").write_bytes(buf.tobytes())
        counts[label] = counts.get(label, 0) + 1
    return counts
