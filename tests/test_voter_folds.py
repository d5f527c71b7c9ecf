"""Out-of-fold voter inputs (``voter_folds > 1``) and the MLP voter."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from conftest import digits_train
from triview import voter as vt
from triview.artifacts import load_predictions
from triview.scoring import selection_scores


def test_branches_write_out_of_fold_probabilities_and_the_voter_uses_them(cropped, balanced, tmp_path,
                                                                        monkeypatch):
    import triview.train.folds as folds
    from triview.stages import train_branch_stage, train_voter_stage

    # record what each fold model trained on and how many rows it then predicted (the
    # out-of-fold rows are those predictions, fold after fold)
    trained_on, predicted = [], []
    real_fit, real_predict = folds.fit, folds.predict_proba_with

    def recording_fit(config, train, *args, **kwargs):
        trained_on.append(set(train.image_ids))
        return real_fit(config, train, *args, **kwargs)

    def recording_predict(model, images, **kwargs):
        predicted.append(len(images))
        return real_predict(model, images, **kwargs)

    monkeypatch.setattr(folds, "fit", recording_fit)
    monkeypatch.setattr(folds, "predict_proba_with", recording_predict)
    views = pd.read_csv(cropped / "views.csv", dtype={"image_id": str})
    dirs = []
    for view in ("left", "center", "right"):
        trained_on.clear()
        predicted.clear()
        d = tmp_path / view
        rec = train_branch_stage(cropped, None, balanced, view, d, **digits_train(epochs=1, batch_size=32,
                                 seed=0, voter_folds=2))
        assert rec["voter_folds"] == 2
        dirs.append(d)
        preds = np.load(d / "predictions.npz")
        train_ids = set(views.query("view == @view and split == 'train'")["image_id"])
        # every real training image predicted exactly once, by the model that did not see it
        assert sorted(preds["oof_ids"]) == sorted(train_ids)
        # no row is predicted by a fold model that trained on it
        assert len(trained_on) == len(predicted) == 2 and sum(predicted) == len(train_ids)
        chunks = np.split(preds["oof_ids"], np.cumsum(predicted)[:-1])
        for model_ids, chunk in zip(trained_on, chunks):
            assert len(chunk) and not model_ids & set(chunk)
            assert model_ids | set(chunk) == train_ids  # and it trained on all the others
        assert preds["oof_prob"].shape == (len(train_ids), 10)
        assert not set(preds["oof_ids"]) & set(preds["val_ids"])
        assert (d / "checkpoints" / "fold-0" / "last.pt").is_file()
        assert (d / "checkpoints" / "fold-1" / "last.pt").is_file()
    rec = train_voter_stage(dirs, tmp_path / "voter", seed=0)
    assert rec["voter_inputs"] == "train out-of-fold"
    table = pd.read_csv(tmp_path / "voter" / "candidates.csv")
    fitted = table[table["candidate"].isin(["weighted", "logistic", "mlp"])]
    assert len(fitted) == 3 and set(fitted["fitted_on"]) == {"train out-of-fold"}
    # whichever fitted method is chosen is refitted on the out-of-fold rows and validation
    # (only fitted candidates here, so that a fixed rule cannot win)
    monkeypatch.setattr(vt, "VOTERS", {k: m for k, m in vt.VOTERS.items() if m.fitted})
    train_voter_stage(dirs, tmp_path / "fitted", seed=0)
    voter = json.loads((tmp_path / "fitted" / "voter.json").read_text())
    assert voter["fitted_on"] == "train out-of-fold + validation"
    preds = {v: load_predictions(d) for v, d in zip(("left", "center", "right"), dirs)}
    val, y_val, _ = vt.aligned(preds, "val")
    oof, y_oof, _ = vt.aligned(preds, "oof")
    method = vt.get_method(voter["method"])
    both = [np.concatenate([oof[v], val[v]]) for v in voter["views"]]
    refit = method.fit(both, np.concatenate([y_oof, y_val]), 10, seed=0,
                       held_out=([val[v] for v in voter["views"]], y_val))[0]
    only_oof = method.fit([oof[v] for v in voter["views"]], y_oof, 10, seed=0)[0]
    def flat(params):
        return np.concatenate([np.ravel(np.asarray(params[k], dtype=float)) for k in sorted(params)])

    assert np.allclose(flat(voter["params"]), flat(refit))
    assert not np.allclose(flat(voter["params"]), flat(only_oof))


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
    mlp = vt.get_method("mlp")
    params, scored = mlp.fit(list(oof.values()), y_oof, 5, seed=0,
                             held_out=(list(val.values()), y_val))
    assert np.allclose(scored, mlp.apply(params, list(val.values()), "multiclass"))
    assert rows.loc["mlp", "val_macro_f1"] == selection_scores(y_val, scored)["val_macro_f1"]


def test_mlp_voter_learns_and_exports_exactly():
    probs, y = _synthetic(300, 2)
    mlp = vt.get_method("mlp")
    params, oof = mlp.fit(list(probs.values()), y, 5, seed=0)
    assert np.asarray(params["w1"]).shape == (15, 32)
    assert (oof.argmax(1) == y).mean() > (probs["c"].argmax(1) == y).mean()
    module = mlp.module(params, 3, 5, "multiclass")
    out = module([torch.tensor(p, dtype=torch.float32) for p in probs.values()])
    assert np.allclose(out.detach().numpy(), mlp.apply(params, list(probs.values()), "multiclass"),
                       atol=1e-5)
    assert np.allclose(out.detach().numpy().sum(1), 1, atol=1e-5)
