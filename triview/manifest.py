"""The dataset manifest: the one data contract every stage reads and writes.

A manifest is a table with one row per *used* image (ingest) or per stored view
crop (calibrate-and-crop, augment). Columns, split names and the label
encoding are defined here and nowhere else.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from triview.storage import atomic_write_text

SPLITS = ("train", "val", "test")

#: Columns of the image manifest written by ingest.
IMAGE_COLUMNS = (
    "image_id",   # stable id of the used image (content hash prefix)
    "path",       # path of the normalised image, relative to the manifest's folder
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
    "path",       # path of the crop, relative to the manifest's folder
    "label",
    "labels",
    "source_id",
    "split",
    "augmented",  # 0 for a real crop, k>=1 for the k-th augmented copy
)

QUARANTINE_COLUMNS = ("path", "reason", "detail")

MANIFEST_FILE = "manifest.csv"
VIEWS_FILE = "views.csv"
QUARANTINE_FILE = "quarantine.csv"
CLASSES_FILE = "classes.json"


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


def read_table(path: str | os.PathLike, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a manifest table and check it against the contract."""
    df = pd.read_csv(path, dtype={"image_id": str, "source_id": str, "label": str, "labels": str,
                                  "sha256": str})
    return _check(df, columns, str(path))


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


def read_views(folder: str | os.PathLike) -> pd.DataFrame:
    return read_table(Path(folder) / VIEWS_FILE, VIEW_COLUMNS)


def write_classes(classes: list[str], folder: str | os.PathLike) -> Path:
    """Label encoding: class index i is ``classes[i]`` (sorted class names)."""
    path = Path(folder) / CLASSES_FILE
    atomic_write_text(path, json.dumps({"classes": list(classes)}, indent=2))
    return path


def read_classes(folder: str | os.PathLike) -> list[str]:
    return list(json.loads((Path(folder) / CLASSES_FILE).read_text())["classes"])


def encode_labels(labels: pd.Series, classes: list[str]) -> "pd.Series":
    """Map class names to integer indices of ``classes``; unknown names are an error."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ManifestError(f"labels {unknown} are not in the class list {classes}")
    return labels.map(index).astype("int64")
