"""Out-of-fold voter inputs (``voter_folds > 1``) and the MLP voter."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from triview import voter as vt
from triview.export import VoterModule


def test_branches_write_out_of_fold_probabilities_and_the_voter_uses_them(cropped, balanced, tmp_path):
    from triview.stages import train_branch_stage, train_voter_stage

    views = pd.read_csv(cropped / "views.csv", dtype={"image_id": str})
    dirs = []
    for view in ("left", "center", "right"):
        d = tmp_path / view
        rec = train_branch_stage(cropped, None, balanced, view, d, epochs=1, batch_size=32,
                                 seed=0, voter_folds=2)
        assert rec["voter_folds"] == 2
        dirs.append(d)
        preds = np.load(d / "predictions.npz")
        train_ids = set(views.query("view == @view and split == 'train'")["image_id"])
        # every real training image predicted exactly once, by the model that did not see it
        assert sorted(preds["oof_ids"]) == sorted(train_ids)
        assert preds["oof_prob"].shape == (len(train_ids), 10)
        assert not set(preds["oof_ids"]) & set(preds["val_ids"])
        assert (d / "checkpoints" / "fold-0" / "last.pt").is_file()
        assert (d / "checkpoints" / "fold-1" / "last.pt").is_file()
    rec = train_voter_stage(dirs, tmp_path / "voter", seed=0)
    assert rec["voter_inputs"] == "train out-of-fold"
    table = pd.read_csv(tmp_path / "voter" / "candidates.csv")
    fitted = table[table["candidate"].isin(["weighted", "logistic", "mlp"])]
    assert len(fitted) == 3 and set(fitted["fitted_on"]) == {"train out-of-fold"}
    voter = json.loads((tmp_path / "voter" / "voter.json").read_text())
    if voter["name"] in ("weighted", "logistic", "mlp"):
        assert voter["fitted_on"] == "train out-of-fold + validation"


def _synthetic(n: int, seed: int, quality=(0.6, 0.5, 0.4)):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    probs = {}
    for view, q in zip(("a", "b", "c"), quality):
        logits = rng.normal(size=(n, 5)) + 3 * q * np.eye(5)[y]
        e = np.exp(logits)
        probs[view] = e / e.sum(1, keepdims=True)
    return probs, y


def test_fitted_voters_are_scored_on_validation_when_oof_is_given():
    val, y_val = _synthetic(200, 0)
    oof, y_oof = _synthetic(600, 1)
    voter, table = vt.fit_voter(val, y_val, 5, seed=0, oof=(oof, y_oof))
    rows = table.set_index("candidate")
    assert rows.loc["mlp", "fitted_on"] == "train out-of-fold"
    assert rows.loc["mean", "fitted_on"] == "-"
    # a fitted candidate scored on validation is judged on data it never saw
    mlp, scored = vt.fit_mlp_voter(oof, y_oof, 5, seed=0, held_out=(val, y_val))
    assert np.allclose(scored, vt.apply_voter(mlp, val))
    assert rows.loc["mlp", "val_macro_f1"] == vt._scores(y_val, scored)["val_macro_f1"]


def test_mlp_voter_learns_and_exports_exactly():
    probs, y = _synthetic(300, 2)
    voter, oof = vt.fit_mlp_voter(probs, y, 5, seed=0)
    assert voter["method"] == "mlp" and np.asarray(voter["w1"]).shape == (15, 32)
    assert (oof.argmax(1) == y).mean() > (probs["c"].argmax(1) == y).mean()
    module = VoterModule(voter, 5)
    out = module([torch.tensor(probs[v], dtype=torch.float32) for v in voter["views"]])
    assert np.allclose(out.detach().numpy(), vt.apply_voter(voter, probs), atol=1e-5)
    assert np.allclose(out.detach().numpy().sum(1), 1, atol=1e-5)
