"""The run summary: one JSON per run with metrics, counts, stage timings and artifacts."""
from __future__ import annotations

import json
from pathlib import Path

from triview.runinfo import read_stage_records
from triview.storage import atomic_write_text

SUMMARY_FILE = "run_summary.json"


def build_summary(run_dir: str | Path, model_dir: str | Path, report_path: str | Path) -> dict:
    """Assemble the summary from the ``stage.json`` files below a pipeline run folder."""
    stages = read_stage_records(run_dir)
    missing = [s for s in ("ingest", "evaluate", "export") if s not in stages]
    if missing:
        raise FileNotFoundError(f"no stage record for {missing} below {run_dir}")
    ingest, evaluation = stages["ingest"], stages["evaluate"]
    counts = {k: int(ingest["counts"][k]) for k in ("train", "val", "test", "quarantined")}
    summary = {
        "views": evaluation["views"],
        "ensemble": evaluation["ensemble"],
        "versus_best_view": evaluation.get("versus_best_view"),
        "counts": counts,
        "stages": {name: {"seconds": rec["seconds"]} for name, rec in stages.items()},
        "gate": evaluation.get("gate"),
        "export": {k: stages["export"][k] for k in ("promoted", "registry_version", "champion_uri",
                                                    "refused", "onnx_max_abs_diff", "data_version")
                   if k in stages["export"]},
        "artifacts": {"model": str(Path(model_dir).resolve()),
                      "report": str(Path(report_path).resolve()),
                      "run_dir": str(Path(run_dir).resolve())},
    }
    if "repeats" in stages:  # the DAG ran with repeats > 1: mean and SD over its seeds
        summary["repeats"] = stages["repeats"]["repeats"]
    return summary


def _metric_leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, float]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_metric_leaves(value, prefix + (key,)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + (key,)] = float(value)
    return out


def aggregate_repeats(summaries: list[dict], seeds: list[int]) -> dict:
    """Mean and sample SD over repeated runs of every numeric metric of ``views`` and
    ``ensemble`` (the practice of reporting mean ± SD over seeds)."""
    import numpy as np

    per_run = [_metric_leaves({"views": s["views"], "ensemble": s["ensemble"]}) for s in summaries]
    keys = sorted(set.intersection(*(set(r) for r in per_run)))
    out: dict = {"n": len(summaries), "seeds": list(seeds)}
    for key in keys:
        values = np.array([r[key] for r in per_run])
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = {"mean": float(values.mean()),
                         "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                         "values": values.tolist()}
    return out


def write_summary(summary: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(summary, indent=2))
    return path
