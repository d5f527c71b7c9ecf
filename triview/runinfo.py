"""Per-stage bookkeeping: every stage leaves a ``stage.json`` in its output folder."""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from triview.storage import atomic_write_text

STAGE_FILE = "stage.json"


@contextlib.contextmanager
def stage_record(name: str, out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Time a stage and write ``{"stage", "seconds", "peak_rss_bytes", "output_files", ...}``
    to ``out_dir/stage.json``.

    The caller may add counts to the yielded dict; they are written with the timing and
    pushed to the Pushgateway when ``PUSHGATEWAY_URL`` is set.
    """
    record: dict[str, Any] = {"stage": name}
    start = time.perf_counter()
    yield record
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["peak_rss_bytes"] = peak_rss_bytes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the files this stage leaves in its folder, stage.json included: on a cluster, the
    # objects KFP's launcher uploads for this artifact
    record["output_files"] = 1 + sum(1 for p in out.rglob("*") if p.is_file() and p.name != STAGE_FILE)
    atomic_write_text(out / STAGE_FILE, json.dumps(record, indent=2, default=str))
    push_record(name, record, out)


def peak_rss_bytes() -> int:
    """The peak resident memory of this process, or of any child it waited for (pool
    workers, torchrun's ranks), in bytes: in a KFP task, the task's own peak.

    This process's own peak is its address space's high-water mark (``VmHWM`` in
    /proc/self/status): ``getrusage``'s maxrss for the process itself would carry over the
    memory of whatever process started it (Linux keeps it across ``exec``)."""
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports kilobytes
    own = 0
    try:
        with open("/proc/self/status") as f:
            own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return scale * max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def push_record(name: str, record: dict[str, Any], out_dir: str | Path) -> None:
    """Push a stage record's figures to the Pushgateway (``PUSHGATEWAY_URL``), if set."""
    from triview import metrics

    try:
        metrics.push(name, metrics.stage_values(record), metrics.run_id_for(Path(out_dir)))
    except Exception as exc:  # observability must never fail a stage that succeeded
        warnings.warn(f"metrics for {name} not pushed: {exc!r}", RuntimeWarning, stacklevel=3)


def read_stage_records(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Collect every ``stage.json`` below a run folder, keyed by stage name."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(run_dir).rglob(STAGE_FILE)):
        rec = json.loads(path.read_text())
        records[rec["stage"]] = rec
    return records
