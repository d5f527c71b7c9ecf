"""Export parity: ONNX Runtime and TorchScript against eager PyTorch on the real test
crops, safetensors weights, INT8 quantization and the model card."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from triview.export import load_eager, load_ensemble, onnx_session, run_onnx, run_torch
from triview.stages import _split_inputs, evaluate_stage, export_stage, train_voter_stage
from triview.train import load_predictions
from triview.voter import aligned, apply_voter, load_voter

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported_int8(trained, cropped, tmp_path_factory):
    dirs = list(trained.values())
    voter_dir = tmp_path_factory.mktemp("voter")
    eval_dir = tmp_path_factory.mktemp("eval")
    model_dir = tmp_path_factory.mktemp("model")
    train_voter_stage(dirs, voter_dir)
    evaluate_stage(dirs, voter_dir, eval_dir, views_dir=cropped, gradcam_per_kind=0)
    export_stage(dirs, voter_dir, cropped, eval_dir, model_dir, quantize="static")
    return voter_dir, eval_dir, model_dir


@pytest.fixture(scope="module")
def test_crops(exported_int8, cropped):
    card = json.loads((exported_int8[2] / "model_card.json").read_text())
    return _split_inputs(cropped, card["views"], "test")


def test_onnx_runtime_matches_eager_on_real_test_images(exported_int8, test_crops):
    _, _, model_dir = exported_int8
    inputs, _ = test_crops
    eager, card = load_eager(model_dir)
    expected = run_torch(eager, inputs)
    got = run_onnx(onnx_session(model_dir / card["files"]["onnx"]), [x.numpy() for x in inputs])
    assert len(got) == len(inputs[0]) >= 30
    assert np.abs(got - expected).max() <= 1e-4
    assert card["onnx_max_abs_diff"] <= 1e-4 and card["parity_images"] == len(inputs[0])


def test_torchscript_matches_eager_and_the_evaluated_probabilities(exported_int8, trained, cropped,
                                                                  test_crops):
    from triview import manifest as mf

    voter_dir, eval_dir, model_dir = exported_int8
    inputs, labels = test_crops
    module, card = load_ensemble(model_dir)
    eager, _ = load_eager(model_dir)
    scripted = run_torch(module, inputs)
    assert np.abs(scripted - run_torch(eager, inputs)).max() <= 1e-5
    table = mf.read_views(cropped)
    rows = table[(table["view"] == card["views"][0]) & (table["split"] == "test")
                 & (table["augmented"] == 0)]
    order = np.argsort(rows["image_id"].to_numpy())
    preds = {v: load_predictions(trained[v]) for v in card["views"]}
    by_view, y, ids = aligned(preds, "test")
    assert rows["image_id"].to_numpy()[order].tolist() == ids.tolist()
    assert np.array_equal(labels[order], y)
    expected = apply_voter(load_voter(voter_dir), by_view)
    assert np.abs(scripted[order] - expected).max() <= 1e-4
    evaluation = json.loads((eval_dir / "eval.json").read_text())
    assert (scripted[order].argmax(1) == y).mean() == pytest.approx(evaluation["ensemble"]["accuracy"])


def test_safetensors_weights_hold_every_parameter(exported_int8):
    from safetensors.torch import load_file

    _, _, model_dir = exported_int8
    eager, card = load_eager(model_dir)
    weights = load_file(str(model_dir / card["files"]["weights"]))
    assert set(weights) == set(eager.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in eager.state_dict().items())


def test_int8_quantization_reports_its_accuracy_change(exported_int8, test_crops):
    _, _, model_dir = exported_int8
    card = json.loads((model_dir / "model_card.json").read_text())
    q = card["quantization"]
    assert q["mode"] == "static" and (model_dir / q["file"]).is_file()
    assert q["size_bytes"] < q["fp32_size_bytes"]
    assert q["accuracy_delta"] == pytest.approx(q["int8_accuracy"] - q["fp32_accuracy"])
    assert abs(q["accuracy_delta"]) <= 0.25
    assert "INT8 (static)" in (model_dir / "model_card.md").read_text()


def test_model_card_has_lineage_preprocessing_and_data_version(exported_int8):
    _, _, model_dir = exported_int8
    card = json.loads((model_dir / "model_card.json").read_text())
    assert len(card["data_version"]) == 16
    assert "run_id" in card["lineage"] and "git_commit" in card["lineage"]
    assert card["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and card["preprocessing"]["scale"] == 1 / 255
    assert card["crop_geometry"]["image_size"] == card["image_size"] == 32
    assert {"torchscript", "onnx", "weights", "voter"} <= set(card["files"])
    for f in card["files"].values():
        assert (model_dir / f).is_file(), f
    md = (model_dir / "model_card.md").read_text()
    for text in ("## Labels", "## Test metrics", card["data_version"], "ONNX"):
        assert text in md


def test_bench_inference_onnx_is_at_most_half_of_eager(exported_int8, tmp_path):
    _, _, model_dir = exported_int8
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "inference.py"), "--model", str(model_dir),
                    "--json", str(out), "--runs", "30"], check=True, cwd=REPO, timeout=300)
    figures = json.loads(out.read_text())
    assert {"onnx_ms", "eager_ms", "onnx_over_eager", "max_abs_diff"} <= set(figures)
    assert figures["max_abs_diff"] <= 1e-4
    assert figures["onnx_over_eager"] <= 0.5, figures


@pytest.mark.parametrize("method", ["single", "vote", "geomean", "weighted", "mlp"])
def test_every_voter_exports_with_parity(method, trained, cropped, tmp_path):
    """The exporter prunes the inputs a voter ignores (single): inputs go by name."""
    from triview.voter import save_voter

    dirs = list(trained.values())
    voter_dir, eval_dir, model_dir = tmp_path / "voter", tmp_path / "eval", tmp_path / "model"
    train_voter_stage(dirs, voter_dir)
    voter = load_voter(voter_dir)
    views = voter["views"]
    extra = {}
    if method == "mlp":  # a fitted MLP voter (weights from the branches' validation outputs)
        from triview.stages import _load_branch_predictions, branches_by_view
        from triview.voter import aligned, fit_mlp_voter

        probs, y, _ = aligned(_load_branch_predictions(branches_by_view(dirs)), "val")
        extra = fit_mlp_voter(probs, y, 10, hidden=16)[0]
    voter = {"method": method, "views": views, "name": method, "view": views[1],
             "weights": [0.2, 0.5, 0.3], "val_macro_f1": voter["val_macro_f1"], **extra}
    import pandas as pd

    save_voter(voter, pd.DataFrame([{"candidate": method, "val_macro_f1": 0.0, "chosen": True}]),
               voter_dir)
    evaluate_stage(dirs, voter_dir, eval_dir, views_dir=cropped, gradcam_per_kind=0)
    export_stage(dirs, voter_dir, cropped, eval_dir, model_dir)
    eager, card = load_eager(model_dir)
    inputs, _ = _split_inputs(cropped, card["views"], "test")
    got = run_onnx(onnx_session(model_dir / card["files"]["onnx"]), [x.numpy() for x in inputs])
    assert np.abs(got - run_torch(eager, inputs)).max() <= 1e-4
