from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    branch_1: Input[Model],
    branch_2: Input[Model],
    branch_3: Input[Model],
    voter: Input[Model],
    views: Input[Dataset],
    dataset: Input[Dataset],
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    blessing: Output[Artifact],
    repeat: bool = False,
    # params: evaluate (generated from triview/params.py by `python -m components.codegen`)
    weights_root: str = "", registry: str = "", model_name: str = "triview",
    gate_min_macro_f1: float = 0.0, gate_min_delta: float = -0.01,
    gate_confidence: float = 0.95, gate_min_clean_images: int = 20,
    gate_fallback: str = "keep_champion", gate_max_drift: float = 0.0, drift_sample: int = 256,
    # end params
):
    """Score every view and the ensemble on the test split and gate the ensemble
    against the registry's champion (champion/challenger, TFX-blessing style).

    Args:
        branch_1: First view's trained branch (with its test probabilities).
        branch_2: Second view's trained branch.
        branch_3: Third view's trained branch.
        voter: The chosen voter.
        views: Cropped views dataset: the test crops the champion is re-scored on, and the
            images of the report's misclassified and Grad-CAM galleries.
        dataset: Ingest's dataset: the images the data profile and the drift against the
            champion's data are measured on (not for a repeat).
        evaluation: Output folder: ``eval.json``, ``blessing.json``, ``report.md``,
            ``report.html`` and the data profile (``drift_profile.json``,
            ``drift_embeddings.npy``) export puts into the model.
        metrics: Test accuracy, macro-F1, weighted-F1, ROC-AUC and expected calibration
            error (``_ece``, after temperature scaling; ``_ece_before``) per view and for the
            ensemble; ``ensemble_minus_best_view_images`` (test images the ensemble gets right
            minus its best view's) and ``ensemble_beats_best_view`` (0/1); ``blessed`` (0/1)
            and ``champion_macro_f1``.
        confusion: The ensemble's test confusion matrix and micro-averaged ROC curve.
        report: Self-contained HTML report (metrics, the ensemble against its best view,
            calibration with a reliability diagram, confusion matrices, training curves,
            voter candidates, misclassified images, Grad-CAM per view, timing).
        blessing: The gate's verdict (JSON): blessed or not, with its reasons; export
            promotes only a blessed model.
        repeat: This task scores a repeat of the run with another seed (``repeats > 1``):
            its record is ``evaluate-seed-<seed>`` and it is never gated (no registry).
        weights_root: Weights mirror for weights=imagenet: a folder or s3://bucket/prefix that
            `triview weights stage` filled (on a cluster, e.g. s3://triview-artifacts/weights on
            MinIO, so that nothing reaches the internet).
        registry: Model registry: a folder or s3://bucket/prefix. Empty: no registry, no
            champion, nothing promoted.
        model_name: Model name in the registry (models/<model_name>/...).
        gate_min_macro_f1: Absolute bar: the ensemble's test macro-F1 must reach it to be
            blessed. (in [0, 1])
        gate_min_delta: Least change of macro-F1 against the champion on the same clean test
            images, shown at gate_confidence by a paired bootstrap: negative tolerates that much
            regression (non-inferiority), positive demands that much gain (superiority). (in
            [-1, 1])
        gate_confidence: Confidence of the gate's paired test: the challenger is blessed when
            this two-sided interval of its macro-F1 change against the champion lies above
            gate_min_delta (one-sided p <= (1 - confidence) / 2). (in [0.5, 1))
        gate_min_clean_images: Fewest clean test images (neither the champion nor the challenger
            trained or validated on them) the champion comparison is made on; with fewer,
            gate_fallback decides. (>= 1)
        gate_fallback: When too few clean test images remain: keep_champion (the challenger is
            not blessed) or absolute_bar (blessed on the absolute bar alone). Never a comparison
            on images a model has seen. (one of keep_champion, absolute_bar)
        gate_max_drift: Embedding drift (two-sample ROC-AUC of new images against the
            champion's, 0.5 = none, 1 = fully separable) above which the challenger is not
            blessed; 0: drift is reported, never gated. (in [0, 1])
        drift_sample: Images per side of the drift measurement (this run's new images against
            the champion's data: class PSI and chi-square, image statistics, two-sample ROC-AUC
            of ImageNet EfficientNet-Lite0 embeddings); 0: no drift profile. (in [0, 5000])
    """
    import json
    import shutil

    from triview.params import pick
    from triview.stages import evaluate_stage

    dirs = [branch_1.path, branch_2.path, branch_3.path]
    evaluate_stage(dirs, voter.path, evaluation.path, views_dir=views.path, repeat=repeat,
                   dataset_dir=dataset.path, **pick("evaluate", locals()))
    with open(f"{evaluation.path}/eval.json") as fh:
        result = json.load(fh)
    with open(f"{evaluation.path}/blessing.json") as fh:
        verdict = json.load(fh)
    for name, s in {**result["views"], "ensemble": result["ensemble"]}.items():
        for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc", "binary_accuracy", "ece",
                    "ece_before"):
            if isinstance(s.get(key), (int, float)):
                metrics.log_metric(f"{name}_{key}", s[key])
    versus = result.get("versus_best_view")
    if versus:  # negative: the ensemble gets that many test images fewer right than its best view
        metrics.log_metric("ensemble_minus_best_view_images", versus["gap_images"])
        metrics.log_metric("ensemble_beats_best_view", int(versus["beats"]))
    metrics.log_metric("blessed", int(verdict["blessed"]))
    if verdict.get("champion") is not None:
        metrics.log_metric("champion_macro_f1", verdict["champion"])
    from triview.gate import metric_values

    for key, value in metric_values(verdict).items():  # clean images, change, interval, p
        metrics.log_metric(key, value)
    if result.get("drift"):
        from triview.drift import flat

        for key, value in flat(result["drift"]).items():
            metrics.log_metric(key, value)
    if result["task"] == "multiclass":
        confusion.log_confusion_matrix(result["classes"], result["confusion_matrix"])
    roc = result["roc_curve"]
    confusion.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    shutil.copyfile(f"{evaluation.path}/report.html", report.path)
    shutil.copyfile(f"{evaluation.path}/blessing.json", blessing.path)
    blessing.metadata.update({"blessed": bool(verdict["blessed"]), "reasons": verdict["reasons"],
                              "comparison": verdict["comparison"]})
