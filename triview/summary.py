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
        "test_interval": evaluation.get("accuracy_interval"),
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


def format_summary(summary: dict) -> str:
    """What ``triview run`` prints at the end: test figures per view and of the ensemble,
    the 95 % interval of the ensemble's accuracy, the gate's verdict in plain words, the
    counts, the times and where the model and the report are."""
    lines = ["", "test split  accuracy  macro-F1"]
    for view, s in summary["views"].items():
        lines.append(f"{view:<10}  {s['accuracy']:8.4f}  {s['macro_f1']:8.4f}")
    e = summary["ensemble"]
    lines.append(f"{'ensemble':<10}  {e['accuracy']:8.4f}  {e['macro_f1']:8.4f}  ({e['method']})")
    lines += interval_lines(summary.get("test_interval"), e["accuracy"])
    rep = summary.get("repeats")
    if rep:
        lines.append(f"over {rep['n']} seeds {rep['seeds']}: mean ± SD of macro-F1")
        for view, m in rep["views"].items():
            lines.append(f"{view:<10}  {m['macro_f1']['mean']:.4f} ± {m['macro_f1']['sd']:.4f}")
        e_f1 = rep["ensemble"]["macro_f1"]
        lines.append(f"{'ensemble':<10}  {e_f1['mean']:.4f} ± {e_f1['sd']:.4f}")
    c = summary["counts"]
    lines.append(f"images: {c['train']} train / {c['val']} val / {c['test']} test, "
                 f"{c['quarantined']} quarantined")
    lines.append(f"gate:   {gate_words(summary.get('gate') or {}, summary.get('export') or {})}")
    total = sum(s["seconds"] for s in summary["stages"].values())
    lines.append(f"stages: {total:.1f} s in stages, {summary.get('dag_seconds', total):.1f} s DAG wall time")
    lines.append(f"model:  {summary['artifacts']['model']}")
    lines.append(f"report: {summary['artifacts']['report']}")
    lines += versus_lines(summary)
    return "\n".join(lines)


def versus_lines(summary: dict) -> list[str]:
    """The last lines of a run: calibration, and whether the ensemble beats its best view
    (per seed with repeats), in test images."""
    e, lines = summary["ensemble"], []
    if e.get("ece") is not None and e.get("ece_before") is not None:
        lines.append(f"calibration: ensemble ECE {e['ece']:.3f} after temperature scaling "
                     f"({e['ece_before']:.3f} before)")
    per_seed = (summary.get("repeats") or {}).get("versus_best_view")
    if per_seed:
        for v in per_seed:
            lines.append(f"seed {v['seed']}: {v['statement']}")
    elif summary.get("versus_best_view"):
        lines.append(summary["versus_best_view"]["statement"])
    return lines


def interval_lines(interval: dict | None, accuracy: float) -> list[str]:
    """The 95 % interval of the ensemble's test accuracy, and a warning when it is too wide
    to trust (:data:`triview.scoring.TRUSTED_INTERVAL_WIDTH`)."""
    if not interval:
        return []
    lines = [f"ensemble test accuracy {accuracy:.3f} on {interval['n']} test images: "
             f"{interval['confidence']:.0%} interval {interval['low']:.3f} to {interval['high']:.3f} "
             f"(Wilson)"]
    if not interval["trusted"]:
        lines.append(f"warning: {interval['n']} test images are too few to trust these figures "
                     f"(one image is {1 / max(interval['n'], 1):.1%} of accuracy): add photos, or "
                     f"raise --param test_fraction")
    return lines


def gate_words(gate: dict, export: dict) -> str:
    """The gate's verdict as a newcomer reads it."""
    comparison = gate.get("comparison")
    if comparison == "no_registry":
        return "no registry, so no champion to compare with; nothing promoted"
    verdict = "blessed" if gate.get("blessed") else "not blessed"
    if comparison == "first_run":
        verdict += " (no champion in the registry yet: this is the first model)"
    if export.get("promoted"):
        verdict += f"; promoted as version {export.get('registry_version')}"
    elif export.get("refused"):
        verdict += "; not promoted"
    return verdict


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


def read_run_summary(run_out: str | Path) -> dict | None:
    """The ``run_summary.json`` of a ``triview run --out`` folder (None: not a run folder)."""
    path = Path(run_out) / SUMMARY_FILE
    if "://" in str(run_out) or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def model_of_run(run_out: str | Path) -> str | None:
    """The exported model folder of the run whose ``--out`` folder is ``run_out`` (its
    ``run_summary.json`` names it), or None when ``run_out`` is not a run folder."""
    summary = read_run_summary(run_out)
    if summary is None:
        return None
    model = (summary.get("artifacts") or {}).get("model")
    if not model or not Path(model).is_dir():
        raise FileNotFoundError(f"{Path(run_out) / SUMMARY_FILE} names the model folder {model!r}, "
                                f"which does not exist (moved or deleted?)")
    return model


def registry_version_of_run(run_out: str | Path) -> tuple[str, str, int]:
    """``(registry, model name, version)`` the run in ``run_out`` promoted, for
    ``triview deploy --run``; a run that promoted nothing is refused with the reason."""
    summary = read_run_summary(run_out)
    if summary is None:
        raise FileNotFoundError(f"{run_out!r} is not a run folder (no {SUMMARY_FILE})")
    parameters, export = summary.get("parameters") or {}, summary.get("export") or {}
    registry = parameters.get("registry") or ""
    if not registry:
        raise ValueError(f"the run in {run_out} had no registry, so it promoted no model a "
                         f"cluster can read: run again with --param registry=s3://BUCKET/PREFIX")
    if not export.get("promoted"):
        why = export.get("refused") or "the gate did not bless it"
        raise ValueError(f"the run in {run_out} promoted no model to {registry}: {why}")
    return registry, parameters.get("model_name") or "triview", int(export["registry_version"])


def write_summary(summary: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(summary, indent=2))
    return path
