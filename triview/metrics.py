"""Prometheus metrics pushed to a Pushgateway (prometheus-client).

Active only when ``PUSHGATEWAY_URL`` is set; otherwise every call is a no-op. A
Pushgateway that cannot be reached gives a warning and the run goes on. Metrics are
grouped by ``run_id`` and ``stage``; the run id is ``TRIVIEW_RUN_ID`` when set, else
the run folder of the stage's output artifact (``<root>/<run>/<task>/<output>``, the
layout of both kfp.local and the KFP launcher; kfp.local puts a ParallelFor iteration's
tasks one folder deeper, ``<run>/for-loop-N-iteration-K/<task>/<output>``).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

JOB = "triview"
log = logging.getLogger(__name__)


_LOOP_ITERATION = re.compile(r"for-loop-\d+-iteration-\d+")


def run_id_for(out_dir: str | Path) -> str:
    explicit = os.environ.get("TRIVIEW_RUN_ID")
    if explicit:
        return explicit
    parts = list(Path(out_dir).resolve().parts[:-2])  # drop <task>/<output>
    while parts and _LOOP_ITERATION.fullmatch(parts[-1]):  # a ParallelFor iteration's folder
        parts.pop()
    return parts[-1] if len(parts) > 1 else "unknown"


def _label(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def push(stage: str, values: dict[str, float], run_id: str, url: str | None = None,
         labels: dict[str, str] | None = None) -> bool:
    """Push ``values`` as gauges ``triview_<name>`` for (run_id, stage); True if pushed."""
    url = url or os.environ.get("PUSHGATEWAY_URL")
    if not url or not values:
        return False
    registry = CollectorRegistry()
    extra = dict(labels or {})
    for name, value in values.items():
        if value is None:
            continue
        gauge = Gauge(f"triview_{_label(name)}", f"triview {name}", list(extra), registry=registry)
        (gauge.labels(**extra) if extra else gauge).set(float(value))
    try:
        # POST (pushadd): replaces only these metric names, so per-epoch and per-stage
        # pushes of one (run, stage) group add up instead of overwriting each other
        pushadd_to_gateway(url, job=JOB, registry=registry,
                        grouping_key={"run_id": run_id, "stage": stage}, timeout=5)
    except (OSError, ValueError) as exc:  # URLError is an OSError
        warnings.warn(f"Pushgateway {url} unreachable ({exc}); metrics for {stage} not pushed",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def stage_values(record: dict) -> dict[str, float]:
    """The numbers of a stage record worth a gauge."""
    values: dict[str, float] = {"stage_duration_seconds": record.get("seconds")}
    for key in ("items_in", "items_out", "peak_rss_bytes", "output_files"):
        if key in record:
            values[key] = record[key]
    if record.get("items_out") and record.get("seconds"):
        values["items_per_second"] = record["items_out"] / max(record["seconds"], 1e-9)
    counts = record.get("counts") or {}
    if "quarantined" in counts:
        values["quarantined"] = counts["quarantined"]
    # evaluate / export: the gate's verdict (0/1), the champion it was compared with,
    # whether export promoted the model, and the export's parity and latency figures
    for key in ("blessed", "champion_macro_f1", "promoted", "onnx_max_abs_diff",
                "torchscript_max_abs_diff", "ensemble_ms_per_sample"):
        if key in record:
            values[key] = record[key]
    # evaluate: the gate's clean comparison and the drift against the champion's data
    # (triview_gate_clean_images, triview_drift_embedding_auc, triview_drift_class_psi, ...)
    for key, value in record.items():
        if key.startswith(("gate_", "drift_")):
            values[key] = value
    for key in ("val_macro_f1", "val_accuracy", "best_epoch"):
        if key in record:
            values[key] = record[key]
    ensemble = record.get("ensemble") or {}
    for key in ("accuracy", "macro_f1"):
        if key in ensemble:
            values[f"test_ensemble_{key}"] = ensemble[key]
    views = record.get("views")
    if isinstance(views, dict):  # evaluate: {view: {accuracy, macro_f1, ...}}
        for view, scores in views.items():
            for key in ("accuracy", "macro_f1"):
                if isinstance(scores, dict) and isinstance(scores.get(key), (int, float)):
                    values[f"test_{view}_{key}"] = scores[key]
    repeats = (record.get("repeats") or {}).get("ensemble") or {}
    for key in ("accuracy", "macro_f1"):  # repeats: mean and SD over seeds
        for stat in ("mean", "sd"):
            if isinstance(repeats.get(key), dict):
                values[f"test_ensemble_{key}_{stat}"] = repeats[key][stat]
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
