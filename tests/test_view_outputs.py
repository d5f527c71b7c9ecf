"""What each view saw: the exported ONNX graph outputs the ensemble's probabilities first
(unchanged) and each view's own after them; ``triview predict --views`` names each view's
top label; an export without per-view outputs still predicts and says why it shows none."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from triview import manifest as mf
from triview.cli import main
from triview.artifacts import ONNX_FILE
from triview.export import load_eager
from triview.runtime import (ENSEMBLE_OUTPUT, load_runtime, onnx_session, run_onnx,
                             run_onnx_views, view_output_name)
from triview.train.data import load_split
from conftest import stored_photos


@pytest.fixture(scope="module")
def test_crops(exported, cropped):
    card = json.loads((exported / "model_card.json").read_text())
    return [c.numpy() for c in load_split(cropped, card["views"], "test").inputs]


def test_the_graph_outputs_the_ensemble_first_then_each_view(exported, test_crops):
    session = onnx_session(exported / ONNX_FILE)
    names = [o.name for o in session.get_outputs()]
    assert names == [ENSEMBLE_OUTPUT] + [view_output_name(k) for k in range(3)]
    probs, views = run_onnx_views(session, test_crops)
    assert np.array_equal(probs, run_onnx(session, test_crops))   # the first output, as before
    eager, _ = load_eager(exported)
    with torch.no_grad():
        expected = eager.view_probabilities([torch.as_tensor(x) for x in test_crops])
    for got, want in zip(views, expected):
        assert got.shape == probs.shape
        assert float(np.abs(got - want.numpy()).max()) < 1e-4


def test_predict_views_names_each_views_top_label(exported, ingested, capsys):
    paths = [str(p) for p in stored_photos(ingested, mf.read_manifest(ingested)["path"][:6])]
    assert main(["predict", "--model", str(exported), *paths, "--format", "json", "--views"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", "--model", str(exported), *paths, "--format", "json"]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["labels"] for r in rows] == [p["labels"] for p in plain]   # labels unchanged
    assert all("views" not in p for p in plain)
    from triview.predict import Predictor

    predictor = Predictor(str(exported))
    _, per_view = predictor.view_probabilities([predictor.views(p) for p in paths])
    card_views = predictor.card["views"]
    for row, i in zip(rows, range(len(paths))):
        assert list(row["views"]) == card_views
        for view in card_views:
            prob = per_view[view][i]
            assert row["views"][view]["label"] == predictor.classes[int(prob.argmax())]
            assert row["views"][view]["score"] == round(float(prob.max()), 6)


def test_an_export_without_view_outputs_predicts_and_says_why_no_views(exported, ingested,
                                                                       tmp_path, capsys):
    """Models exported before the per-view outputs keep working."""
    old = tmp_path / "old-model"
    shutil.copytree(exported, old)
    eager, _ = load_eager(exported)
    size = json.loads((exported / "model_card.json").read_text())["image_size"]
    sample = tuple(torch.rand(2, 3, size, size) for _ in range(3))
    torch.onnx.export(eager, sample, str(old / ONNX_FILE), input_names=["view0", "view1", "view2"],
                      output_names=[ENSEMBLE_OUTPUT], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch"} for n in ["view0", "view1", "view2",
                                                              ENSEMBLE_OUTPUT]})
    run, _ = load_runtime(old)
    probs, views = run.with_views([s.numpy() for s in sample])
    assert views is None and probs.shape[0] == 2
    path = str(stored_photos(ingested, mf.read_manifest(ingested)["path"][:1])[0])
    assert main(["predict", "--model", str(old), path, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"]
    assert main(["predict", "--model", str(old), path, "--views"]) == 2
    assert "has no per-view outputs" in capsys.readouterr().err
