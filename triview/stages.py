"""The DAG's stages as plain functions over folders: the layer every caller goes through
(the KFP components, the CLI, the tests, and torchrun's worker processes).

Each takes input folders and the parameters it owns by their spec names
(:mod:`triview.params`), checks them against the spec first (a run started from the KFP
UI is checked here, at the top of the task), writes its output folder (including a
``stage.json`` with its timing and counts) and returns that record. Nothing here imports
kfp.

Each stage imports what it needs inside the function: every task of the DAG is a fresh
process, and the light stages should not pay for importing torch.

``python -m triview.stages ARGS.json`` is the entry point of the processes torchrun
starts when a branch trains with more than one process (DDP).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from triview.params import stage_config
from triview.runinfo import STAGE_FILE, push_record, stage_record

if TYPE_CHECKING:
    import numpy as np
    import torch

Folder = str | Path


def ingest_stage(data: str, out_dir: Folder, *, workers: int = 0, progress: bool | None = None,
                 plot: bool = True, allow_empty: bool = False, **params) -> dict:
    """``data``: folder, ZIP, CSV/Parquet table or s3:// prefix. ``params``: the ingest
    parameters of the spec (split_salt, val_fraction, test_fraction, min_size, label_remap, ...)."""
    from triview import ingest as ing

    p = stage_config("ingest", params)
    with stage_record("ingest", out_dir) as rec:
        fractions = (1.0 - p["val_fraction"] - p["test_fraction"], p["val_fraction"],
                     p["test_fraction"])
        result = ing.ingest(
            data, out_dir, split_salt=p["split_salt"], split_fractions=fractions, min_size=p["min_size"],
            max_pixels=p["max_pixels"], remap=ing.parse_remap([p["label_remap"]]),
            drop=tuple(d.strip() for d in p["label_drop"].split(",") if d.strip()),
            min_per_class=p["min_per_class"], near_duplicate_distance=p["near_duplicate_distance"],
            allowed_roots=p["allowed_roots"], workers=workers, progress=progress, plot=plot, allow_empty=allow_empty)
        rec.update(counts=result.counts, classes=result.classes, items_in=result.n_input,
                   items_out=len(result.manifest), dataset_version=result.dataset_version,
                   quarantine_reasons=result.statistics.get("quarantine_reasons", {}),
                   split_salt=result.statistics["split"].get("salt"),
                   split_forced=len(result.statistics["split"].get("forced", [])))
    return rec


def calibrate_and_crop_stage(dataset_dir: Folder, out_dir: Folder, *, workers: int = 0,
                             shard: int = 0, shards: int = 1,
                             **params) -> dict:
    """Calibrate (from chessboard photos, or read an intrinsics file, or use the identity
    lens), then undistort and crop every image into three views.

    A lens calibrated here is saved as ``calibration.json`` in the output so later runs
    (and predict) can reuse it through ``calibration_file``.
    """
    from triview import calibration as cal
    from triview import crop

    p = stage_config("calibrate-and-crop", params)
    with stage_record("calibrate-and-crop", out_dir) as rec:
        alpha = None if p["lens_alpha"] < 0 else p["lens_alpha"]
        if p["calibration_images"]:
            result = cal.calibrate_glob(p["calibration_images"],
                                        pattern=cal.parse_pattern(p["pattern"]), square=p["square"])
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            result.save(Path(out_dir) / "calibration.json")
            lens = crop.LensModel(K=result.K, dist=result.dist, image_size=result.image_size,
                                  alpha=alpha, crop_roi=p["crop_roi"])
            rec.update(calibration={"rms": result.rms, "used": len(result.per_view_error),
                                    "rejected": result.rejected})
        elif p["calibration_file"]:
            lens = crop.LensModel.from_file(p["calibration_file"], alpha=alpha,
                                            crop_roi=p["crop_roi"])
        else:
            lens = crop.LensModel()
        geometry = crop.CropGeometry(layout=p["layout"], overlap=p["overlap"],
                                     image_size=p["image_size"], window=p["window"],
                                     resize=p["resize"])
        done = crop.calibrate_and_crop(dataset_dir, out_dir, geometry, lens, workers=workers,
                                       cache_root=p["cache_root"], part=(shard, shards))
        if shards > 1:
            rec.update(shard=shard, shards=shards)
        rec.update(views=list(geometry.views), items_in=done.photos, items_out=done.crops,
                   lens="identity" if lens.is_identity else "calibrated")
        if p["cache_root"]:
            rec.update(cache={"hits": done.cache_hits, "computed": done.photos - done.cache_hits})
    return rec


def collect_views_stage(part_dirs: list[Folder], out_dir: Folder) -> dict:
    """Merge the shards of a fanned-out calibrate-and-crop (``dsl.ParallelFor`` on the
    cluster) into the one views dataset the later stages read (:func:`triview.crop.collect_parts`)."""
    from triview import crop

    with stage_record("collect-views", out_dir) as rec:
        views = crop.collect_parts(part_dirs, out_dir)
        records = [json.loads((Path(d) / STAGE_FILE).read_text()) for d in part_dirs
                   if (Path(d) / STAGE_FILE).is_file()]
        photos = int(views["image_id"].nunique())
        rec.update(views=list(crop.read_geometry(out_dir)[0].views), shards=len(part_dirs),
                   items_in=photos, items_out=len(views),
                   lens=records[0].get("lens") if records else None)
        caches = [r["cache"] for r in records if "cache" in r]
        if caches:
            rec.update(cache={k: sum(c[k] for c in caches) for k in ("hits", "computed")})
    return rec


def balance_stage(views_dir: Folder, out_dir: Folder, **params) -> dict:
    from triview import balance as bal

    p = stage_config("balance", params)
    with stage_record("balance", out_dir) as rec:
        result = bal.balance(views_dir, out_dir, **p)
        rec.update(class_weights=result["class_weights"], imbalance_ratio=result["imbalance_ratio"],
                   train_counts_after=result["resample"]["train_counts_after"])
    return rec


def augment_stage(views_dir: Folder, out_dir: Folder, **params) -> dict:
    from triview import augment as aug

    config = aug.AugmentConfig(**stage_config("augment", params))
    with stage_record("augment", out_dir) as rec:
        written = aug.augment(views_dir, out_dir, config)
        rec.update(items_out=written, copies=config.copies, mode=config.mode)
    return rec


def repeat_suffix(seed: int, repeat: bool) -> str:
    """Stage-name suffix of a repeat's tasks: their ``stage.json`` records and metric
    groups stay apart from the main run's (``train-branch-left-seed-3``)."""
    return f"-seed-{seed}" if repeat else ""


def checkpoint_location(checkpoint_root: str, run_id: str, seed: int, repeat: bool,
                        view: str) -> str:
    """Where a branch's checkpoints live: ``<root>/<run_id>/<view>`` (a repeat:
    ``<root>/<run_id>/seed-<seed>/<view>``); "" (inside the branch's output) without a root."""
    from triview import storage

    if not checkpoint_root:
        return ""
    return storage.join(checkpoint_root, run_id or "run", f"seed-{seed}" if repeat else "", view)


def train_branch_stage(views_dir: Folder, augmented_dir: Folder | None, balance_dir: Folder,
                       view: str | int, out_dir: Folder, *, repeat: bool = False,
                       run_id: str = "", feature_cache: Folder | None = None, on_epoch=None,
                       artifact_uris: dict[str, str] | None = None, **params) -> dict:
    """Train ``view``'s branch (a view name, or its index in the crop geometry's views);
    ``params`` are the spec's train-branch parameters.

    With more than one GPU visible (or ``ddp_procs > 1``) the stage runs itself again
    under torchrun, one process per GPU, and returns rank 0's record. ``repeat`` marks
    a repeat of the main run with another seed (``repeats > 1``): its records and
    metrics are named ``train-branch-<view>-seed-<seed>``. ``run_id`` (KFP's job id on a
    cluster) names the checkpoint folder below ``checkpoint_root``, so a retry finds it.
    ``feature_cache`` (a folder) keeps the frozen backbone's features for the next
    training that meets the same network and crops (:mod:`triview.train.features`);
    ``on_epoch`` is called with each epoch's history row (in this process only: not
    under torchrun).

    With ``nodes > 1``, in a pod of a Kubeflow cluster whose artifacts are in MinIO
    (``artifact_uris``: the KFP URIs of ``views``, ``augmented``, ``balance`` and ``out``), the
    branch trains in a Kubeflow Trainer TrainJob (:mod:`triview.trainjob`) and its output is
    downloaded into ``out_dir``; anywhere else it trains here, with a warning.
    """
    import os

    from triview import crop
    from triview import distributed as ddp
    from triview.train import TrainConfig, train_branch

    config = TrainConfig(**stage_config("train-branch", params))
    if feature_cache is None and config.cache_root:
        feature_cache = feature_cache_location(config.cache_root)
    if isinstance(view, int):
        view = crop.read_geometry(views_dir)[0].views[view]
    name = f"train-branch-{view}" + repeat_suffix(config.seed, repeat)
    if config.nodes > 1 and "WORLD_SIZE" not in os.environ:
        shared = artifact_uris and all(u.startswith(("minio://", "s3://"))
                                       for u in artifact_uris.values() if u)
        if shared and os.environ.get("KUBERNETES_SERVICE_HOST"):
            return _train_branch_on_nodes(artifact_uris, view, out_dir, config.nodes,
                                          run_id, repeat, config.seed, params)
        import warnings

        warnings.warn(f"nodes={config.nodes}: a TrainJob needs a Kubeflow cluster and the task's "
                      f"artifacts in MinIO/S3 (minio:// or s3://); the branch trains on this "
                      f"machine", RuntimeWarning,
                      stacklevel=2)
    nproc = ddp.processes_wanted(config.ddp_procs)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        ddp.run_under_torchrun(__name__, {
            "views_dir": str(views_dir), "balance_dir": str(balance_dir), "view": view,
            "out_dir": str(out_dir), "augmented_dir": None if augmented_dir is None
            else str(augmented_dir), "repeat": repeat, "run_id": run_id,
            "feature_cache": None if feature_cache is None else str(feature_cache), **params}, nproc)
        return json.loads((Path(out_dir) / STAGE_FILE).read_text())
    ckpt = checkpoint_location(config.checkpoint_root, run_id, config.seed, repeat, view)
    if int(os.environ.get("RANK", "0")) != 0:  # a torchrun worker: rank 0 keeps the record
        return train_branch(views_dir, augmented_dir, balance_dir, view, out_dir, config,
                            stage=name, checkpoint_dir=ckpt, feature_cache=feature_cache)
    with stage_record(name, out_dir) as rec:
        store = _feature_counts(feature_cache)
        rec.update(train_branch(views_dir, augmented_dir, balance_dir, view, out_dir, config,
                                stage=name, checkpoint_dir=ckpt, feature_cache=feature_cache,
                                on_epoch=on_epoch))
        if feature_cache is not None:
            after = _feature_counts(feature_cache)
            rec.update(feature_cache={"reused": after[0] - store[0], "computed": after[1] - store[1]})
    return rec


def _train_branch_on_nodes(artifact_uris: dict[str, str], view: str, out_dir: Folder, nodes: int,
                           run_id: str, repeat: bool, seed: int, params: dict) -> dict:
    """Train the branch in a TrainJob of ``nodes`` nodes, wait, and fetch rank 0's output."""
    from triview import storage
    from triview import trainjob as tj

    for name in ("checkpoint_root", "cache_root"):  # written by the nodes
        if params.get(name) and not storage.is_s3(params[name]):
            raise tj.TrainJobError(f"nodes > 1: {name}={params[name]!r} is a path in this pod, "
                                   f"which the TrainJob's nodes cannot see; use an s3:// prefix")
    inputs = {k: tj.artifact_location(artifact_uris[k]) if artifact_uris.get(k) else None
              for k in ("views", "augmented", "balance")}
    output = tj.artifact_location(artifact_uris["out"])
    opts = tj.TrainJobOptions.from_env()
    spec = tj.node_spec(inputs, output, view, params, run_id, repeat)
    tj.run(tj.train_job(tj.job_name(run_id, view, seed, repeat), spec, nodes, opts), opts=opts)
    storage.default_store().download_tree(output, out_dir)
    rec = json.loads((Path(out_dir) / STAGE_FILE).read_text())
    push_record(rec["stage"], rec, out_dir)  # the nodes cannot reach the Pushgateway; the task can
    return rec


def train_branch_node(spec: dict) -> None:
    """One process of a branch's TrainJob (``torchrun --module triview.stages --trainjob
    SPEC`` on every node): fetch the task's inputs, train this rank, and rank 0 uploads the
    branch's output where the task reads it (:mod:`triview.trainjob`)."""
    import os
    import tempfile

    from triview import storage

    scratch = Path(tempfile.mkdtemp(prefix="triview-node-"))
    local = {k: None if v is None else storage.local_tree(v, scratch / k)
             for k, v in spec["inputs"].items()}
    out = scratch / "out"
    train_branch_stage(local["views"], local["augmented"], local["balance"], spec["view"], out,
                       repeat=spec["repeat"], run_id=spec["run_id"], **spec["params"])
    if int(os.environ.get("RANK", "0")) == 0:
        storage.copy_tree(out, spec["output"])


def feature_cache_location(cache_root: str) -> str:
    """Where the pipeline's ``cache_root`` keeps frozen features (:mod:`triview.train.features`)."""
    from triview import storage

    return storage.join(cache_root, "features")


def _feature_counts(feature_cache: Folder | None) -> tuple[int, int]:
    """(reused, computed) crops of the process's store of ``feature_cache`` so far."""
    if feature_cache is None:
        return 0, 0
    from triview.train.features import FeatureStore

    store = FeatureStore.open(feature_cache)
    return store.reused, store.computed


def _branch_predictions(branch_dirs: dict[str, Path]) -> dict[str, dict]:
    from triview.artifacts import load_predictions

    return {view: load_predictions(d) for view, d in branch_dirs.items()}


def train_voter_stage(branch_dirs: list[Folder], out_dir: Folder, *, repeat: bool = False,
                      **params) -> dict:
    """Fit, choose and calibrate the voter on the branches' held-out probabilities
    (:func:`triview.voter.held_out_set`: out-of-fold ones and validation); the test split
    is never read."""
    from triview import voter as vt
    from triview.artifacts import branches_by_view

    p = stage_config("train-voter", params)
    with stage_record("train-voter" + repeat_suffix(p["seed"], repeat), out_dir) as rec:
        preds = _branch_predictions(branches_by_view(branch_dirs))
        probs, y, ids, scored_on = vt.held_out_set(preds)
        n_classes = next(iter(probs.values())).shape[1]
        voter, table = vt.fit_voter(probs, y, n_classes, seed=p["seed"], scored_on=scored_on)
        voter["seed"] = p["seed"]
        vt.save_voter(voter, table, out_dir)
        rec.update(method=voter["name"], val_macro_f1=voter["val_macro_f1"], task=voter["task"],
                   voter_inputs=scored_on, n_scored=int(len(y)), temperature=voter["temperature"],
                   candidates=table.to_dict(orient="records"))
    return rec


def evaluate_stage(branch_dirs: list[Folder], voter_dir: Folder, out_dir: Folder,
                   views_dir: Folder | None = None, *, gradcam_per_kind: int = 4,
                   repeat: bool = False, dataset_dir: Folder | None = None, **params) -> dict:
    """Score views and ensemble on the test split, gate the ensemble against the
    registry's champion and write the report.

    ``views_dir`` (the cropped views) is needed for the champion comparison, the
    misclassified images and the Grad-CAM gallery; without it those are left out
    (and a ``registry`` cannot be used). ``repeat`` marks a repeat of the main run
    (``repeats > 1``): the record is named ``evaluate-seed-<seed>`` (the voter's seed),
    a repeat is never gated against the registry, and its report has no Grad-CAM gallery
    (the same networks trained from another seed: the main seed's report shows where they
    look; repeats are there for mean and SD).

    ``dataset_dir`` (ingest's output) adds the data profile (written next to the report;
    export puts it into the model folder) and the drift of this run's new images against
    the champion's profile (:mod:`triview.drift`); a repeat measures none.
    """
    import pandas as pd

    from triview import artifacts
    from triview import evaluate as ev
    from triview import gate as gt
    from triview import voter as vt

    p = stage_config("evaluate", params)
    voter = vt.load_voter(voter_dir)
    seed = int(voter.get("seed", 0))
    if repeat and p["registry"]:
        raise ValueError("a repeat is not gated: evaluate it without a registry")
    if views_dir is None and p["registry"]:
        raise ValueError("the gate needs the views to re-score the champion on the same test images")
    with stage_record("evaluate" + repeat_suffix(seed, repeat), out_dir) as rec:
        branch_dirs = artifacts.branches_by_view(branch_dirs)
        preds = _branch_predictions(branch_dirs)
        metas = {v: artifacts.read_branch_meta(d) for v, d in branch_dirs.items()}
        first = next(iter(metas.values()))
        classes, task = first["classes"], first.get("task", "multiclass")
        candidates = pd.read_csv(Path(voter_dir) / artifacts.CANDIDATES_FILE)
        histories = {v: pd.read_csv(d / artifacts.HISTORY_FILE) for v, d in branch_dirs.items()
                     if (d / artifacts.HISTORY_FILE).is_file()}
        head_histories = {v: pd.read_csv(d / artifacts.HEAD_HISTORY_FILE)
                          for v, d in branch_dirs.items()
                          if (d / artifacts.HEAD_HISTORY_FILE).is_file()}
        challenger = ev.score_all(preds, voter, classes)
        config = gt.GateConfig(min_value=p["min_value"], min_delta=p["min_delta"],
                               min_clean_images=p["min_clean_images"], fallback=p["fallback"],
                               max_drift=p["max_drift"], confidence=p["confidence"])
        arrays = challenger["_arrays"]
        test = {"ids": arrays["ids"], "y": arrays["y"], "ensemble": arrays["ensemble"],
                "thresholds": (challenger["thresholds"] or {}).get("ensemble")}
        drift = None
        if dataset_dir is not None and not repeat and p["drift_sample"] > 0:
            from triview import drift as dr

            drift = dr.measure(dataset_dir, _champion_profile(p["registry"], p["model_name"]),
                               p["drift_sample"], p["weights_root"], out_dir)
            rec.update(drift=drift, **dr.flat(drift))
        blessing = gt.run_gate(challenger["ensemble"], views_dir, p["registry"], p["model_name"],
                               config, task, test=test, drift=drift)
        artifacts.write_blessing(out_dir, blessing)
        timing, gallery, reader = _evaluate_extras(branch_dirs, metas, voter, challenger,
                                                   histories, views_dir,
                                                   0 if repeat else gradcam_per_kind)
        result = ev.evaluate(preds, voter, classes, out_dir, candidates, histories=histories,
                             head_histories=head_histories,
                             timing=timing, gradcam=gallery, blessing=blessing, crop_reader=reader,
                             drift=drift)
        rec.update(seed=seed, ensemble=result["ensemble"], views=result["views"],
                   versus_best_view=result["versus_best_view"],
                   n_test=result["n_test"], accuracy_interval=result["accuracy_interval"],
                   blessed=int(blessing["blessed"]),
                   champion_macro_f1=blessing["champion"],
                   gate={k: blessing.get(k) for k in ("blessed", "reasons", "comparison",
                                                      "champion_version", "clean", "interval",
                                                      "p_value")},
                   ensemble_ms_per_sample=timing["ensemble_ms_per_sample"], device=timing["device"])
        rec.update(gt.metric_values(blessing))
    return rec


def _champion_profile(registry: str, model_name: str):
    """The registry champion's data profile (:func:`triview.drift.read_profile`), or None."""
    from triview import drift as dr
    from triview.registry import ModelRegistry

    if not registry:
        return None
    reg = ModelRegistry(registry, model_name)
    pointer = reg.champion()
    return None if pointer is None else dr.read_profile(reg.fetch(int(pointer["version"])))


def _evaluate_extras(branch_dirs, metas, voter, challenger, histories, views_dir, per_kind):
    """Timing figures, the Grad-CAM gallery and a crop reader for the report."""
    from triview import crop
    from triview import evaluate as ev
    from triview import export as ex
    from triview import gradcam, timing
    from triview import manifest as mf
    from triview.train import load_branch, load_served_branch

    models = {v: load_branch(d)[0] for v, d in branch_dirs.items()}
    served = {v: load_served_branch(d)[0] for v, d in branch_dirs.items()}
    first = next(iter(metas.values()))
    ensemble = ex.Ensemble([served[v] for v in voter["views"]], voter, len(first["classes"]),
                           first.get("task", "multiclass"))
    figures = timing.ensemble_timing(models, ensemble, metas, histories, int(first["image_size"]),
                                     ev.device_name())
    if views_dir is None:
        return figures, {}, None
    table = mf.read_views(views_dir)
    table = table[table["augmented"] == 0].set_index(["image_id", "view"])["path"]

    def read_crop(image_id: str, view: str):
        return crop.read_crop(views_dir, table.loc[(image_id, view)])

    arrays = challenger["_arrays"]
    gallery = gradcam.gradcam_gallery(models, arrays["views"], arrays["y"], arrays["ids"],
                                      first["classes"], read_crop, per_kind) if per_kind > 0 else {}
    return figures, gallery, read_crop


def repeat_seeds(seed: int, repeats: int) -> list[int]:
    """The seeds of a run's repeats: ``seed+1 .. seed+repeats-1`` (the main run has ``seed``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return [seed + k for k in range(1, repeats)]


def repeats_stage(evaluation_dirs: list[Folder], out_dir: Folder) -> dict:
    """Mean and SD over seeds of every view and ensemble metric, from the evaluate
    records of the main run and its repeats (the same split, crops and augmentation;
    only the training seeds differ). Writes ``repeats.json``."""
    from triview.storage import atomic_write_text
    from triview.summary import aggregate_repeats

    records = [json.loads((Path(d) / STAGE_FILE).read_text()) for d in evaluation_dirs]
    records.sort(key=lambda r: r["seed"])
    seeds = [int(r["seed"]) for r in records]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated evaluations share a seed: {seeds}")
    with stage_record("repeats", out_dir) as rec:
        rec["repeats"] = aggregate_repeats(records, seeds)
        if all("versus_best_view" in r for r in records):  # per seed, in test images
            rec["repeats"]["versus_best_view"] = [{"seed": r["seed"], **r["versus_best_view"]}
                                                  for r in records]
        atomic_write_text(Path(out_dir) / "repeats.json", json.dumps(rec["repeats"], indent=2))
    return rec


def export_stage(branch_dirs: list[Folder], voter_dir: Folder, views_dir: Folder,
                 eval_dir: Folder, out_dir: Folder, blessing: Folder | None = None,
                 dataset_dir: Folder | None = None, **params) -> dict:
    """Export the ensemble (TorchScript + ONNX, parity-checked on the real test crops),
    and, with a ``registry``, publish it there and make it the champion, but only
    when the gate blessed it and the real predictor served it correctly.

    ``blessing`` is the gate's ``blessing.json`` (or a folder holding it; default:
    the one in ``eval_dir``). With ``infra_validate`` (auto: when a serving environment
    exists; on: required), before promoting, the export is served with ``triview serve``
    and its answers on ``infra_images`` test images (ingest's photos from ``dataset_dir``
    when given, else the test crops) are compared with ONNX Runtime; a failure refuses
    promotion and its reason goes into the blessing.
    """
    from triview import artifacts
    from triview import crop
    from triview import export as ex
    from triview import manifest as mf
    from triview import metrics as mx
    from triview import voter as vt
    from triview.registry import ModelRegistry
    from triview.train import load_served_branch
    from triview.train.branch import branch_normalization
    from triview.train.data import load_split

    p = stage_config("export", params)
    with stage_record("export", out_dir) as rec:
        branch_dirs = artifacts.branches_by_view(branch_dirs)
        branches, training, task = {}, {}, "multiclass"
        for view, d in branch_dirs.items():
            model, meta = load_served_branch(d)
            branches[view] = model
            task = meta.get("task", task)
            training[view] = {"config": meta["config"], "best_epoch": meta["best_epoch"],
                              "parameters": meta["parameters"], "val_macro_f1": meta.get("val_macro_f1"),
                              "scored_on": meta.get("scored_on", "validation"),
                              "normalization": branch_normalization(meta),
                              "tta": list(model.passes), "temperature": model.temperature,
                              "weights": _weights_record(meta.get("pretrained"))}
        geometry = json.loads((Path(views_dir) / crop.GEOMETRY_FILE).read_text())
        metrics = artifacts.read_eval(eval_dir)
        test = load_split(views_dir, geometry["views"], "test", task)
        calibration = (load_split(views_dir, geometry["views"], "val", task).inputs
                       if p["quantize"] == "static" else None)
        run_id = mx.run_id_for(out_dir)
        views = mf.read_views(views_dir)
        voter = vt.load_voter(voter_dir)
        # what evaluate scored for these crops: the served model must answer the same
        probs, _, ids = vt.aligned(_branch_predictions(branch_dirs), "test")
        row_of = {image_id: k for k, image_id in enumerate(ids)}
        import numpy as np

        scored = vt.apply_voter(voter, probs)
        evaluated = np.full((len(test.image_ids), scored.shape[1]), np.nan)
        for k, image_id in enumerate(test.image_ids):  # branches scored on another split: NaN
            if image_id in row_of:
                evaluated[k] = scored[row_of[image_id]]
        card = ex.export_ensemble(
            branches, voter, mf.read_classes(views_dir), geometry,
            {"views": metrics["views"], "ensemble": metrics["ensemble"]}, out_dir,
            training=training, example=test.inputs, test_labels=test.labels,
            calibration=calibration, quantize=p["quantize"], task=task,
            lineage={"run_id": run_id}, data_version=_data_version(views_dir),
            data={"seen_images": artifacts.write_seen_images(
                      out_dir, mf.seen_image_ids(views), mf.seen_source_ids(views)),
                  "test_images": int(len(test.labels))},
            evaluated=evaluated)
        from triview import drift as dr

        for name in (dr.PROFILE_FILE, dr.EMBEDDINGS_FILE):  # the data profile travels with the model
            if (Path(eval_dir) / name).is_file():
                shutil.copyfile(Path(eval_dir) / name, Path(out_dir) / name)
        verdict = artifacts.read_blessing(blessing if blessing is not None else eval_dir)
        if verdict is not None:
            artifacts.write_blessing(out_dir, verdict)  # travels with the model into the registry
        blessed = bool(verdict and verdict["blessed"])
        if p["registry"] and blessed and p["infra_validate"] != "off":
            required = {"auto": None, "on": True}[p["infra_validate"]]
            verdict = _infra_validation(out_dir, views_dir, verdict, rec, required,
                                        p["infra_images"], dataset_dir, p["model_name"])
            blessed = bool(verdict["blessed"])
        rec.update(torchscript_max_abs_diff=card["torchscript_max_abs_diff"],
                   onnx_max_abs_diff=card["onnx_max_abs_diff"], blessed=int(blessed),
                   champion_macro_f1=(verdict or {}).get("champion"), promoted=0,
                   registry=p["registry"],
                   quantization=card["quantization"], data_version=card["data_version"])
        if p["registry"] and blessed:
            reg = ModelRegistry(p["registry"], p["model_name"])
            version = reg.publish(out_dir)
            pointer = reg.promote(version, metrics=metrics["ensemble"], run_id=run_id)
            rec.update(promoted=1, registry_version=version, champion_uri=pointer["uri"])
        elif p["registry"]:
            reasons = "; ".join((verdict or {}).get("reasons", ["no blessing from the gate"]))
            rec.update(refused=f"not promoted: the model is not blessed ({reasons})")
    return rec


def deploy_stage(export_dir: Folder, out_dir: Folder, *, serve_image: str | None = None,
                 api_client=None, **params) -> dict:
    """The optional deploy step after export: server-side apply the InferenceService of
    the version export promoted (KServe, the ``triview-onnx`` ServingRuntime in
    ``serve_image``) and wait until it is Ready; when export promoted nothing, record why
    and apply nothing."""
    from triview import deploy

    p = stage_config("deploy", params)
    export_record = json.loads((Path(export_dir) / STAGE_FILE).read_text())
    with stage_record("deploy", out_dir) as rec:
        rec.update(deploy.deploy_promoted(
            export_record, p["registry"], p["model_name"], p["namespace"],
            serve_image or deploy.SERVE_IMAGE, p["wait_seconds"], api_client=api_client))
    return rec


def _weights_record(pretrained: dict | None) -> dict | None:
    """Where a branch's starting weights came from: source, location, file, SHA-256, URL
    and licence (None: random initialisation)."""
    if not pretrained:
        return None
    keys = ("source", "location", "file", "sha256", "source_url", "licence", "published",
            "verification", "loaded", "skipped")
    return {k: pretrained.get(k) for k in keys}


def _infra_validation(out_dir: Folder, views_dir: Folder, verdict: dict, rec: dict,
                      required: bool | None, n_images: int, dataset_dir: Folder | None,
                      model_name: str) -> dict:
    """Serve the export in the real predictor before promotion (TFX InfraValidator); the
    verdict goes into ``infra_validation.json``, the stage record and the blessing, and a
    failure un-blesses the model."""
    from triview import artifacts
    from triview.serving import infra
    from triview.storage import atomic_write_text

    if required is None and not infra.serving_available():
        rec.update(infra_validation={"skipped": "no serving environment (make serve-env)"})
        return verdict
    check = infra.infra_validate(out_dir, infra.sample_images(views_dir, n_images, dataset_dir),
                                 name=model_name)
    atomic_write_text(Path(out_dir) / "infra_validation.json", json.dumps(check, indent=2))
    rec.update(infra_validation=check)
    verdict = {**verdict, "infra_validation": check}
    if not check["passed"]:
        verdict.update(blessed=False, reasons=[*verdict.get("reasons", []),
                                               f"infra validation failed: {check['reason']}"])
    artifacts.write_blessing(out_dir, verdict)
    return verdict




def _data_version(views_dir: Folder) -> str:
    """Content version of the data: a hash of every real image's id (itself a content
    hash), split and label."""
    import hashlib

    from triview import manifest as mf

    table = mf.read_views(views_dir)
    rows = table[table["augmented"] == 0][["image_id", "split", "labels"]].drop_duplicates()
    text = "\n".join(sorted(",".join(map(str, r)) for r in rows.itertuples(index=False)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    """Entry point of every torchrun process: ``python -m triview.stages ARGS.json``
    (the keyword arguments of :func:`train_branch_stage`), or ``--trainjob SPEC`` on a node
    of a TrainJob (:func:`train_branch_node`)."""
    from triview import distributed as ddp

    argv = argv or sys.argv[1:]
    try:
        if argv[0] == "--trainjob":  # a node of a TrainJob (triview.trainjob)
            train_branch_node(json.loads(argv[1]))
        else:
            train_branch_stage(**json.loads(Path(argv[0]).read_text()))
    finally:
        ddp.destroy()


if __name__ == "__main__":
    main()
