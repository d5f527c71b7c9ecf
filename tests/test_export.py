import json

import numpy as np
import pytest
import torch

from triview import manifest as mf
from triview.artifacts import load_predictions
from triview.export import load_ensemble
from triview.train import load_view
from triview.voter import aligned, apply_voter, load_voter


@pytest.fixture(scope="module")
def chain(voted, evaluated, exported):
    return voted, evaluated, exported


def test_torchscript_ensemble_matches_the_evaluated_probabilities(chain, trained, cropped):
    voter_dir, eval_dir, model_dir = chain
    module, card = load_ensemble(model_dir)
    classes = mf.read_classes(cropped)
    table = mf.read_views(cropped)
    inputs = [load_view([(cropped, table)], v, "test", classes) for v in card["views"]]
    with torch.no_grad():
        probs = module(*[d.images.float() / 255.0 for d in inputs]).numpy()
    preds = {v: load_predictions(trained[v]) for v in card["views"]}
    by_view, y, ids = aligned(preds, "test")
    expected = apply_voter(load_voter(voter_dir), by_view)
    order = np.argsort(inputs[0].image_ids)
    assert np.array(inputs[0].image_ids)[order].tolist() == ids.tolist()
    assert np.abs(probs[order] - expected).max() < 1e-4
    evaluation = json.loads((eval_dir / "eval.json").read_text())
    assert (probs[order].argmax(1) == y).mean() == pytest.approx(evaluation["ensemble"]["accuracy"])


def test_model_card_records_what_serving_needs(chain, cropped):
    _, eval_dir, model_dir = chain
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["classes"] == mf.read_classes(cropped)
    assert card["views"] == ["left", "center", "right"] and card["image_size"] == 32
    assert card["crop_geometry"] == {"layout": "horizontal", "overlap": 0.5, "image_size": 32,
                                     "window": 0.0, "resize": "stretch"}
    assert card["test_metrics"]["ensemble"]["macro_f1"] == pytest.approx(
        json.loads((eval_dir / "eval.json").read_text())["ensemble"]["macro_f1"])
    assert card["torchscript_max_abs_diff"] <= 1e-5
    assert set(card["training"]) == {"left", "center", "right"}
