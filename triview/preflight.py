"""Checks of a run's input and output that cost no more than listing the input's files,
made before any task starts (``triview run``, ``triview ingest``): a layout the pipeline
cannot train is refused in a second with its fix, not minutes later in a task.

Nothing is decoded here, so the counts are of files: an upper bound of the usable images
ingest will find. A check therefore refuses only what ingest would refuse too (one class,
a class too small to split); everything else is left to ingest, which accounts for every
file.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from triview import storage
from triview.ingest import (IngestError, one_class_message, parse_remap, small_class_fixes,
                            source_id_of)
from triview.sources import SourceError, open_source


def check_out_not_in_data(data: str, out: str) -> None:
    """Refuse an output folder inside the data folder: ingest would read the run's own
    files (logs, crops, models) as photos, and the next run would find a class ``run``."""
    if storage.is_s3(str(data)) or storage.is_s3(str(out)) or not Path(data).is_dir():
        return
    data_dir, out_dir = Path(data).resolve(), Path(out).resolve()
    if out_dir == data_dir or data_dir in out_dir.parents:
        beside = data_dir.parent / f"{data_dir.name}-out"
        raise IngestError(f"the output folder {out} is inside the data folder {data}: ingest "
                          f"would read this run's own files as photos. Give an --out outside "
                          f"it, e.g. --out {beside}")


def check_layout(data: str, *, label_remap: str = "", label_drop: str = "",
                 min_per_class: int = 0, allowed_roots: str = "") -> dict[str, int]:
    """Files per class of a local input (folder, ZIP or table), after the label
    operations; refuses (:class:`IngestError`, with its fixes) an input without classes,
    with one class, or with a class too small to be split into train/val/test. ``s3://``
    inputs are not listed here (ingest checks them)."""
    from triview.dataroot import split_root_list

    if storage.is_s3(str(data)):
        return {}
    try:
        source = open_source(data, allowed_roots=split_root_list(allowed_roots))
    except SourceError as exc:
        raise IngestError(str(exc)) from exc
    try:
        items = [it for it in source.items if it.reason is None]
    finally:
        source.close()
    remap = dict(parse_remap([label_remap]))
    drop = {d.strip() for d in label_drop.split(",") if d.strip()}
    labelled = []   # (source id, labels, given split) of every file that has a label
    for it in items:
        if it.label_reason is None and it.labels:
            labels = [x for x in dict.fromkeys(remap.get(y, y) for y in it.labels) if x not in drop]
            if labels:
                labelled.append((source_id_of(it.data_path), labels, it.split))
    if not labelled:
        if any(it.label_reason == "no_label" for it in items):
            raise IngestError(f"no class folders in {data!r}: put each class's images in a "
                              f"folder of its own, {str(data).rstrip('/')}/<class>/<image>")
        return {}
    files = Counter(label for _, labels, _ in labelled for label in labels)
    if len(files) == 1:
        label, n = files.most_common(1)[0]
        raise IngestError(one_class_message(label, str(data), n))
    if min_per_class > 0:
        kept = Counter({c: n for c, n in files.items() if n >= min_per_class})
        if len(kept) < 2:
            raise IngestError(f"min_per_class {min_per_class} leaves {len(kept)} of the "
                              f"{len(files)} classes in {data!r} ({_counts(files)}): a "
                              f"classifier needs at least two",
                              (("lower it", "min_per_class", str(_second(files))),))
        files = kept
    if any(len(labels) > 1 for _, labels, _ in labelled):
        return dict(files)   # multi-label: ingest groups by the most common label; it checks
    groups = {sid: (labels[0], split) for sid, labels, split in labelled if labels[0] in files}
    given = {split for _, split in groups.values() if split}
    needed = [s for s in ("test", "val") if s not in given]
    if needed:
        need = 1 + len(needed)
        pool = Counter(label for label, split in groups.values() if split in (None, "train"))
        too_few = sorted(c for c in files if pool[c] < need)
        if too_few:
            raise IngestError(f"classes with fewer than {need} source images cannot be split into "
                              f"train/{'/'.join(reversed(needed))}: "
                              f"{', '.join(f'{c!r} ({pool[c]})' for c in too_few)}",
                              small_class_fixes(too_few, need))
    return dict(files)


def _counts(per_class: Counter) -> str:
    return ", ".join(f"{c} {n}" for c, n in per_class.most_common())


def _second(per_class: Counter) -> int:
    """The largest min_per_class that keeps two classes."""
    counts = sorted(per_class.values(), reverse=True)
    return counts[1] if len(counts) > 1 else 1
