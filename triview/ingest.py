"""Ingest: walk a folder or ZIP of class folders, decode every file, quarantine the
bad ones with a reason, drop exact duplicates, and split train/val/test stratified
by label and grouped by source image.

Every input file ends up either in the manifest or in the quarantine table:
``#input files == #used + #quarantined``.
"""
from __future__ import annotations

import hashlib
import io
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from triview import manifest as mf
from triview.storage import atomic_path, atomic_write_bytes

IMAGES_DIR = "images"
# Never decode more than this many pixels (decompression-bomb guard).
MAX_PIXELS = 100_000_000


class IngestError(ValueError):
    """The input as a whole cannot be ingested (not a per-file problem)."""


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    classes: list[str]
    n_input: int
    counts: dict[str, int] = field(default_factory=dict)


# Formats and modes OpenCV decodes to the same pixels as PIL: such files are kept
# byte for byte (JPEGs can then be decoded at 1/2..1/8 scale downstream).
_KEEP_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
_KEEP_MODES = {"RGB", "L"}
_EXIF_ORIENTATION = 0x0112


@dataclass
class _Decoded:
    rel: str
    label: str | None
    sha256: str
    image: Image.Image | None
    reason: str | None = None
    detail: str = ""
    keep_suffix: str | None = None   # store the original bytes under this suffix


def _decode(rel: str, label: str | None, data: bytes, min_size: int) -> _Decoded:
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return _Decoded(rel, label, sha, None, "empty_file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return _Decoded(rel, label, sha, None, "decompression_bomb",
                                f"{img.width}x{img.height}")
            img.load()  # forces a full decode: truncated files fail here
            rotated = img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
            keep = (_KEEP_FORMATS.get(img.format) if img.mode in _KEEP_MODES and not rotated
                    else None)
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except UnidentifiedImageError:
        return _Decoded(rel, label, sha, None, "not_an_image")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return _Decoded(rel, label, sha, None, "undecodable", str(exc)[:200])
    if min(rgb.size) < min_size:
        return _Decoded(rel, label, sha, None, "too_small", f"{rgb.width}x{rgb.height}")
    if label is None:
        return _Decoded(rel, label, sha, None, "no_label", "file is not inside a class folder")
    return _Decoded(rel, label, sha, rgb, keep_suffix=keep)


def _class_root(root: Path) -> Path:
    """Descend through a single wrapping folder (e.g. a ZIP of ``dataset/<class>/...``)."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and len(entries) == 1:
            root = dirs[0]
        else:
            return root


def _iter_folder(root: Path):
    """Yield ``(relative path, label or None, bytes)`` for every file below root."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        label = rel.parts[0] if len(rel.parts) > 1 else None
        yield rel.as_posix(), label, path.read_bytes()


def _extract_zip(zip_path: Path, dest: Path) -> None:
    """Extract a ZIP, refusing entries that would land outside ``dest``."""
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise IngestError(f"unsafe path in ZIP: {info.filename!r}")
        zf.extractall(dest)


def _split(groups: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Assign each source group to a split, stratified by the group's label."""
    train_frac, val_frac, test_frac = fractions
    if abs(train_frac + val_frac + test_frac - 1.0) > 1e-6:
        raise IngestError(f"split fractions {fractions} do not sum to 1")
    counts = groups["label"].value_counts()
    too_few = counts[counts < 3]
    if len(too_few):
        names = ", ".join(f"{k!r} ({v})" for k, v in too_few.items())
        raise IngestError(f"classes with fewer than 3 source images cannot be split into "
                          f"train/val/test: {names}")
    ids, labels = groups["source_id"].to_numpy(), groups["label"].to_numpy()
    n_classes = len(counts)
    # Whole-image counts, at least one image of every class in val and test.
    n_test = max(n_classes, round(test_frac * len(ids)))
    n_val = max(n_classes, round(val_frac * len(ids)))
    if len(ids) - n_test - n_val < n_classes:
        raise IngestError(f"{len(ids)} source images are too few to give each of the "
                          f"{n_classes} classes a train, val and test image")
    rest_ids, test_ids, rest_labels, _ = train_test_split(
        ids, labels, test_size=n_test, stratify=labels, random_state=seed)
    train_ids, val_ids = train_test_split(
        rest_ids, test_size=n_val, stratify=rest_labels, random_state=seed)
    assignment = {i: "train" for i in train_ids}
    assignment.update({i: "val" for i in val_ids})
    assignment.update({i: "test" for i in test_ids})
    return assignment


def ingest(data: str | Path, out_dir: str | Path, *, seed: int = 0,
           split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
           min_size: int = 8) -> IngestResult:
    """Ingest a folder or ZIP of class folders into ``out_dir``.

    Writes ``manifest.csv`` (one row per used image), ``quarantine.csv`` (one row
    per rejected file), ``classes.json`` and the images under ``images/``: the original
    bytes when OpenCV decodes them to the same RGB pixels (JPEG/PNG/WebP/BMP, RGB or
    gray, no EXIF rotation), otherwise a normalised 8-bit RGB PNG.
    """
    src = Path(data)
    if not src.exists():
        raise IngestError(f"input {str(src)!r} does not exist")
    out = Path(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="triview-ingest-") as tmp:
        if src.is_file() and zipfile.is_zipfile(src):
            _extract_zip(src, Path(tmp))
            root = _class_root(Path(tmp))
        elif src.is_dir():
            root = _class_root(src)
        else:
            raise IngestError(f"input {str(src)!r} is neither a folder nor a ZIP archive")

        rows, quarantined, seen = [], [], {}
        n_input = 0
        for rel, label, data_bytes in _iter_folder(root):
            n_input += 1
            d = _decode(rel, label, data_bytes, min_size)
            if d.reason is None and d.sha256 in seen:
                d.reason, d.detail = "exact_duplicate", f"same bytes as {seen[d.sha256]}"
            if d.reason is not None:
                quarantined.append({"path": rel, "reason": d.reason, "detail": d.detail})
                continue
            seen[d.sha256] = rel
            image_id = d.sha256[:16]
            stored = f"{IMAGES_DIR}/{image_id}{d.keep_suffix or '.png'}"
            if d.keep_suffix:
                atomic_write_bytes(out / stored, data_bytes)
            else:  # normalised: EXIF rotation applied, 8-bit RGB
                with atomic_path(out / stored) as tmp_png:
                    d.image.save(tmp_png, format="PNG")
            rows.append({
                "image_id": image_id, "path": stored,
                "label": d.label, "labels": d.label,
                "source_id": str(PurePosixPath(rel).with_suffix("")),
                "sha256": d.sha256, "width": d.image.width, "height": d.image.height,
                "original_path": rel,
            })

    if not rows:
        raise IngestError(f"no usable images in {str(src)!r} "
                          f"({n_input} files, all quarantined)")
    table = pd.DataFrame(rows)
    groups = table.groupby("source_id")["label"].agg(lambda s: s.mode().iloc[0]).reset_index()
    assignment = _split(groups, split_fractions, seed)
    table["split"] = table["source_id"].map(assignment)
    classes = sorted(table["label"].unique())
    quarantine = pd.DataFrame(quarantined, columns=list(mf.QUARANTINE_COLUMNS))

    mf.write_manifest(table, out)
    mf.write_table(quarantine, out / mf.QUARANTINE_FILE, mf.QUARANTINE_COLUMNS)
    mf.write_classes(classes, out)
    counts = {s: int((table["split"] == s).sum()) for s in mf.SPLITS}
    counts["quarantined"] = len(quarantine)
    counts["input"] = n_input
    assert n_input == len(table) + len(quarantine), "every input file must be accounted for"
    return IngestResult(table, quarantine, classes, n_input, counts)


def class_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per class and split (rows: classes, columns: splits)."""
    return (table.groupby(["label", "split"]).size().unstack(fill_value=0)
            .reindex(columns=list(mf.SPLITS), fill_value=0))
