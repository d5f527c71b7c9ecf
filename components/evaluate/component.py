from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    branch_1: Input[Model],
    branch_2: Input[Model],
    branch_3: Input[Model],
    voter: Input[Model],
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """Score every view and the ensemble on the test split.

    Args:
        branch_1: First view's trained branch (with its test probabilities).
        branch_2: Second view's trained branch.
        branch_3: Third view's trained branch.
        voter: The chosen voter.
        evaluation: Output folder: ``eval.json``, ``report.md`` and ``report.html``.
        metrics: Test accuracy and macro-F1 per view and for the ensemble.
        confusion: The ensemble's test confusion matrix.
        report: Self-contained HTML report.
    """
    import json
    import shutil

    from triview.stages import evaluate_stage

    dirs = [branch_1.path, branch_2.path, branch_3.path]
    evaluate_stage(dirs, voter.path, evaluation.path)
    with open(f"{evaluation.path}/eval.json") as fh:
        result = json.load(fh)
    for view, s in result["views"].items():
        metrics.log_metric(f"{view}_accuracy", s["accuracy"])
        metrics.log_metric(f"{view}_macro_f1", s["macro_f1"])
    metrics.log_metric("ensemble_accuracy", result["ensemble"]["accuracy"])
    metrics.log_metric("ensemble_macro_f1", result["ensemble"]["macro_f1"])
    confusion.log_confusion_matrix(result["classes"], result["confusion_matrix"])
    shutil.copyfile(f"{evaluation.path}/report.html", report.path)
