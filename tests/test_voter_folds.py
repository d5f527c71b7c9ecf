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
    real_fit, real_predict = folds.fit, folds.predict_logits

    def recording_fit(config, train, *args, **kwargs):
        trained_on.append(set(train.image_ids))
        return real_fit(config, train, *args, **kwargs)

    def recording_predict(model, images, *args, **kwargs):
        predicted.append(len(images))
        return real_predict(model, images, *args, **kwargs)

    monkeypatch.setattr(folds, "fit", recording_fit)
    monkeypatch.setattr(folds, "predict_logits", recording_predict)
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
    # the voter sees the out-of-fold training rows and the validation images, never test
    val_ids = set(views.query("view == 'center' and split == 'val'")["image_id"])
    rec = train_voter_stage(dirs, tmp_path / "voter", seed=0)
    assert rec["voter_inputs"] == "train out-of-fold + validation"
    assert rec["n_scored"] == len(train_ids) + len(val_ids)
    table = pd.read_csv(tmp_path / "voter" / "candidates.csv")
    fitted = table[table["candidate"].isin(["weighted", "logistic", "mlp"])]
    assert len(fitted) == 3 and set(fitted["fitted_on"]) == {
        "train out-of-fold + validation (cross-validated)"}
    # whichever fitted method is chosen is fitted on all of those rows
    # (only fitted candidates here, so that a fixed rule cannot win)
    monkeypatch.setattr(vt, "VOTERS", {k: m for k, m in vt.VOTERS.items() if m.fitted})
    train_voter_stage(dirs, tmp_path / "fitted", seed=0)
    voter = json.loads((tmp_path / "fitted" / "voter.json").read_text())
    assert voter["fitted_on"] == "train out-of-fold + validation"
    preds = {v: load_predictions(d) for v, d in zip(("left", "center", "right"), dirs)}
    held, y_held, ids, _ = vt.held_out_set(preds)
    assert set(ids) == train_ids | val_ids
    oof, y_oof, _ = vt.aligned(preds, "oof")
    method = vt.get_method(voter["method"])
    refit = method.fit([held[v] for v in voter["views"]], y_held, 10, seed=0)[0]
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


def test_fitted_voters_are_scored_by_cross_validated_predictions():
    """A fitted candidate's held-out score comes from predictions of images its fit did not
    see (cross-validated), not from the model fitted on all of them."""
    probs, y = _synthetic(400, 0)
    voter, table = vt.fit_voter(probs, y, 5, seed=0, scored_on="out-of-fold (train + validation)")
    rows = table.set_index("candidate")
    assert rows.loc["mlp", "fitted_on"] == "out-of-fold (train + validation) (cross-validated)"
    assert rows.loc["mean", "fitted_on"] == "-"
    mlp = vt.get_method("mlp")
    params, scored = mlp.fit(list(probs.values()), y, 5, seed=0)
    assert rows.loc["mlp", "val_macro_f1"] == selection_scores(y, scored)["val_macro_f1"]
    assert not np.allclose(scored, mlp.apply(params, list(probs.values()), "multiclass"))
    assert voter["n_scored"] == 400 and voter["scored_on"] == "out-of-fold (train + validation)"


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
