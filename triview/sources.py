"""Ingest sources: turn what a user hands over into a list of :class:`Item` s.

One entry point, :func:`open_source`, picks the reader by what ``data`` is:

- a folder of class sub-folders (any depth below the class folder);
- a ZIP archive of the same, or a YOLO-classify / Roboflow export with ``train/``,
  ``valid/``, ``test/`` folders and a ``data.yaml`` whose ``names`` (list or map)
  become the class map;
- a CSV or Parquet table for multi-label data: ``path,labels`` (``;``-separated) or
  ``path`` plus one 0/1 column per label, an optional ``split`` column;
- an ``s3://bucket/prefix`` (a folder layout below it, or one ZIP/CSV/Parquet object);
- a ``customvision://HOST/PROJECT_ID`` Azure Custom Vision project
  (:mod:`triview.customvision`): one item per image, its tags as labels, downloaded by
  ingest's workers.

Every file of the input becomes exactly one item. Items that must never be read
(a symlink out of the root, an unsafe or oversized ZIP entry, OS litter) carry
their quarantine reason already; nothing is extracted from a ZIP, members are
read one by one with their declared size checked first.
"""
from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pandas as pd

from triview import customvision
from triview import manifest as mf
from triview import storage
from triview.dataroot import OUTSIDE_ROOT, DataRoots

#: Folder names that mean "this is a split, not a class" (Roboflow / YOLO-classify).
SPLIT_FOLDERS = {"train": "train", "valid": "val", "val": "val", "validation": "val",
                 "test": "test"}
CLASS_MAP_FILES = ("data.yaml", "data.yml")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
_SYSTEM_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "__macosx", "@eadir"}
_DOC_SUFFIXES = {".txt", ".md", ".yaml", ".yml", ".json", ".csv", ".xml", ".html"}


class SourceError(ValueError):
    """The input as a whole cannot be read (not a per-file problem)."""


class Item(NamedTuple):
    rel: str                       # the file as the user knows it (relative to the input)
    locator: tuple                 # ("file", path) | ("zip", archive, member) | ("s3", uri)
                                   # | ("url", uri) | ()
    labels: tuple[str, ...] = ()   # after class-map lookup; () when there is none
    split: str | None = None       # split given by the input layout or table
    reason: str | None = None      # quarantined without being read
    detail: str = ""
    label_reason: str | None = None  # quarantined after decoding (no_label, unknown_label)
    key: str = ""                  # rel without the wrapping folder ("" : rel itself)

    @property
    def data_path(self) -> str:
        """The file's path in the data root once a wrapping folder is taken off: the same
        for a folder, its ZIP and a ZIP of the folder (what the source id is made from)."""
        return self.key or self.rel


@dataclass(frozen=True)
class ZipLimits:
    """Caps checked on the ZIP directory before any member is read."""
    max_entry_bytes: int = 1 << 30        # one member, uncompressed
    max_total_bytes: int = 64 << 30       # all members, uncompressed
    max_ratio: float = 200.0              # uncompressed / compressed
    ratio_floor_bytes: int = 1 << 20      # members smaller than this are never ratio-checked


@dataclass
class Source:
    kind: str                              # folder | zip | table | s3 | customvision
    items: list[Item]
    classes: list[str] | None = None       # declared class order (data.yaml, one-hot columns)
    notes: list[str] = field(default_factory=list)
    tempdir: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self.tempdir is not None:
            self.tempdir.cleanup()


def open_source(data: str | os.PathLike, zip_limits: ZipLimits = ZipLimits(),
                allowed_roots: tuple[str, ...] = ()) -> Source:
    """Enumerate every file of ``data`` (folder, ZIP, CSV/Parquet table, s3:// URI or
    customvision:// project).

    Paths inside the input (table rows, symbolic links) lead only into the data root
    or into one of ``allowed_roots`` (folders or ``s3://bucket/prefix``): see
    :mod:`triview.dataroot`. A Custom Vision project's images are downloaded only from
    the service's hosts or an ``https://HOST`` of ``allowed_roots``: see
    :mod:`triview.customvision`.
    """
    text = str(data)
    if customvision.is_customvision(text):
        return _customvision_source(text, allowed_roots)
    if storage.is_s3(text):
        return _s3_source(text, zip_limits, allowed_roots)
    src = Path(data)
    if not src.exists():
        raise SourceError(f"input {text!r} does not exist")
    if src.is_dir():
        return _labelled(Source("folder", []),
                         _folder_entries(src, DataRoots.for_folder(src, allowed_roots)),
                         _read_local)
    if src.suffix.lower() in TABLE_SUFFIXES:
        return _table_source(src, DataRoots.for_folder(src.parent, allowed_roots))
    if zipfile.is_zipfile(src):
        return _zip_source(src, zip_limits)
    raise SourceError(f"input {text!r} is neither a folder, a ZIP archive, a CSV/Parquet "
                      f"table, an s3:// URI nor a customvision:// project")


# ----------------------------------------------------------------------------- layout


class _Entry(NamedTuple):
    rel: str
    locator: tuple
    reason: str | None = None
    detail: str = ""


def _is_system(rel: str) -> bool:
    return any(p.startswith(".") or p.lower() in _SYSTEM_NAMES for p in rel.split("/"))


def _strip_wrapper(rels: list[str]) -> int:
    """How many leading folders every path shares as a single wrapping folder
    (``dataset/<class>/x.jpg`` -> 1). A folder is a wrapper only while some path keeps a
    folder below it: ``cat/x.jpg`` alone is one class folder, not a wrapper of loose files."""
    depth = 0
    parts = [r.split("/") for r in rels]
    while parts and all(len(p) > depth + 1 for p in parts) and \
            any(len(p) > depth + 2 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    return depth


def _labelled(source: Source, entries: list[_Entry], read_meta) -> Source:
    """Give each entry its label and split from the folder layout (and data.yaml)."""
    candidates = [e.rel for e in entries if e.reason is None and not _is_system(e.rel)]
    depth = _strip_wrapper(candidates)
    stripped = [("/".join(e.rel.split("/")[depth:]), e) for e in entries]
    top_dirs = {r.split("/")[0] for r, e in stripped
                if e.reason is None and not _is_system(r) and "/" in r}
    split_layout = bool(top_dirs) and all(d.lower() in SPLIT_FOLDERS for d in top_dirs) and any(
        len(r.split("/")) > 2 for r, e in stripped if e.reason is None)

    names: list[str] | None = None
    map_problem = ""
    for r, e in stripped:
        if e.reason is None and r.lower() in CLASS_MAP_FILES:
            try:
                names = parse_class_map(read_meta(e.locator), e.rel)
                source.notes.append(f"class map from {e.rel}: {len(names)} names")
            except (SourceError, OSError) as exc:  # a broken class map must not sink the rest
                map_problem = f"ignored: {exc}"[:300]
                source.notes.append(f"class map {e.rel} {map_problem}; labels are folder names")
            break
    index = {str(i): n for i, n in enumerate(names)} if names else {}

    items = []
    for r, e in stripped:
        if e.reason is not None:
            items.append(Item(e.rel, (), reason=e.reason, detail=e.detail, key=r))
            continue
        if _is_system(r):
            items.append(Item(e.rel, (), reason="system_file", detail="hidden or OS metadata",
                              key=r))
            continue
        parts = r.split("/")
        if len(parts) == 1 and r.lower() in CLASS_MAP_FILES:
            items.append(Item(e.rel, (), reason="metadata",
                              detail=map_problem or "class map (data.yaml)", key=r))
            continue
        if len(parts) == 1 and PurePosixPath(r).suffix.lower() in _DOC_SUFFIXES:
            items.append(Item(e.rel, (), reason="metadata",
                              detail="document beside the classes, not read", key=r))
            continue
        split = None
        if split_layout and parts[0].lower() in SPLIT_FOLDERS:
            split, parts = SPLIT_FOLDERS[parts[0].lower()], parts[1:]
        if len(parts) < 2:
            items.append(Item(e.rel, e.locator, label_reason="no_label",
                              detail="file is not inside a class folder", key=r))
            continue
        folder = parts[0]
        if names is not None:
            label = folder if folder in names else index.get(folder)
            if label is None:
                items.append(Item(e.rel, e.locator, split=split, label_reason="unknown_label",
                                  detail=f"folder {folder!r} is not in the data.yaml names", key=r))
                continue
        else:
            label = folder
        items.append(Item(e.rel, e.locator, (label,), split, key=r))
    source.items = items
    source.classes = names
    if split_layout:
        source.notes.append("splits taken from the train/valid/test folders")
    return source


def parse_class_map(data: bytes, where: str) -> list[str]:
    """The ``names`` of a YOLO/Roboflow ``data.yaml``: a list, or a map index -> name."""
    import yaml

    try:
        doc = yaml.safe_load(data.decode("utf-8", errors="replace"))
    except yaml.YAMLError as exc:
        raise SourceError(f"{where}: not valid YAML: {exc}") from exc
    names = doc.get("names") if isinstance(doc, dict) else None
    if isinstance(names, dict):
        try:
            order = sorted(names, key=int)
        except (TypeError, ValueError) as exc:
            raise SourceError(f"{where}: names map keys must be integers") from exc
        names = [names[k] for k in order]
    if not isinstance(names, list) or not names:
        raise SourceError(f"{where}: expected a non-empty 'names' list or map")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise SourceError(f"{where}: duplicate class names in 'names'")
    return names


# ----------------------------------------------------------------------------- folder


def _folder_entries(root: Path, roots: DataRoots) -> list[_Entry]:
    """Every non-folder entry below ``root``, in a stable order; symlinks are resolved
    inside ``roots`` only, never followed (or looked at) out of them."""
    entries = []

    def unreadable(exc: OSError) -> None:  # os.walk would skip such a folder silently
        rel = Path(exc.filename).relative_to(root).as_posix() if exc.filename else "."
        entries.append(_Entry(rel + "/", (), "read_error", f"folder not readable: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable):
        dirnames.sort()
        here = Path(dirpath)
        names = sorted(filenames) + sorted(d for d in dirnames if (here / d).is_symlink())
        for name in sorted(names):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                placed = roots.place_link(str(root), rel)
                if placed.reason is not None:
                    reason = "symlink_escape" if placed.reason == OUTSIDE_ROOT else "broken_symlink"
                    entries.append(_Entry(rel, (), reason, f"-> {os.readlink(path)}"))
                    continue
                if os.path.isdir(placed.locator[1]):
                    entries.append(_Entry(rel, (), "symlink_dir", f"-> {os.readlink(path)}"))
                    continue
                path = Path(placed.locator[1])
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                entries.append(_Entry(rel, (), "read_error", str(exc)[:200]))
                continue
            if not stat.S_ISREG(mode):  # a FIFO would block the reader forever
                entries.append(_Entry(rel, (), "special_file", "FIFO, socket or device: not read"))
                continue
            entries.append(_Entry(rel, ("file", str(path))))
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
    return entries


def _read_local(locator: tuple) -> bytes:
    return Path(locator[1]).read_bytes()


# ----------------------------------------------------------------------------- ZIP


def zip_entries(archive: Path, limits: ZipLimits = ZipLimits()) -> list[_Entry]:
    """Check every member of the ZIP directory (nothing is read or extracted)."""
    entries, total = [], 0
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{archive}: not a readable ZIP archive: {exc}") from exc
    for info in infos:
        if info.is_dir():
            continue
        name = info.filename.replace("\\", "/")
        path = PurePosixPath(name)
        mode = info.external_attr >> 16
        if path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":"):
            entries.append(_Entry(name, (), "zip_unsafe_path", "absolute path or '..' (ZIP-slip)"))
            continue
        if stat.S_ISLNK(mode):
            entries.append(_Entry(name, (), "zip_symlink", "symbolic link entry"))
            continue
        if info.flag_bits & 0x1:
            entries.append(_Entry(name, (), "encrypted", "password-protected entry"))
            continue
        ratio = info.file_size / max(1, info.compress_size)
        if info.file_size > limits.max_entry_bytes:
            entries.append(_Entry(name, (), "zip_bomb",
                                  f"{info.file_size} bytes uncompressed > {limits.max_entry_bytes}"))
            continue
        if info.file_size >= limits.ratio_floor_bytes and ratio > limits.max_ratio:
            entries.append(_Entry(name, (), "zip_bomb",
                                  f"compression ratio {ratio:.0f} > {limits.max_ratio:.0f}"))
            continue
        if total + info.file_size > limits.max_total_bytes:
            entries.append(_Entry(name, (), "zip_bomb",
                                  f"archive total exceeds {limits.max_total_bytes} bytes uncompressed"))
            continue
        total += info.file_size
        entries.append(_Entry(name, ("zip", str(archive), info.filename)))
    return entries


def _read_zip_member(locator: tuple) -> bytes:
    with zipfile.ZipFile(locator[1]) as zf:
        return zf.read(locator[2])


def _zip_source(archive: Path, limits: ZipLimits) -> Source:
    return _labelled(Source("zip", []), zip_entries(archive, limits), _read_zip_member)


# ----------------------------------------------------------------------------- table


_PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path")


def _table_source(table_path: Path, roots: DataRoots) -> Source:
    """A CSV/Parquet manifest: one row per image, paths relative to the table's folder
    and confined to ``roots``."""
    try:
        if table_path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(table_path)
        else:
            df = pd.read_csv(table_path, sep="\t" if table_path.suffix.lower() == ".tsv" else ",",
                             dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas/pyarrow raise many types for a malformed table
        raise SourceError(f"{table_path}: cannot read the table: {exc}") from exc
    lower = {c.lower(): c for c in df.columns}
    path_col = next((lower[c] for c in _PATH_COLUMNS if c in lower), None)
    if path_col is None:
        raise SourceError(f"{table_path}: no path column (expected one of {_PATH_COLUMNS})")
    split_col = lower.get("split")
    label_col = lower.get("labels") or lower.get("label")
    onehot: list[str] = []
    if label_col is None:
        onehot = [c for c in df.columns if c not in (path_col, split_col)
                  and _is_binary(df[c])]
        if not onehot:
            raise SourceError(f"{table_path}: no 'labels' column and no 0/1 label columns")
    items = []
    for row in df.to_dict(orient="records"):
        rel = str(row[path_col]).strip()
        if label_col is not None:
            labels = tuple(mf.split_labels(str(row[label_col])))
        else:
            labels = tuple(c for c in onehot if str(row[c]).strip().lower() in ("1", "1.0", "true"))
        split = None
        if split_col is not None and str(row[split_col]).strip():
            split = SPLIT_FOLDERS.get(str(row[split_col]).strip().lower())
        if not rel:
            items.append(Item(f"<row {len(items) + 1}>", (), reason="missing_file",
                              detail="empty path"))
            continue
        locator, reason, detail = roots.place(rel)
        if reason is not None:
            items.append(Item(rel, (), labels, split, reason=reason, detail=detail))
            continue
        if labels:
            items.append(Item(rel, locator, labels, split))
        else:
            items.append(Item(rel, locator, split=split, label_reason="no_label",
                              detail="row has no label"))
    return Source("table", items, classes=[str(c) for c in onehot] or None,
                  notes=[f"{len(df)} rows from {table_path.name}"])


def _is_binary(column: pd.Series) -> bool:
    values = {str(v).strip().lower() for v in column.unique()}
    return bool(values) and values <= {"0", "1", "0.0", "1.0", "true", "false"}


# ----------------------------------------------------------------------------- S3


def _s3_source(uri: str, limits: ZipLimits, allowed_roots: tuple[str, ...]) -> Source:
    store = storage.S3Store()
    loc = storage.S3Uri.parse(uri)
    suffix = PurePosixPath(loc.key).suffix.lower()
    if loc.key and (suffix == ".zip" or suffix in TABLE_SUFFIXES):
        # One archive or table object: fetch it, then read it like a local one.
        tmp = tempfile.TemporaryDirectory(prefix="triview-s3-")
        local = Path(tmp.name) / PurePosixPath(loc.key).name
        store.download_file(uri, local)
        if suffix in TABLE_SUFFIXES:   # rows are relative to the table's own prefix
            folder = PurePosixPath(loc.key).parent.as_posix()
            prefix = f"s3://{loc.bucket}/{'' if folder == '.' else folder}"
            source = _table_source(local, DataRoots.for_s3_prefix(prefix, allowed_roots))
        else:
            source = _zip_source(local, limits)
        source.tempdir = tmp
        source.kind = "s3"
        return source
    objects = store.list(uri)
    if not objects:
        raise SourceError(f"no objects below {uri}")
    prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
    entries = [_Entry(key[len(prefix):], ("s3", f"s3://{loc.bucket}/{key}")) for key, _ in objects]
    return _labelled(Source("s3", []), entries, lambda locator: store.get_bytes(locator[1]))


# ----------------------------------------------------------------------------- Custom Vision


def _customvision_source(uri: str, allowed_roots: tuple[str, ...]) -> Source:
    """One item per image of the project: tagged images with their tag names as labels
    (several tags: a multi-label row), untagged ones quarantined as ``untagged``, URIs
    outside the service's hosts as ``outside_root`` (never requested)."""
    try:
        project = customvision.ProjectUri.parse(uri)
        listing = customvision.list_project(project, customvision.training_key(),
                                            allowed_hosts=allowed_roots)
    except customvision.CustomVisionError as exc:
        raise SourceError(str(exc)) from None
    items = []
    for image in listing.images:
        if not image.labels:
            items.append(Item(image.image_id, (), reason="untagged",
                              detail="no tag in the Custom Vision project"))
        elif image.refused is not None:
            items.append(Item(image.image_id, (), image.labels, reason=OUTSIDE_ROOT,
                              detail=f"image URI {image.refused}"))
        else:
            items.append(Item(image.image_id, ("url", image.uri), image.labels))
    return Source("customvision", items, notes=listing.notes)
