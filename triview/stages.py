"""The ten DAG stages as plain functions over folders.

Each takes input folders and parameters, writes its output folder (including a
``stage.json`` with its timing and counts) and returns a small dict of
metadata. The KFP components in ``components/`` call exactly these, and so do
the tests; nothing here imports kfp.

Each stage imports only what it needs, inside the function: every task of the
DAG is a fresh process, and the light stages should not pay for importing torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from triview.runinfo import stage_record

if TYPE_CHECKING:
    import numpy as np
    import torch

Folder = str | Path


def ingest_stage(data: str, out_dir: Folder, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, min_size: int = 8, **options) -> dict:
    """``data``: folder, ZIP, CSV/Parquet table or s3:// prefix. ``val_fraction`` is the
    validation split carved when the input has none. ``options`` are the other
    :class:`~triview.ingest.IngestOptions` fields (remap, drop, min_per_class, ...)."""
    from triview import ingest as ing

    with stage_record("ingest", out_dir) as rec:
        fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        result = ing.ingest(data, out_dir, seed=seed, split_fractions=fractions, min_size=min_size,
                            **options)
        rec.update(counts=result.counts, classes=result.classes, items_in=result.n_input,
                   items_out=len(result.manifest), dataset_version=result.dataset_version,
                   quarantine_reasons=result.statistics.get("quarantine_reasons", {}))
    return rec


def calibrate_and_crop_stage(dataset_dir: Folder, out_dir: Folder, layout: str = "vertical",
                             overlap: float = 0.5, image_size: int = 32, window: float = 0.0,
                             resize: str = "stretch", calibration_file: str = "",
                             calibration_images: str = "", pattern: str = "9x6",
                             square: float = 1.0, lens_alpha: float = -1.0,
                             crop_roi: bool = False, workers: int = 0) -> dict:
    """Calibrate (from chessboard photos, or read an intrinsics file, or use the
    identity lens), then undistort and crop every image into three views.

    A lens calibrated here is saved as ``calibration.json`` in the output so later
    runs (and predict) can reuse it through ``calibration_file``.
    """
    from triview import calibration as cal
    from triview import crop

    with stage_record("calibrate-and-crop", out_dir) as rec:
        alpha = None if lens_alpha < 0 else lens_alpha
        if calibration_images:
            result = cal.calibrate_glob(calibration_images, pattern=cal.parse_pattern(pattern),
                                        square=square)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            result.save(Path(out_dir) / "calibration.json")
            lens = crop.LensModel(K=result.K, dist=result.dist, image_size=result.image_size,
                                  alpha=alpha, crop_roi=crop_roi)
            rec.update(calibration={"rms": result.rms, "used": len(result.per_view_error),
                                    "rejected": result.rejected})
        elif calibration_file:
            lens = crop.LensModel.from_file(calibration_file, alpha=alpha, crop_roi=crop_roi)
        else:
            lens = crop.LensModel()
        geometry = crop.CropGeometry(layout=layout, overlap=overlap, image_size=image_size,
                                     window=window, resize=resize)
        views = crop.calibrate_and_crop(dataset_dir, out_dir, geometry, lens, workers=workers)
        rec.update(views=list(geometry.views), items_in=int(views["image_id"].nunique()),
                   items_out=len(views), lens="identity" if lens.is_identity else "calibrated")
    return rec


def balance_stage(views_dir: Folder, out_dir: Folder, weighting: str = "inverse_frequency",
                  beta: float = 0.999, resample: str = "none", target: float = 0.0,
                  seed: int = 0) -> dict:
    from triview import balance as bal

    with stage_record("balance", out_dir) as rec:
        result = bal.balance(views_dir, out_dir, weighting=weighting, beta=beta,
                             resample=resample, target=target, seed=seed)
        rec.update(class_weights=result["class_weights"], imbalance_ratio=result["imbalance_ratio"],
                   train_counts_after=result["resample"]["train_counts_after"])
    return rec


def augment_stage(views_dir: Folder, out_dir: Folder, copies: int = 1, noise_std: float = 0.05,
                  max_rotation: float = 50.0, border_mode: str = "constant", seed: int = 0,
                  **options) -> dict:
    """``options`` are the other :class:`~triview.augment.AugmentConfig` fields
    (mode, hflip, vflip, shift, zoom, brightness, contrast, clahe, gray_world)."""
    from triview import augment as aug

    with stage_record("augment", out_dir) as rec:
        config = aug.AugmentConfig(copies=copies, noise_std=noise_std, max_rotation=max_rotation,
                                   border_mode=border_mode, seed=seed, **options)
        table = aug.augment(views_dir, out_dir, config)
        rec.update(items_out=len(table), copies=copies, mode=config.mode)
    return rec


def repeat_suffix(seed: int, repeat: bool) -> str:
    """Stage-name suffix of a repeat's tasks: their ``stage.json`` records and metric
    groups stay apart from the main run's (``train-branch-left-seed-3``)."""
    return f"-seed-{seed}" if repeat else ""


def train_branch_stage(views_dir: Folder, augmented_dir: Folder | None, balance_dir: Folder,
                       view: str, out_dir: Folder, repeat: bool = False, **options) -> dict:
    """Train ``view``'s branch; ``options`` are :class:`triview.train.TrainConfig` fields.

    With more than one GPU visible (or ``ddp_procs > 1``) the stage runs itself again
    under torchrun, one process per GPU, and returns rank 0's record. ``repeat`` marks
    a repeat of the main run with another seed (``repeats > 1``): its records and
    metrics are named ``train-branch-<view>-seed-<seed>``.
    """
    import os

    from triview import distributed as ddp
    from triview import train as tr

    config = tr.TrainConfig(**options)
    name = f"train-branch-{view}" + repeat_suffix(config.seed, repeat)
    nproc = ddp.processes_wanted(config.ddp_procs)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        kwargs = {"views_dir": str(views_dir), "balance_dir": str(balance_dir), "view": view,
                  "out_dir": str(out_dir), "augmented_dir": None if augmented_dir is None
                  else str(augmented_dir), "repeat": repeat, **options}
        return ddp.launch(kwargs, nproc, out_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # a torchrun worker: rank 0 keeps the record
        return tr.train_branch(views_dir, augmented_dir, balance_dir, view, out_dir, config,
                               stage=name)
    with stage_record(name, out_dir) as rec:
        rec.update(tr.train_branch(views_dir, augmented_dir, balance_dir, view, out_dir, config,
                                   stage=name))
    return rec


def branches_by_view(branch_dirs: list[Folder]) -> dict[str, Path]:
    """Map each trained branch folder to its view name (from its ``model.json``)."""
    from triview.train import MODEL_META_FILE

    out = {}
    for d in branch_dirs:
        view = json.loads((Path(d) / MODEL_META_FILE).read_text())["view"]
        out[view] = Path(d)
    return out


def _load_branch_predictions(branch_dirs: dict[str, Path]) -> dict[str, dict]:
    from triview.train import load_predictions

    return {view: load_predictions(d) for view, d in branch_dirs.items()}


def train_voter_stage(branch_dirs: list[Folder], out_dir: Folder, seed: int = 0,
                      repeat: bool = False) -> dict:
    from triview import voter as vt

    with stage_record("train-voter" + repeat_suffix(seed, repeat), out_dir) as rec:
        branch_dirs = branches_by_view(branch_dirs)
        preds = _load_branch_predictions(branch_dirs)
        probs, y, _ = vt.aligned(preds, "val")
        n_classes = next(iter(probs.values())).shape[1]
        oof = None
        if all("oof_prob" in p for p in preds.values()):  # the branches ran with voter_folds > 1
            oof_probs, oof_y, _ = vt.aligned(preds, "oof")
            oof = (oof_probs, oof_y)
        voter, table = vt.fit_voter(probs, y, n_classes, seed=seed, oof=oof)
        voter["seed"] = seed
        vt.save_voter(voter, table, out_dir)
        rec.update(method=voter["name"], val_macro_f1=voter["val_macro_f1"], task=voter["task"],
                   voter_inputs="train out-of-fold" if oof else "validation",
                   candidates=table.to_dict(orient="records"))
    return rec


def evaluate_stage(branch_dirs: list[Folder], voter_dir: Folder, out_dir: Folder,
                   views_dir: Folder | None = None, registry: str = "", model_name: str = "triview",
                   gate_min_macro_f1: float = 0.0, gate_min_delta: float = -0.01,
                   gradcam_per_kind: int = 4, repeat: bool = False) -> dict:
    """Score views and ensemble on the test split, gate the ensemble against the
    registry's champion and write the report.

    ``views_dir`` (the cropped views) is needed for the champion comparison, the
    misclassified images and the Grad-CAM gallery; without it those are left out
    (and a ``registry`` cannot be used). ``repeat`` marks a repeat of the main run
    (``repeats > 1``): the record is named ``evaluate-seed-<seed>`` (the voter's seed),
    and a repeat is never gated against the registry.
    """
    import pandas as pd

    from triview import evaluate as ev
    from triview import gate as gt
    from triview import voter as vt
    from triview.train import HISTORY_FILE, MODEL_META_FILE

    voter = vt.load_voter(voter_dir)
    seed = int(voter.get("seed", 0))
    if repeat and registry:
        raise ValueError("a repeat is not gated: evaluate it without a registry")
    with stage_record("evaluate" + repeat_suffix(seed, repeat), out_dir) as rec:
        branch_dirs = branches_by_view(branch_dirs)
        preds = _load_branch_predictions(branch_dirs)
        metas = {v: json.loads((d / MODEL_META_FILE).read_text()) for v, d in branch_dirs.items()}
        first = next(iter(metas.values()))
        classes, task = first["classes"], first.get("task", "multiclass")
        candidates = pd.read_csv(Path(voter_dir) / vt.CANDIDATES_FILE)
        histories = {v: pd.read_csv(d / HISTORY_FILE) for v, d in branch_dirs.items()
                     if (d / HISTORY_FILE).is_file()}
        challenger = ev.score_all(preds, voter, classes)
        config = gt.GateConfig(min_value=gate_min_macro_f1, min_delta=gate_min_delta)
        if views_dir is None and registry:
            raise ValueError("the gate needs the views to re-score the champion on the same test images")
        blessing = gt.run_gate(challenger["ensemble"], views_dir, registry, model_name, config, task)
        gt.write_blessing(blessing, out_dir)
        timing, gallery, reader = _evaluate_extras(branch_dirs, metas, histories, voter,
                                                           challenger, views_dir, gradcam_per_kind)
        result = ev.evaluate(preds, voter, classes, out_dir, candidates, histories=histories,
                             timing=timing, gradcam=gallery, blessing=blessing, crop_reader=reader)
        rec.update(seed=seed, ensemble=result["ensemble"], views=result["views"],
                   n_test=result["n_test"], blessed=int(blessing["blessed"]), champion_macro_f1=blessing["champion"],
                   gate={k: blessing[k] for k in ("blessed", "reasons", "comparison", "champion_version")},
                   ensemble_ms_per_sample=timing["ensemble_ms_per_sample"], device=timing["device"])
    return rec


def repeat_seeds(seed: int, repeats: int) -> list[int]:
    """The seeds of a run's repeats: ``seed+1 .. seed+repeats-1`` (the main run has ``seed``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return [seed + k for k in range(1, repeats)]


def repeats_stage(evaluation_dirs: list[Folder], out_dir: Folder) -> dict:
    """Mean and SD over seeds of every view and ensemble metric, from the evaluate
    records of the main run and its repeats (the same split, crops and augmentation;
    only the training seeds differ). Writes ``repeats.json``."""
    from triview.runinfo import STAGE_FILE
    from triview.storage import atomic_write_text
    from triview.summary import aggregate_repeats

    records = [json.loads((Path(d) / STAGE_FILE).read_text()) for d in evaluation_dirs]
    records.sort(key=lambda r: r["seed"])
    seeds = [int(r["seed"]) for r in records]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated evaluations share a seed: {seeds}")
    with stage_record("repeats", out_dir) as rec:
        rec["repeats"] = aggregate_repeats(records, seeds)
        atomic_write_text(Path(out_dir) / "repeats.json", json.dumps(rec["repeats"], indent=2))
    return rec


def _evaluate_extras(branch_dirs, metas, histories, voter, challenger, views_dir, per_kind):
    """Timing figures, the Grad-CAM gallery and a crop reader for the report."""
    from triview import crop
    from triview import evaluate as ev
    from triview import export as ex
    from triview import gradcam, timing
    from triview import manifest as mf
    from triview.train import load_branch

    models = {v: load_branch(d)[0] for v, d in branch_dirs.items()}
    first = next(iter(metas.values()))
    ensemble = ex.Ensemble([models[v] for v in voter["views"]], voter, len(first["classes"]),
                           first.get("task", "multiclass"))
    figures = timing.ensemble_timing(models, ensemble, metas, histories, int(first["image_size"]),
                                     ev.device_name())
    if views_dir is None:
        return figures, {}, None
    table = mf.read_views(views_dir)
    table = table[table["augmented"] == 0].set_index(["image_id", "view"])["path"]

    def read_crop(image_id: str, view: str):
        return crop.read_rgb(Path(views_dir) / table.loc[(image_id, view)])

    arrays = challenger["_arrays"]
    gallery = gradcam.gradcam_gallery(models, arrays["views"], arrays["y"], arrays["ids"],
                                      first["classes"], read_crop, per_kind) if per_kind > 0 else {}
    return figures, gallery, read_crop


def export_stage(branch_dirs: list[Folder], voter_dir: Folder, views_dir: Folder,
                 eval_dir: Folder, out_dir: Folder, blessing: Folder | None = None,
                 registry: str = "", model_name: str = "triview", quantize: str = "none") -> dict:
    """Export the ensemble (TorchScript + ONNX, parity-checked on the real test crops),
    and, with a ``registry``, publish it there and make it the champion, but only
    when the gate blessed it.

    ``blessing`` is the gate's ``blessing.json`` (or a folder holding it; default:
    the one in ``eval_dir``).
    """
    from triview import crop
    from triview import evaluate as ev
    from triview import export as ex
    from triview import gate as gt
    from triview import manifest as mf
    from triview import metrics as mx
    from triview import train as tr
    from triview import voter as vt
    from triview.registry import ModelRegistry

    with stage_record("export", out_dir) as rec:
        branch_dirs = branches_by_view(branch_dirs)
        branches, training, task = {}, {}, "multiclass"
        for view, d in branch_dirs.items():
            model, meta = tr.load_branch(d)
            branches[view] = model
            task = meta.get("task", task)
            training[view] = {"config": meta["config"], "best_epoch": meta["best_epoch"],
                              "parameters": meta["parameters"], "val_macro_f1": meta.get("val_macro_f1")}
        geometry = json.loads((Path(views_dir) / crop.GEOMETRY_FILE).read_text())
        metrics = json.loads((Path(eval_dir) / ev.EVAL_FILE).read_text())
        test, labels = _split_inputs(views_dir, geometry["views"], "test", task)
        calibration = _split_inputs(views_dir, geometry["views"], "val", task)[0] \
            if quantize == "static" else None
        run_id = mx.run_id_for(out_dir)
        card = ex.export_ensemble(
            branches, vt.load_voter(voter_dir), mf.read_classes(views_dir), geometry,
            {"views": metrics["views"], "ensemble": metrics["ensemble"]}, out_dir,
            training=training, example=test, test_labels=labels, calibration=calibration,
            quantize=quantize, task=task, lineage={"run_id": run_id},
            data_version=_data_version(views_dir))
        verdict = _read_blessing(blessing if blessing is not None else eval_dir)
        if verdict is not None:
            gt.write_blessing(verdict, out_dir)  # travels with the model into the registry
        blessed = bool(verdict and verdict["blessed"])
        rec.update(torchscript_max_abs_diff=card["torchscript_max_abs_diff"],
                   onnx_max_abs_diff=card["onnx_max_abs_diff"], blessed=int(blessed),
                   champion_macro_f1=(verdict or {}).get("champion"), promoted=0,
                   quantization=card["quantization"], data_version=card["data_version"])
        if registry and blessed:
            reg = ModelRegistry(registry, model_name)
            version = reg.publish(out_dir)
            pointer = reg.promote(version, metrics=metrics["ensemble"], run_id=run_id)
            rec.update(promoted=1, registry_version=version, champion_uri=pointer["uri"])
        elif registry:
            reasons = "; ".join((verdict or {}).get("reasons", ["no blessing from the gate"]))
            rec.update(refused=f"not promoted: the model is not blessed ({reasons})")
    return rec


def _read_blessing(location: Folder) -> dict | None:
    from triview import gate as gt

    path = Path(location)
    if path.is_file():
        return json.loads(path.read_text())
    return gt.read_blessing(path)


def _split_inputs(views_dir: Folder, views: list[str], split: str,
                  task: str = "multiclass") -> tuple[list[torch.Tensor], "np.ndarray"]:
    """Every real crop of one split per view (float [0, 1] NCHW, aligned on image id)
    and their labels: the export's parity check runs on all test images."""
    from triview import manifest as mf
    from triview.train import load_view

    table = mf.read_views(views_dir)
    table = table[table["augmented"] == 0]
    classes = mf.read_classes(views_dir)
    data = [load_view([(Path(views_dir), table)], v, split, classes, task) for v in views]
    if any(d.image_ids != data[0].image_ids for d in data[1:]):
        raise ValueError(f"{split} crops of the views are not aligned on image id")
    return [d.images.float().div(255.0) for d in data], data[0].labels.numpy()


def _data_version(views_dir: Folder) -> str:
    """Content version of the data: a hash of every real image's id (itself a content
    hash), split and label."""
    import hashlib

    from triview import manifest as mf

    table = mf.read_views(views_dir)
    rows = table[table["augmented"] == 0][["image_id", "split", "labels"]].drop_duplicates()
    text = "\n".join(sorted(",".join(map(str, r)) for r in rows.itertuples(index=False)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
