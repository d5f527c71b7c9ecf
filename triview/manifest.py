"""The dataset manifest: the one data contract every stage reads and writes.

A manifest is a table with one row per *used* image (ingest) or per stored view
crop (calibrate-and-crop, augment). Columns, split names and the label
encoding are defined here and nowhere else.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from typing import TYPE_CHECKING

from triview.storage import atomic_path, atomic_write_text

if TYPE_CHECKING:  # pandas where a table is read whole: a stage that streams rows never loads it
    import pandas as pd

SPLITS = ("train", "val", "test")

#: Columns of the image manifest written by ingest.
IMAGE_COLUMNS = (
    "image_id",   # stable id of the used image (content hash prefix)
    "path",       # the stored image, relative to the manifest's folder: "images/NNNNNN.tar#<member>"
                  # for a member of ingest's shards (triview.shards), or a plain file's path
    "label",      # class name (multi-class); for multi-label the first label
    "labels",     # ';'-joined label names (multi-class: same as label)
    "source_id",  # id of the source photo; every crop of it shares it and its split
    "sha256",     # content hash of the original file bytes
    "width",
    "height",
    "split",      # one of SPLITS
)

#: Columns of the view manifest written by calibrate-and-crop and augment.
VIEW_COLUMNS = (
    "image_id",
    "view",       # view name, e.g. left / center / right
    "path",       # the crop, relative to the manifest's folder: "<shard>.tar#<member>" for a
                  # crop in a WebDataset shard (triview.shards: how they are written and
                  # read), or a plain file's path
    "label",
    "labels",
    "source_id",
    "split",
    "augmented",  # 0 for a real crop, k>=1 for the k-th augmented copy
)

QUARANTINE_COLUMNS = ("path", "reason", "detail")

#: Machine-readable quarantine reasons (the ``reason`` column) and what each means.
QUARANTINE_REASONS = {
    "empty_file": "zero bytes",
    "truncated": "the image data ends early",
    "undecodable": "recognised as an image but the decoder failed",
    "not_an_image": "content is not an image (e.g. text renamed .jpg)",
    "unsupported_format": "an image format triview does not decode (HEIC, SVG, PSD, ...)",
    "too_small": "shorter side below min_size",
    "too_large": "file larger than the byte cap",
    "decompression_bomb": "more pixels than max_pixels",
    "exact_duplicate": "same bytes as an image already used (content hash)",
    "no_label": "no class folder or label for the file",
    "unknown_label": "label not in the declared class map (data.yaml names)",
    "dropped_label": "every label removed by a drop operation",
    "class_below_minimum": "class has fewer images than min_per_class",
    "missing_file": "listed in a CSV/Parquet manifest but not found",
    "outside_root": "a table path that leads outside the data root (absolute, '..', '~', URL, "
                    "another bucket, a symlink out), or a Custom Vision image URI on a host or "
                    "scheme triview does not download from: never opened",
    "untagged": "a Custom Vision image without a tag",
    "download_failed": "the image could not be downloaded (HTTP error or network failure, "
                       "after retries)",
    "symlink_escape": "symbolic link pointing outside the input root",
    "broken_symlink": "symbolic link to nothing",
    "symlink_dir": "symbolic link to a folder (not followed)",
    "zip_unsafe_path": "ZIP entry with an absolute path or '..' (ZIP-slip)",
    "zip_symlink": "ZIP entry that is a symbolic link",
    "zip_bomb": "ZIP entry over the uncompressed-size or compression-ratio cap",
    "encrypted": "encrypted ZIP entry",
    "system_file": "hidden or OS metadata file (.DS_Store, Thumbs.db, __MACOSX/...)",
    "metadata": "consumed as metadata (data.yaml class map, the CSV manifest itself)",
    "read_error": "the file (or a whole folder) could not be read",
    "special_file": "FIFO, socket or device node (not read)",
}

#: Separator of the ``labels`` column (multi-label: ``"cat;dog"``).
LABEL_SEPARATOR = ";"

MANIFEST_FILE = "manifest.csv"
VIEWS_FILE = "views.csv"
QUARANTINE_FILE = "quarantine.csv"
CLASSES_FILE = "classes.json"
#: Written by ingest beside the manifest.
MAPPING_FILE = "mapping.txt"            # "index name" per line, the label encoding
MAPPING_JSON_FILE = "mapping.json"      # {"0": name, ...}, the same
DATASET_FILE = "dataset.json"           # dataset_version and counts
STATS_FILE = "stats.csv"                # per-class statistics table
STATS_JSON_FILE = "stats.json"          # summary statistics (formats, sizes, duplicates, ...)
STATS_PLOT_FILE = "stats.png"
NEAR_DUPLICATES_FILE = "near_duplicates.csv"


class ManifestError(ValueError):
    """A manifest does not satisfy the contract."""


def _check(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ManifestError(f"{what} is missing columns {missing}")
    if "split" in df.columns and len(df):
        bad = sorted(set(df["split"]) - set(SPLITS))
        if bad:
            raise ManifestError(f"{what} has unknown split names {bad}; expected {SPLITS}")
    return df


def write_table(df: pd.DataFrame, path: str | os.PathLike, columns: tuple[str, ...]) -> None:
    """Write a manifest table atomically, columns in contract order first."""
    df = _check(df, columns, str(path))
    extra = [c for c in df.columns if c not in columns]
    atomic_write_text(path, df[list(columns) + extra].to_csv(index=False))


_PLAIN = {str, int}  # values written as they are


class TableWriter:
    """Write a manifest table row by row, atomically (the file appears when the block ends
    without an error): the bytes :func:`write_table` writes for the same rows, without
    holding the table. Rows are checked as :func:`read_table` checks them (the split)."""

    def __init__(self, path: str | os.PathLike, columns: tuple[str, ...]) -> None:
        self.path, self.columns, self.rows = Path(path), columns, 0
        self._split = columns.index("split") if "split" in columns else None

    def __enter__(self) -> "TableWriter":
        self._ctx = atomic_path(self.path)
        self._file = open(self._ctx.__enter__(), "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file, lineterminator="\n")
        self._csv.writerow(self.columns)
        return self

    def row(self, values) -> None:
        if not _PLAIN.issuperset(map(type, values)):  # a value from pandas: None/NaN is ""
            values = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]
        if len(values) != len(self.columns):
            raise ManifestError(f"{self.path}: a row of {len(values)} values for {len(self.columns)} columns")
        if self._split is not None and values[self._split] not in SPLITS:
            raise ManifestError(f"{self.path} has unknown split names {[values[self._split]]}; "
                                f"expected {SPLITS}")
        self._csv.writerow(values)
        self.rows += 1

    def __exit__(self, kind, error, tb) -> None:
        self._file.close()
        self._ctx.__exit__(kind, error, tb)


def read_table(path: str | os.PathLike, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a manifest table and check it against the contract."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"image_id": str, "source_id": str, "label": str, "labels": str,
                                  "sha256": str})
    return _check(df, columns, str(path))


def iter_table(path: str | os.PathLike, columns: tuple[str, ...]):
    """The rows of a manifest table one at a time (dicts of strings; an empty field is ""),
    checked as :func:`read_table` checks them: for a caller that must not hold the table."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in columns if c not in header]
        if missing:
            raise ManifestError(f"{path} is missing columns {missing}")
        split = header.index("split") if "split" in header else None
        for values in reader:
            if not values:  # a blank line
                continue
            if len(values) < len(header):
                values += [""] * (len(header) - len(values))
            if split is not None and values[split] not in SPLITS:
                raise ManifestError(f"{path} has unknown split names {[values[split]]}; expected {SPLITS}")
            yield dict(zip(header, values))


def write_manifest(df: pd.DataFrame, folder: str | os.PathLike) -> Path:
    path = Path(folder) / MANIFEST_FILE
    write_table(df, path, IMAGE_COLUMNS)
    return path


def read_manifest(folder: str | os.PathLike) -> pd.DataFrame:
    return read_table(Path(folder) / MANIFEST_FILE, IMAGE_COLUMNS)


def write_views(df: pd.DataFrame, folder: str | os.PathLike) -> Path:
    path = Path(folder) / VIEWS_FILE
    write_table(df, path, VIEW_COLUMNS)
    return path


def views_writer(folder: str | os.PathLike) -> TableWriter:
    """A :class:`TableWriter` of the view manifest in ``folder``."""
    return TableWriter(Path(folder) / VIEWS_FILE, VIEW_COLUMNS)


def read_views(folder: str | os.PathLike) -> pd.DataFrame:
    return read_table(Path(folder) / VIEWS_FILE, VIEW_COLUMNS)


#: The splits a model learns from: its training images, and the validation images that
#: chose its epoch, voter and thresholds. A model has "seen" an image in either.
SEEN_SPLITS = ("train", "val")


def seen_image_ids(views: pd.DataFrame) -> list[str]:
    """The ids (content-hash prefixes) of the real images a model trained on views
    ``views`` has seen (train and val), sorted: what its model card records."""
    real = views[(views["augmented"] == 0) & views["split"].isin(SEEN_SPLITS)]
    return sorted(set(real["image_id"].astype(str)))


def seen_source_ids(views: pd.DataFrame) -> list[str]:
    """The source groups (``source_id``) of those images, sorted."""
    real = views[(views["augmented"] == 0) & views["split"].isin(SEEN_SPLITS)]
    return sorted(set(real["source_id"].astype(str)))


def write_classes(classes: list[str], folder: str | os.PathLike) -> Path:
    """Label encoding: class index i is ``classes[i]`` (sorted class names)."""
    path = Path(folder) / CLASSES_FILE
    atomic_write_text(path, json.dumps({"classes": list(classes)}, indent=2))
    return path


def read_classes(folder: str | os.PathLike) -> list[str]:
    return list(json.loads((Path(folder) / CLASSES_FILE).read_text())["classes"])


def split_labels(text: str | float | None) -> list[str]:
    """``"a;b"`` -> ``["a", "b"]`` (empty or missing -> ``[]``)."""
    if not isinstance(text, str):
        return []
    return [t.strip() for t in text.split(LABEL_SEPARATOR) if t.strip()]


def join_labels(labels: list[str]) -> str:
    return LABEL_SEPARATOR.join(labels)


def write_mapping(classes: list[str], folder: str | os.PathLike) -> None:
    """The class map as ``mapping.txt`` ("index name" lines) and ``mapping.json``."""
    folder = Path(folder)
    atomic_write_text(folder / MAPPING_FILE, "".join(f"{i} {c}\n" for i, c in enumerate(classes)))
    atomic_write_text(folder / MAPPING_JSON_FILE,
                      json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2))


def dataset_version(folder: str | os.PathLike) -> str:
    """The version of an ingested data set: the SHA-256 of its manifest file."""
    import hashlib

    return hashlib.sha256((Path(folder) / MANIFEST_FILE).read_bytes()).hexdigest()


def encode_labels(labels: pd.Series, classes: list[str]) -> "pd.Series":
    """Map class names to integer indices of ``classes``; unknown names are an error."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ManifestError(f"labels {unknown} are not in the class list {classes}")
    return labels.map(index).astype("int64")


def encode_multilabel(labels: pd.Series, classes: list[str]):
    """``"a;b"`` label strings to 0/1 indicators (N, C) over ``classes``; unknown names
    are an error."""
    import numpy as np

    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(labels), len(classes)), dtype=np.int64)
    for row, text in enumerate(labels):
        for name in split_labels(text):
            if name not in index:
                raise ManifestError(f"label {name!r} is not in the class list {classes}")
            out[row, index[name]] = 1
    return out


TASKS = ("multiclass", "multilabel")


def task_of_table(table: pd.DataFrame) -> str:
    """``multilabel`` when some row carries more than one label, else ``multiclass``."""
    many = table["labels"].map(lambda text: len(split_labels(text)) > 1)
    return "multilabel" if bool(many.any()) else "multiclass"
