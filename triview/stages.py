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
    import torch

Folder = str | Path


def ingest_stage(data: str, out_dir: Folder, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, min_size: int = 8) -> dict:
    from triview import ingest as ing

    with stage_record("ingest", out_dir) as rec:
        fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        result = ing.ingest(data, out_dir, seed=seed, split_fractions=fractions, min_size=min_size)
        rec.update(counts=result.counts, classes=result.classes, items_in=result.n_input,
                   items_out=len(result.manifest))
    return rec


def calibrate_and_crop_stage(dataset_dir: Folder, out_dir: Folder, layout: str = "horizontal",
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


def train_branch_stage(views_dir: Folder, augmented_dir: Folder | None, balance_dir: Folder,
                       view: str, out_dir: Folder, backbone: str = "shufflenet_v2_x1_0",
                       epochs: int = 8, batch_size: int = 128, lr: float = 3e-3, lrf: float = 0.05,
                       hidden: int = 0, seed: int = 0, label_smoothing: float = 0.1,
                       weight_decay: float = 1e-4, checkpoint_dir: str = "") -> dict:
    from triview import train as tr

    with stage_record(f"train-branch-{view}", out_dir) as rec:
        config = tr.TrainConfig(backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr,
                                lrf=lrf, hidden=hidden, seed=seed,
                                label_smoothing=label_smoothing, weight_decay=weight_decay,
                                checkpoint_dir=checkpoint_dir)
        rec.update(tr.train_branch(views_dir, augmented_dir, balance_dir, view, out_dir, config))
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


def train_voter_stage(branch_dirs: list[Folder], out_dir: Folder, seed: int = 0) -> dict:
    from triview import voter as vt

    with stage_record("train-voter", out_dir) as rec:
        branch_dirs = branches_by_view(branch_dirs)
        preds = _load_branch_predictions(branch_dirs)
        probs, y, _ = vt.aligned(preds, "val")
        n_classes = next(iter(probs.values())).shape[1]
        voter, table = vt.fit_voter(probs, y, n_classes, seed=seed)
        vt.save_voter(voter, table, out_dir)
        rec.update(method=voter["name"], val_macro_f1=voter["val_macro_f1"],
                   candidates=table.to_dict(orient="records"))
    return rec


def evaluate_stage(branch_dirs: list[Folder], voter_dir: Folder, out_dir: Folder) -> dict:
    import pandas as pd

    from triview import evaluate as ev
    from triview import voter as vt
    from triview.train import MODEL_META_FILE

    with stage_record("evaluate", out_dir) as rec:
        branch_dirs = branches_by_view(branch_dirs)
        preds = _load_branch_predictions(branch_dirs)
        classes = json.loads((Path(next(iter(branch_dirs.values()))) / MODEL_META_FILE)
                             .read_text())["classes"]
        candidates = pd.read_csv(Path(voter_dir) / vt.CANDIDATES_FILE)
        result = ev.evaluate(preds, vt.load_voter(voter_dir), classes, out_dir, candidates)
        rec.update(ensemble=result["ensemble"], views=result["views"], n_test=result["n_test"])
    return rec


def export_stage(branch_dirs: list[Folder], voter_dir: Folder, views_dir: Folder,
                 eval_dir: Folder, out_dir: Folder) -> dict:
    from triview import crop
    from triview import evaluate as ev
    from triview import export as ex
    from triview import manifest as mf
    from triview import train as tr
    from triview import voter as vt

    with stage_record("export", out_dir) as rec:
        branch_dirs = branches_by_view(branch_dirs)
        branches, training = {}, {}
        for view, d in branch_dirs.items():
            model, meta = tr.load_branch(d)
            branches[view] = model
            training[view] = {"config": meta["config"], "best_epoch": meta["best_epoch"],
                              "parameters": meta["parameters"]}
        geometry = json.loads((Path(views_dir) / crop.GEOMETRY_FILE).read_text())
        metrics = json.loads((Path(eval_dir) / ev.EVAL_FILE).read_text())
        example = _test_example(views_dir, geometry["views"])
        card = ex.export_ensemble(branches, vt.load_voter(voter_dir), mf.read_classes(views_dir),
                                  geometry, {"views": metrics["views"], "ensemble": metrics["ensemble"]},
                                  out_dir, training=training, example=example)
        rec.update(torchscript_max_abs_diff=card["torchscript_max_abs_diff"])
    return rec


def _test_example(views_dir: Folder, views: list[str], n: int = 4) -> list[torch.Tensor]:
    """A few real test crops per view, used to trace and parity-check the export."""
    import numpy as np
    import torch

    from triview import crop
    from triview import manifest as mf

    table = mf.read_views(views_dir)
    test = table[(table["split"] == "test") & (table["augmented"] == 0)]
    ids = sorted(test["image_id"].unique())[:n]
    out = []
    for view in views:
        rows = test[test["view"] == view].set_index("image_id").loc[ids]
        arrays = np.stack([crop.read_rgb(Path(views_dir) / p) for p in rows["path"]])
        out.append(torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(255.0))
    return out
