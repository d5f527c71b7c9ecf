"""Ingest: read every file of a folder, ZIP, CSV/Parquet table or s3:// prefix
(:mod:`triview.sources`), validate and normalise it (:mod:`triview.validate`),
quarantine the bad ones with a reason, drop exact duplicates, report near
duplicates, apply the label operations, and split train/val/test stratified by
label and grouped by source image (or keep the split the input layout gives).

Every input file ends up either in the manifest or in the quarantine table:
``#input files == #used + #quarantined``. Files are processed in a bounded stream
by a process pool, so memory holds one small row per file, never the images.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import pandas as pd

from triview import manifest as mf
from triview.params import defaults
from triview import storage
from triview.dataroot import split_root_list
from triview.sources import Item, SourceError, ZipLimits, open_source
from triview.shards import ShardWriter, remove_members, split_ref, write_index
from triview.storage import atomic_write_text
from triview.validate import (IMAGES_DIR, WorkerConfig, init_worker, inspect_chunk,
                              near_duplicate_pairs)

DEFAULTS = defaults("ingest")
# Below this many files the pool's start-up costs more than it saves.
_POOL_MIN_FILES = 200
_CHUNK = 16  # results carry the images' bytes: few in flight


class IngestError(ValueError):
    """The input as a whole cannot be ingested (not a per-file problem).

    ``fixes`` are ``(what to do, parameter, value)`` (parameter None: nothing to set); the
    message names each as
    ``--param name=value`` (what ``triview run`` and ``submit`` take, and the parameter's
    name in the KFP UI); ``triview ingest`` renders them as its own flags (:meth:`render`).
    """

    def __init__(self, message: str, fixes: tuple[tuple[str, str | None, str], ...] = ()) -> None:
        self.message, self.fixes = message, tuple(fixes)
        super().__init__(self.render())

    def render(self, flag=None) -> str:
        """The message with each fix spelt by ``flag(parameter, value)``."""
        import shlex

        flag = flag or (lambda name, value: f"--param {shlex.quote(f'{name}={value}')}")
        fixes = [what if name is None else f"{what} ({flag(name, value)})"
                 for what, name, value in self.fixes]
        if not fixes:
            return self.message
        ways = "; ".join(fixes[:-1]) + ("; or " if len(fixes) > 1 else "") + fixes[-1]
        return f"{self.message.rstrip('.')}. To fix it: {ways}"


@dataclass(frozen=True)
class IngestOptions:
    """Everything ingest can be told; the CLI flags and stage arguments map onto these."""
    split_salt: str = DEFAULTS["split_salt"]  # salt of the split hash ("" = the default salt)
    split_fractions: tuple[float, float, float] = (
        1 - DEFAULTS["val_fraction"] - DEFAULTS["test_fraction"], DEFAULTS["val_fraction"],
        DEFAULTS["test_fraction"])
    min_size: int = DEFAULTS["min_size"]    # shorter side, pixels
    max_pixels: int = DEFAULTS["max_pixels"]  # decompression-bomb cap
    max_file_bytes: int = 512 << 20         # files above this are not read
    remap: tuple[tuple[str, str], ...] = ()  # ("a", "b"): label a becomes b (merge)
    drop: tuple[str, ...] = ()              # labels removed
    min_per_class: int = DEFAULTS["min_per_class"]  # classes with fewer used images are quarantined
    near_duplicate_distance: int = DEFAULTS["near_duplicate_distance"]  # dHash distance; -1: off
    workers: int = 0                        # processes (0: one per core)
    progress: bool | None = None            # progress bar (None: when stderr is a terminal)
    zip_limits: ZipLimits = ZipLimits()
    plot: bool = True                       # write stats.png
    allow_empty: bool = False               # no usable image: write an empty manifest, no error
    allowed_roots: tuple[str, ...] = ()     # folders / s3://bucket/prefix table rows may also read


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    classes: list[str]
    n_input: int
    counts: dict[str, int] = field(default_factory=dict)
    dataset_version: str = ""
    statistics: dict = field(default_factory=dict)


def parse_remap(specs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``["a->b", "c->b"]`` (or one comma-separated string) -> ``(("a", "b"), ("c", "b"))``."""
    out = []
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            old, sep, new = part.partition("->")
            if not sep or not old.strip() or not new.strip():
                raise IngestError(f"label remap {part!r} is not of the form 'old->new'")
            out.append((old.strip(), new.strip()))
    return tuple(out)


def _inspect_all(tasks: list[tuple[tuple, bool]], config: WorkerConfig, workers: int,
                 progress: bool) -> Iterator[tuple]:
    """Results in task order, from a pool that never has more than a few chunks queued."""
    from tqdm import tqdm

    from triview.progress import Reporter

    bar = tqdm(total=len(tasks), unit="img", desc="ingest", disable=not progress,
               mininterval=0.5, file=sys.stderr)
    events = Reporter("file", len(tasks), desc="ingest")   # the local console's bar
    chunks = (tasks[i:i + _CHUNK] for i in range(0, len(tasks), _CHUNK))
    try:
        if workers <= 1 or len(tasks) < _POOL_MIN_FILES:
            init_worker(config)
            for chunk in chunks:
                results = inspect_chunk(chunk)
                bar.update(len(results))
                events.advance(len(results))
                yield from results
            return
        import multiprocessing

        # forkserver: forking a parent whose OpenCV/OpenMP threads run can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                                 initializer=init_worker, initargs=(config,)) as pool:
            pending = []
            for chunk in chunks:
                pending.append(pool.submit(inspect_chunk, chunk))
                if len(pending) >= 4 * workers:
                    results = pending.pop(0).result()
                    bar.update(len(results))
                    events.advance(len(results))
                    yield from results
            for fut in pending:
                results = fut.result()
                bar.update(len(results))
                events.advance(len(results))
                yield from results
    finally:
        bar.close()


# ----------------------------------------------------------------------------- labels


def _apply_label_ops(items: list[Item], remap: dict[str, str], drop: set[str]) -> list[Item]:
    if not remap and not drop:
        return items
    out = []
    for it in items:
        if it.reason or not it.labels:
            out.append(it)
            continue
        labels = list(dict.fromkeys(remap.get(lab, lab) for lab in it.labels))
        kept = [lab for lab in labels if lab not in drop]
        if not kept:
            out.append(it._replace(labels=(), label_reason=it.label_reason or "dropped_label",
                                   detail=it.detail or f"labels {labels} dropped"))
        else:
            out.append(it._replace(labels=tuple(kept)))
    return out


def _declared_classes(declared: list[str] | None, remap: dict[str, str], drop: set[str]) -> list[str] | None:
    if declared is None:
        return None
    mapped = [remap.get(c, c) for c in declared]
    return [c for c in dict.fromkeys(mapped) if c not in drop]


_ROBOFLOW_COPY = re.compile(r"\.rf\.[0-9a-f]{16,}$", re.IGNORECASE)


def source_id_of(rel: str) -> str:
    """The source photo a file comes from: its path in the data root (a wrapping folder
    taken off: :attr:`triview.sources.Item.data_path`) without suffix, and without
    Roboflow's ``.rf.<hash>`` so that augmented copies of one photo share a split."""
    return _ROBOFLOW_COPY.sub("", str(PurePosixPath(rel).with_suffix("")))


def one_class_message(label: str, data: str, n_images: int) -> str:
    """Why one class cannot be trained, and the folder layout that gives more."""
    return (f"only one class, {label!r} ({n_images} usable images), in {data!r}: a classifier "
            f"needs at least two. Put each class's images in a folder of its own: "
            f"{data.rstrip('/')}/<class>/<image> (e.g. {label}/ and other/)")


def small_class_fixes(classes: list[str], need: int) -> tuple[tuple[str, str | None, str], ...]:
    """What lets ``classes`` (too small to split) through: more images, or a label operation."""
    return (("add images to them", None, ""),
            ("merge each into another class", "label_remap", ",".join(f"{c}->OTHER" for c in classes)),
            ("drop them", "label_drop", ",".join(classes)),
            (f"quarantine every class below {need} images", "min_per_class", str(need)))


# ----------------------------------------------------------------------------- split


#: The salt of the split hash when ``split_salt`` is empty.
DEFAULT_SPLIT_SALT = "triview-split-v1"


def split_position(source_id: str, salt: str = "") -> float:
    """Where a source photo falls in [0, 1): the first 8 bytes of
    SHA-256(salt NUL source_id). It depends on nothing but the photo's group key and the
    salt, so a photo keeps its split however many other photos come or go."""
    digest = hashlib.sha256(f"{salt or DEFAULT_SPLIT_SALT}\0{source_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _split(groups: pd.DataFrame, fractions: tuple[float, float, float], salt: str = ""
           ) -> tuple[dict[str, str], list[dict], dict[str, list[str]]]:
    """Assign each source group to a split by its salted hash (:func:`split_position`).

    Groups whose split the input gives (``given`` column) keep it; the splits a class
    lacks are carved from the rest of that class by ``fractions``: a group whose
    position is below the test share goes to test, below test + val share to val, else
    to train. Coverage is decided per class: when the input gives a val (or test) split
    for some classes only, the others get theirs carved (returned as ``carved_for``,
    class -> splits, for the classes whose given splits differ from the data set's).
    Stratification is by expectation (every class is cut by the same bands). A class
    that the bands leave without an image in a carved split (a small class) gets its
    group nearest to that band moved there; these moves are returned (``forced``) and
    reported, and they are the one case in which a photo's split can depend on the
    other photos of its class. A class with no group left to train on is refused.
    """
    train_frac, val_frac, test_frac = fractions
    if abs(train_frac + val_frac + test_frac - 1.0) > 1e-6 or min(fractions) < 0:
        raise IngestError(f"split fractions {fractions} do not sum to 1")
    given = groups["given"] if "given" in groups else pd.Series([None] * len(groups))
    given = list(given.where(given.notna(), None))
    assignment = {sid: s for sid, s in zip(groups["source_id"], given) if s is not None}
    present = set(assignment.values())
    given_by_class: dict[str, set[str]] = {}
    for label, s in zip(groups["label"], given):
        given_by_class.setdefault(label, set()).update([s] if s is not None else [])
    pool = groups[[s in (None, "train") for s in given]]
    untrainable = sorted(set(groups["label"]) - set(pool["label"]))
    if untrainable:
        raise IngestError(
            f"classes with no image outside the given val/test split cannot be trained: "
            f"{', '.join(map(repr, untrainable))}. Move some of their images to train, or "
            f"drop the class (--drop NAME)")
    needed_by_class = {label: [s for s in ("test", "val") if s not in given_by_class[label]]
                       for label in sorted(set(pool["label"]))}
    globally = [s for s in ("test", "val") if s not in present]
    carved_for = {label: needed for label, needed in needed_by_class.items() if needed != globally}
    frac = {"val": val_frac, "test": test_frac}
    counts = pool["label"].value_counts()
    too_few = {label: int(counts[label]) for label, needed in needed_by_class.items()
               if needed and counts[label] < 1 + len(needed)}
    if too_few:
        names = ", ".join(f"{k!r} ({v}) has fewer than {1 + len(needed_by_class[k])} source "
                          "images" for k, v in too_few.items())
        where = "" if not present else " in the train part of the given split"
        raise IngestError(
            f"classes with too few source images{where} to carve the splits they lack: "
            f"{names}",
            small_class_fixes(sorted(too_few), max(1 + len(needed_by_class[k]) for k in too_few)))
    position = {sid: split_position(sid, salt) for sid in pool["source_id"]}
    carved: dict[str, str] = {}
    forced = []
    for label, part in pool.groupby("label", sort=True):
        needed = needed_by_class[label]
        ids = list(part["source_id"])
        if not needed:
            carved.update({i: "train" for i in ids})
            continue
        # the bands, as shares of the pool (given test/val images are not in it)
        share = train_frac + sum(frac[s] for s in needed)
        bands, low = {}, 0.0
        for s in needed:  # test first, then val
            bands[s] = (low, low + frac[s] / share)
            low = bands[s][1]
        mine = {i: next((s for s, (lo, hi) in bands.items() if lo <= position[i] < hi), "train")
                for i in ids}
        bands["train"] = (low, 1.0)
        for s in needed + ["train"]:
            if any(v == s for v in mine.values()):
                continue
            # take from the split of this class that has the most groups
            sizes = {t: sum(v == t for v in mine.values()) for t in ["train"] + needed}
            donor = max(sizes, key=lambda t: (sizes[t], t == "train"))
            lo, hi = bands[s]
            centre = (lo + hi) / 2
            pick = min((i for i in ids if mine[i] == donor),
                       key=lambda i: (abs(position[i] - centre), i))
            mine[pick] = s
            forced.append({"source_id": pick, "label": label, "split": s, "from": donor})
        carved.update(mine)
    assignment.update(carved)
    return assignment, forced, carved_for


# ----------------------------------------------------------------------------- ingest


def ingest(data: str | Path, out_dir: str | Path, **options) -> IngestResult:
    """Ingest a folder, ZIP, CSV/Parquet table or ``s3://`` prefix into ``out_dir``.

    Writes ``manifest.csv`` (one row per used image), ``quarantine.csv`` (one row
    per rejected file: path, reason, detail), ``classes.json`` and ``mapping.txt``/
    ``mapping.json`` (the label encoding), ``near_duplicates.csv``, ``stats.csv``,
    ``stats.json``, ``stats.png``, ``dataset.json`` (``dataset_version``: the
    SHA-256 of the manifest) and the images, as WebDataset tar shards
    ``images/NNNNNN.tar`` with their index (:mod:`triview.shards`; the manifest's
    ``path`` is ``<shard>#<sha256[:16]><suffix>``): the original bytes when OpenCV
    decodes them to the same RGB pixels (JPEG/PNG/WebP/BMP, RGB or gray, no EXIF
    rotation), otherwise a normalised 8-bit RGB PNG. ``out_dir`` may be an
    ``s3://`` prefix: the folder is built locally and uploaded, manifest last.
    ``options`` are :class:`IngestOptions` fields.
    """
    unknown = set(options) - {f.name for f in fields(IngestOptions)}
    if unknown:
        raise IngestError(f"unknown ingest options {sorted(unknown)}")
    if "split_fractions" in options:
        options["split_fractions"] = tuple(options["split_fractions"])
    if "allowed_roots" in options:   # the pipeline passes one comma-separated string
        options["allowed_roots"] = split_root_list(options["allowed_roots"])
    opts = IngestOptions(**options)
    if storage.is_s3(str(out_dir)):
        with tempfile.TemporaryDirectory(prefix="triview-ingest-out-") as tmp:
            result = _ingest_local(data, Path(tmp), opts)
            storage.S3Store().upload_tree(tmp, str(out_dir),
                                          last=(mf.DATASET_FILE, mf.MANIFEST_FILE))
        return result
    return _ingest_local(data, Path(out_dir), opts)


def _ingest_local(data: str | Path, out: Path, opts: IngestOptions) -> IngestResult:
    try:
        source = open_source(data, opts.zip_limits, opts.allowed_roots)
    except SourceError as exc:
        raise IngestError(str(exc)) from exc
    try:
        return _ingest_source(source, str(data), out, opts)
    finally:
        source.close()


def _ingest_source(source, data: str, out: Path, opts: IngestOptions) -> IngestResult:
    remap, drop = dict(opts.remap), set(opts.drop)
    items = _apply_label_ops(source.items, remap, drop)
    n_input = len(items)
    if n_input == 0:
        raise IngestError(f"no files in {data!r}")

    s3 = storage.S3Config.from_env() if any(it.locator[:1] == ("s3",) for it in items) else None
    config = WorkerConfig(str(out), opts.min_size, opts.max_pixels, opts.max_file_bytes, s3)
    tasks_idx = [i for i, it in enumerate(items) if it.reason is None]
    tasks = [(items[i].locator, items[i].label_reason is None) for i in tasks_idx]
    workers = opts.workers or (os.cpu_count() or 1)
    progress = sys.stderr.isatty() if opts.progress is None else opts.progress

    quarantined: list[tuple[int, str, str]] = [(i, it.reason, it.detail)
                                               for i, it in enumerate(items) if it.reason]
    used: list[tuple] = []   # (item index, sha, w, h, format, mode, dhash, stored, bytes)
    seen: dict[str, str] = {}
    # the workers validate and encode; this process stores each used image, once, into
    # the shard series
    with ShardWriter(out, IMAGES_DIR) as writer:
        for i, res in zip(tasks_idx, _inspect_all(tasks, config, workers, progress)):
            reason, detail, sha = res[0], res[1], res[2]
            it = items[i]
            if reason is None and it.label_reason is not None:
                reason, detail = it.label_reason, it.detail
            if reason is None and sha in seen:
                reason, detail = "exact_duplicate", f"same bytes as {seen[sha]}"
            if reason is not None:
                quarantined.append((i, reason, detail))
                continue
            seen[sha] = it.rel
            used.append((i, *res[2:8], writer.add(res[8], res[10]), res[9]))

    # minimum images per class (multi-label: per label), after everything else; the images
    # dropped so leave their shards too
    dropped: dict[str, set[str]] = {}
    if opts.min_per_class > 0 and used:
        counts = pd.Series([lab for u in used for lab in items[u[0]].labels]).value_counts()
        rare = set(counts[counts < opts.min_per_class].index)
        if rare:
            kept = []
            for u in used:
                it = items[u[0]]
                labels = tuple(lab for lab in it.labels if lab not in rare)
                if labels:
                    items[u[0]] = it._replace(labels=labels)
                    kept.append(u)
                else:
                    quarantined.append((u[0], "class_below_minimum",
                                        f"{it.labels[0]!r} has {counts[it.labels[0]]} images "
                                        f"< {opts.min_per_class}"))
                    shard, member = split_ref(u[7])
                    dropped.setdefault(shard, set()).add(member)
            used = kept
    remove_members(out, writer.entries, dropped)
    write_index(out, writer.entries)

    quarantined.sort()
    quarantine = pd.DataFrame([(items[i].rel, r, d) for i, r, d in quarantined],
                              columns=list(mf.QUARANTINE_COLUMNS))
    mf.write_table(quarantine, out / mf.QUARANTINE_FILE, mf.QUARANTINE_COLUMNS)
    assert n_input == len(used) + len(quarantine), "every input file must be accounted for"
    if not used and not opts.allow_empty:
        raise IngestError(f"no usable images in {data!r} "
                          f"({n_input} files, all quarantined: see {out / mf.QUARANTINE_FILE})")
    labels_used = {lab for u in used for lab in items[u[0]].labels}
    if len(labels_used) == 1:  # the voter and every metric need two
        raise IngestError(one_class_message(labels_used.pop(), data, len(used)))

    rows = []
    for i, sha, w, h, fmt, mode, dh, stored, nbytes in used:
        it = items[i]
        rows.append({"image_id": sha[:16], "path": stored, "label": it.labels[0],
                     "labels": mf.join_labels(list(it.labels)), "source_id": source_id_of(it.data_path),
                     "sha256": sha, "width": w, "height": h, "original_path": it.rel,
                     "format": fmt.lower(), "mode": mode, "bytes": nbytes,
                     "dhash": f"{dh:016x}", "given_split": it.split})
    table = pd.DataFrame(rows, columns=list(_ROW_COLUMNS))
    if len(table):
        groups = _source_groups(table)
        try:
            assignment, forced, carved_for = _split(groups, opts.split_fractions,
                                                    opts.split_salt)
        except IngestError:
            raise
        except ValueError as exc:
            raise IngestError(str(exc)) from exc
        table["split"] = table["source_id"].map(assignment)
    else:
        table["split"] = pd.Series(dtype=str)
        forced, carved_for = [], {}
    split_info = {"method": "hash", "key": "source_id",
                  "salt": opts.split_salt or DEFAULT_SPLIT_SALT,
                  "fractions": list(opts.split_fractions),
                  "given": sorted({s for s in table.get("given_split", []) if isinstance(s, str)}),
                  "forced": forced, "carved_for_class": carved_for}
    table = table.drop(columns=["given_split"])

    all_labels = {lab for s in table["labels"] for lab in mf.split_labels(s)}
    declared = _declared_classes(source.classes, remap, drop)
    classes = [c for c in declared if c in all_labels] if declared else []
    classes += sorted(all_labels - set(classes))

    near = _near_duplicates(table, opts.near_duplicate_distance)
    mf.write_table(near, out / mf.NEAR_DUPLICATES_FILE, tuple(near.columns))
    mf.write_manifest(table, out)
    mf.write_classes(classes, out)
    mf.write_mapping(classes, out)
    version = mf.dataset_version(out)

    from triview import datastats

    stats = datastats.write_statistics(table, quarantine, near, classes, out, n_input=n_input,
                                       dataset_version=version, plot=opts.plot,
                                       split=split_info)
    counts = {s: int((table["split"] == s).sum()) for s in mf.SPLITS}
    counts["quarantined"] = len(quarantine)
    counts["input"] = n_input
    atomic_write_text(out / mf.DATASET_FILE, json.dumps({
        "dataset_version": version, "source": data, "source_kind": source.kind,
        "counts": counts, "classes": classes, "notes": source.notes, "split": split_info,
        "options": _jsonable(asdict(opts))}, indent=2))
    return IngestResult(table, quarantine, classes, n_input, counts, version, stats)


_ROW_COLUMNS = ("image_id", "path", "label", "labels", "source_id", "sha256", "width", "height",
                "original_path", "format", "mode", "bytes", "dhash", "given_split")


def _source_groups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per source photo: its most common label (ties: the first by name) and
    the split its files were given, if any."""
    votes = table.groupby(["source_id", "label"], sort=True).size().rename("n").reset_index()
    votes = votes.sort_values(["source_id", "n", "label"], ascending=[True, False, True])
    groups = votes.drop_duplicates("source_id")[["source_id", "label"]]
    given = table.groupby("source_id", sort=True)["given_split"].first()
    groups = groups.assign(given=groups["source_id"].map(given))
    return groups.reset_index(drop=True)


def _near_duplicates(table: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    columns = ["path_a", "path_b", "distance", "split_a", "split_b"]
    if max_distance < 0 or len(table) < 2:
        return pd.DataFrame(columns=columns)
    hashes = [int(h, 16) for h in table["dhash"]]
    pairs = near_duplicate_pairs(hashes, max_distance)
    orig, split = table["original_path"].to_numpy(), table["split"].to_numpy()
    return pd.DataFrame([(orig[i], orig[j], d, split[i], split[j]) for i, j, d in pairs],
                        columns=columns)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def class_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per class and split (rows: classes, columns: splits)."""
    return (table.groupby(["label", "split"]).size().unstack(fill_value=0)
            .reindex(columns=list(mf.SPLITS), fill_value=0))
