from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def repeat_seeds(seed: int, repeats: int) -> List[int]:
    """The seeds of the run's repeats, ``seed+1 .. seed+repeats-1`` (the main run trains
    with ``seed``); the pipeline fans out over them.

    Args:
        seed: The run's seed.
        repeats: How many seeds in all, the main run's included.
    """
    from triview.stages import repeat_seeds as seeds

    return seeds(seed, repeats)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def summarize_repeats(
    evaluation: Input[Dataset],
    repeat_evaluations: Input[List[Dataset]],
    summary: Output[Dataset],
    metrics: Output[Metrics],
):
    """Mean and SD over seeds of every view and ensemble test metric.

    Args:
        evaluation: The main run's evaluation.
        repeat_evaluations: The repeats' evaluations (collected over the fan-out).
        summary: Output folder: ``repeats.json`` ({n, seeds, views, ensemble}, each metric
            with mean, sd and values).
        metrics: ``<view>_<metric>_mean`` / ``_sd`` and ``ensemble_<metric>_mean`` / ``_sd``.
    """
    from triview.stages import repeats_stage

    rec = repeats_stage([evaluation.path] + [e.path for e in repeat_evaluations], summary.path)
    rep = rec["repeats"]
    scored = {**rep.get("views", {}), "ensemble": rep.get("ensemble", {})}
    for name, scores in scored.items():
        for key, stat in scores.items():
            if isinstance(stat, dict) and "mean" in stat:
                metrics.log_metric(f"{name}_{key}_mean", stat["mean"])
                metrics.log_metric(f"{name}_{key}_sd", stat["sd"])
    metrics.log_metric("repeats", rep["n"])
    summary.metadata.update({"seeds": rep["seeds"]})
