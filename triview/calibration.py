"""Camera calibration from chessboard photos, and intrinsics files in and out.

The recipe is OpenCV's own: ``findChessboardCorners`` → ``cornerSubPix`` →
``calibrateCamera``. The result (K, distortion, RMS reprojection error,
per-view error, image size) is written as JSON and read back as the
:class:`~triview.crop.LensModel` that calibrate-and-crop applies.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from triview.storage import atomic_write_text

SUBPIX_CRITERIA = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_COUNT, 30, 0.1)


class CalibrationError(ValueError):
    """Calibration could not be computed from the given input; ``rejected`` maps
    each photo that was not used to why."""

    def __init__(self, message: str, rejected: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.rejected = dict(rejected or {})


@dataclass
class Calibration:
    K: list[list[float]]
    dist: list[float]
    rms: float
    image_size: tuple[int, int]                     # (width, height)
    per_view_error: dict[str, float] = field(default_factory=dict)
    pattern: tuple[int, int] | None = None
    square: float | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # photo -> why it was not used

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())


def parse_pattern(text: str) -> tuple[int, int]:
    """``"9x6"`` → (9, 6) inner corners per row and column."""
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CalibrationError(f"pattern must look like 9x6, got {text!r}") from None
    if cols < 2 or rows < 2:
        raise CalibrationError(f"pattern needs at least 2x2 inner corners, got {text!r}")
    return cols, rows


def board_points(pattern: tuple[int, int], square: float) -> np.ndarray:
    """3-D corner coordinates of a flat board (z = 0), in the order OpenCV finds them."""
    points = np.zeros((pattern[0] * pattern[1], 3), np.float32)
    points[:, :2] = np.indices(pattern).T.reshape(-1, 2) * square
    return points


def find_corners(gray: np.ndarray, pattern: tuple[int, int],
                 subpix_window: tuple[int, int] = (5, 5)) -> np.ndarray | None:
    """Sub-pixel inner corners of the board, or None when the board is not found."""
    found, corners = cv2.findChessboardCorners(gray, pattern)
    if not found:
        return None
    cv2.cornerSubPix(gray, corners, subpix_window, (-1, -1), SUBPIX_CRITERIA)
    return corners.reshape(-1, 2)


def calibrate_chessboard(paths: list[str | Path], pattern: tuple[int, int] = (9, 6),
                         square: float = 1.0, flags: int = 0,
                         subpix_window: tuple[int, int] = (5, 5)) -> Calibration:
    """Calibrate one camera from chessboard photos.

    The image size is the one shared by the largest group of photos in which the
    board is found (ties: the size of the first such photo in sorted order), so a
    stray photo of another size, wherever it sorts, cannot veto the rest. Every
    photo not used is listed in ``rejected`` with why; with fewer than three boards
    the :class:`CalibrationError` lists them too.
    """
    if not paths:
        raise CalibrationError("no calibration images given")
    ordered = sorted(str(p) for p in paths)
    names = display_names(ordered)
    objp = board_points(pattern, square)
    found: list[tuple[str, tuple[int, int], np.ndarray]] = []   # (path, size, corners)
    rejected: dict[str, str] = {}
    for path in ordered:
        gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if gray is None:
            rejected[path] = "undecodable"
            continue
        this_size = (gray.shape[1], gray.shape[0])
        corners = find_corners(gray, pattern, subpix_window)
        if corners is None:
            rejected[path] = f"board not found ({this_size[0]}x{this_size[1]})"
            continue
        found.append((path, this_size, corners))
    size = _majority_size([s for _, s, _ in found])
    used = []
    for path, this_size, corners in found:
        if this_size != size:
            rejected[path] = (f"size {this_size[0]}x{this_size[1]} differs from "
                              f"{size[0]}x{size[1]} (the size most boards were found in)")
        else:
            used.append((path, corners))
    rejected = {names[p]: rejected[p] for p in ordered if p in rejected}
    if len(used) < 3:
        listing = "".join(f"\n  {name}: {why}" for name, why in rejected.items())
        raise CalibrationError(
            f"the {pattern[0]}x{pattern[1]} board was found in only {len(used)} of "
            f"{len(ordered)} images of one size; need at least 3. Not used:{listing}",
            rejected=rejected)
    obj_points = [objp] * len(used)
    img_points = [corners for _, corners in used]
    rms, K, dist, rvecs, tvecs = cv2.calibrateCamera(obj_points, img_points, size, None, None,
                                                     flags=flags)
    per_view = {}
    for (path, imgp), rvec, tvec in zip(used, rvecs, tvecs):
        projected, _ = cv2.projectPoints(objp, rvec, tvec, K, dist)
        per_view[names[path]] = float(np.sqrt(np.mean(np.sum(
            (projected.reshape(-1, 2) - imgp) ** 2, axis=1))))
    return Calibration(K=K.tolist(), dist=dist.ravel().tolist(), rms=float(rms), image_size=size,
                       per_view_error=per_view, pattern=pattern, square=square,
                       rejected=rejected)


def _majority_size(sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The most common size; a tie goes to the size that occurs first."""
    if not sizes:
        return None
    counts = Counter(sizes)
    return max(counts, key=lambda s: (counts[s], -sizes.index(s)))


def display_names(paths: list[str]) -> dict[str, str]:
    """How a photo is named in reports: its file name, or its path below the
    photos' common folder when two photos share a file name."""
    base = [Path(p).name for p in paths]
    if len(set(base)) == len(base):
        return dict(zip(paths, base))
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return {p: os.path.relpath(os.path.abspath(p), common) for p in paths}


def calibrate_glob(pattern_glob: str, **kwargs) -> Calibration:
    paths = sorted(glob.glob(pattern_glob))
    if not paths:
        raise CalibrationError(f"no files match {pattern_glob!r}")
    return calibrate_chessboard(paths, **kwargs)


def load_intrinsics(path: str | Path) -> Calibration:
    """Read intrinsics from our JSON or an OpenCV YAML/XML file (``cv2.FileStorage``).

    OpenCV files may name the matrix ``camera_matrix``/``K`` and the coefficients
    ``distortion_coefficients``/``dist_coeffs``/``dist``.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"intrinsics file {str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if "K" not in data:
            raise CalibrationError(f"{path} has no 'K'")
        size = data.get("image_size")
        return Calibration(K=data["K"], dist=list(np.ravel(data.get("dist", []))),
                           rms=float(data.get("rms", float("nan"))),
                           image_size=tuple(size) if size else None,
                           per_view_error=data.get("per_view_error", {}))
    fs = cv2.FileStorage(str(path), cv2.FILE_STORAGE_READ)
    try:
        if not fs.isOpened():
            raise CalibrationError(f"cannot read {path} as an OpenCV YAML/XML file")

        def first(*names):
            for n in names:
                node = fs.getNode(n)
                if not node.empty():
                    return node
            return None

        k_node = first("camera_matrix", "K", "cameraMatrix")
        if k_node is None:
            raise CalibrationError(f"{path} has no camera_matrix")
        d_node = first("distortion_coefficients", "dist_coeffs", "dist", "distCoeffs")
        w, h = first("image_width"), first("image_height")
        size = (int(w.real()), int(h.real())) if w is not None and h is not None else None
        dist = d_node.mat().ravel().tolist() if d_node is not None else []
        rms_node = first("avg_reprojection_error", "rms")
        return Calibration(K=k_node.mat().tolist(), dist=dist,
                           rms=float(rms_node.real()) if rms_node is not None else float("nan"),
                           image_size=size)
    finally:
        fs.release()
