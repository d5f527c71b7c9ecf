"""The KFP faces, run through ``python_func`` with real kfp artifacts on real digits: each
component maps its artifacts to folders, calls its stage, and fills the metadata and
metrics the Kubeflow UI shows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model

from components.augment import augment
from components.balance import balance
from components.calibrate_and_crop import calibrate_and_crop
from components.evaluate import evaluate
from components.export import export
from components.ingest import ingest
from components.repeats import repeat_seeds, summarize_repeats
from components.train_branch import train_branch
from components.train_voter import train_voter
from conftest import DIGITS_TRAIN


def _artifact(kind, tmp_path: Path, name: str):
    return kind(name=name, uri=str(tmp_path / name), metadata={})


@pytest.fixture(scope="module")
def faces(digits_dir, tmp_path_factory):
    """The DAG's first stages through their component bodies."""
    tmp = tmp_path_factory.mktemp("faces")
    dataset = _artifact(Dataset, tmp, "dataset")
    ingest.python_func(data=str(digits_dir), dataset=dataset)
    views = _artifact(Dataset, tmp, "views")
    calibrate_and_crop.python_func(dataset=dataset, views=views, layout="vertical", image_size=24)
    return tmp, dataset, views


def test_ingest_and_crop_faces_fill_their_metadata(faces):
    _, dataset, views = faces
    assert dataset.metadata["train"] + dataset.metadata["val"] + dataset.metadata["test"] == 400
    assert dataset.metadata["classes"] == [str(d) for d in range(10)]
    assert len(dataset.metadata["dataset_version"]) == 64
    assert views.metadata["views"] == ["top", "center", "bottom"]
    assert views.metadata["crops"] == 1200 and views.metadata["lens"] == "identity"


def test_a_face_refuses_a_bad_value_from_the_ui(faces, tmp_path):
    """A run started in the Kubeflow UI reaches the component without the CLI's checks."""
    _, dataset, _ = faces
    from triview.params import ParamError

    with pytest.raises(ParamError, match="'layout' must be one of vertical, horizontal"):
        calibrate_and_crop.python_func(dataset=dataset, views=_artifact(Dataset, tmp_path, "v"),
                                       layout="diagonal")


def test_the_whole_chain_of_faces(faces, tmp_path):
    tmp, dataset, views = faces
    weights = _artifact(Dataset, tmp_path, "balance")
    counts = _artifact(Markdown, tmp_path, "counts")
    balance.python_func(views=views, balance=weights, class_counts=counts)
    assert "imbalance ratio (train)" in Path(counts.path).read_text()
    assert len(weights.metadata["class_weights"]) == 10

    augmented = _artifact(Dataset, tmp_path, "augmented")
    preview = _artifact(Markdown, tmp_path, "preview")
    augment.python_func(views=views, augmented=augmented, preview=preview, augment_copies=1)
    assert augmented.metadata == {"crops": 873, "mode": "offline"}  # 291 training images x 3 views
    assert "data:image/png;base64," in Path(preview.path).read_text()

    branches = []
    for index in range(3):
        model = _artifact(Model, tmp_path, f"branch{index}")
        metrics = _artifact(Metrics, tmp_path, f"metrics{index}")
        train_branch.python_func(views=views, augmented=augmented, balance=weights,
                                 view_index=index, model=model, metrics=metrics, run_id="run-1",
                                 **{**DIGITS_TRAIN, "epochs": 1})
        assert model.metadata["view"] == ["top", "center", "bottom"][index]
        assert model.metadata["backbone"] == DIGITS_TRAIN["backbone"]
        assert set(metrics.metadata) >= {"val_macro_f1", "val_accuracy", "best_epoch"}
        branches.append(model)

    voter = _artifact(Model, tmp_path, "voter")
    candidates = _artifact(Markdown, tmp_path, "candidates")
    train_voter.python_func(branch_1=branches[0], branch_2=branches[1], branch_3=branches[2],
                            voter=voter, candidates=candidates, seed=0)
    assert voter.metadata["inputs"] == "validation" and "geomean" in Path(candidates.path).read_text()

    evaluation = _artifact(Dataset, tmp_path, "evaluation")
    metrics = _artifact(Metrics, tmp_path, "metrics")
    confusion = _artifact(ClassificationMetrics, tmp_path, "confusion")
    report = _artifact(HTML, tmp_path, "report.html")
    blessing = _artifact(Artifact, tmp_path, "blessing.json")
    evaluate.python_func(branch_1=branches[0], branch_2=branches[1], branch_3=branches[2],
                         voter=voter, views=views, dataset=dataset, evaluation=evaluation,
                         metrics=metrics, confusion=confusion, report=report, blessing=blessing,
                         registry=str(tmp_path / "registry"), model_name="digits", drift_sample=64)
    assert {"ensemble_accuracy", "ensemble_macro_f1", "top_macro_f1", "blessed"} <= set(metrics.metadata)
    # the first model: a data profile to measure the next run's drift against, no drift yet
    assert metrics.metadata["drift_measured"] == 0 and metrics.metadata["drift_new_images"] == 400
    assert (Path(evaluation.path) / "drift_profile.json").is_file()
    assert len(confusion.metadata["confusionMatrix"]["rows"]) == 10
    assert blessing.metadata["comparison"] == "first_run" and blessing.metadata["blessed"]
    assert Path(report.path).read_text().lower().startswith("<!doctype html>")

    model = _artifact(Model, tmp_path, "model")
    export.python_func(branch_1=branches[0], branch_2=branches[1], branch_3=branches[2],
                       voter=voter, views=views, evaluation=evaluation, blessing=blessing,
                       model=model, registry=str(tmp_path / "registry"), model_name="digits")
    assert model.metadata["promoted"] and model.metadata["registry_version"] == 1
    assert model.metadata["onnx_max_abs_diff"] <= 1e-4
    card = json.loads((Path(model.path) / "model_card.json").read_text())
    assert card["training"]["top"]["weights"] is None  # the digits train from scratch
    seen = (Path(model.path) / card["data"]["seen_images"]["file"]).read_text().split()
    assert len(seen) == card["data"]["seen_images"]["count"] == (dataset.metadata["train"]
                                                                 + dataset.metadata["val"])
    assert (Path(model.path) / "drift_embeddings.npy").is_file()  # the profile travels with it

    seeds = repeat_seeds.python_func(seed=4, repeats=3)
    assert seeds == [5, 6]
    summary = _artifact(Dataset, tmp_path, "summary")
    summary_metrics = _artifact(Metrics, tmp_path, "summary_metrics")
    summarize_repeats.python_func(evaluation=evaluation, repeat_evaluations=[], summary=summary,
                                  metrics=summary_metrics)
    assert summary_metrics.metadata["repeats"] == 1
    assert summary.metadata["seeds"] == [0]
