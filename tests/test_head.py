"""The head phase on cached features (triview.train.head): cross-fitted L-BFGS logistic
heads whose out-of-fold predictions are honest, the penalty chosen by out-of-fold
log-loss, and temperature scaling with its calibration error (triview.temperature)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from triview import temperature as tp
from triview.train import head as hd


def _features(n=240, d=16, c=3, seed=0, passes=("identity", "flip")):
    """Class means apart in a few dimensions, noise elsewhere; every pass a noisy copy."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    means = rng.normal(0, 1.2, (c, d))
    base = means[y] + rng.normal(0, 1.0, (n, d))
    out = {p: (base + rng.normal(0, 0.3, (n, d))).astype(np.float32) for p in passes}
    return hd.PassFeatures(np.array([f"img{i:04d}" for i in range(n)]), y, out)


def _criterion(c=3):
    return torch.nn.CrossEntropyLoss(weight=torch.ones(c), label_smoothing=0.1)


def test_out_of_fold_logits_come_from_heads_that_never_saw_the_image(monkeypatch):
    pool = _features()
    fitted_on: list[set] = []
    real_fit = hd.fit_linear

    def recording(x, y, *args, **kwargs):
        fitted_on.append({r.tobytes() for r in x})
        return real_fit(x, y, *args, **kwargs)

    monkeypatch.setattr(hd, "fit_linear", recording)
    fit = hd.cross_fit(pool, _criterion(), "multiclass", 3, train_passes=("identity", "flip"),
                       tta=("identity", "flip"), folds=4, seed=0, l2_grid=(1e-2,))
    assert fit.folds == 4 and len(fitted_on) == 5  # four fold heads, then the final one
    held = hd.fold_rows(pool.y, 4, 0)
    for rows, seen in zip(held, fitted_on[:4]):
        for r in rows:  # neither pass of a held-out image was in that head's fitting rows
            assert pool.passes["identity"][r].tobytes() not in seen
            assert pool.passes["flip"][r].tobytes() not in seen
    # every image's out-of-fold logits are its fold head's, averaged over the tta passes
    k = held[2][0]
    fold = hd.cross_fit(pool.take(np.setdiff1d(np.arange(240), held[2])), _criterion(), "multiclass",
                        3, train_passes=("identity", "flip"), folds=4, l2_grid=(1e-2,)).head
    expected = fold.logits(pool.take(np.array([k])), ("identity", "flip"))[0]
    assert np.allclose(fit.oof_logits[k], expected, atol=1e-3)
    assert len(fitted_on[4]) == 2 * 240  # the final head: both passes of every image


def test_the_penalty_is_chosen_by_out_of_fold_log_loss_and_oof_beats_chance():
    pool = _features(seed=1)
    fit = hd.cross_fit(pool, _criterion(), "multiclass", 3, train_passes=("identity",), folds=5,
                       l2_grid=(1e-4, 1e-1, 10.0))
    losses = {row["l2"]: row["oof_log_loss"] for row in fit.table}
    assert fit.l2 == min(losses, key=losses.get)
    assert losses[10.0] > losses[fit.l2]  # a crushing penalty is worse out of fold
    accuracy = (fit.oof_logits.argmax(1) == pool.y).mean()
    assert accuracy > 0.7 and fit.temperature == pytest.approx(
        tp.fit_temperature(fit.oof_logits, pool.y), rel=1e-6)


def test_warm_starts_change_the_time_not_the_head():
    pool = _features(seed=2)
    x, y = pool.passes["identity"], pool.y
    cold = hd.fit_linear(x, y, _criterion(), 1e-2, 3)
    warm = hd.fit_linear(x, y, _criterion(), 1e-2, 3, start=hd.fit_linear(x, y, _criterion(), 1e-1, 3))
    assert np.abs(cold.logits(pool, ("identity",)) - warm.logits(pool, ("identity",))).max() < 1e-2


def test_repeated_images_count_more_but_stay_in_one_fold():
    pool = _features(n=60, seed=3)
    twice = hd.PassFeatures(np.concatenate([pool.ids, pool.ids[:10]]),
                            np.concatenate([pool.y, pool.y[:10]]),
                            {k: np.concatenate([v, v[:10]]) for k, v in pool.passes.items()})
    unique = twice.unique()
    assert list(unique.ids) == list(pool.ids) and unique.repeat.tolist() == [2] * 10 + [1] * 50
    x, y = hd._training_rows(unique, ("identity",))
    assert len(x) == 70


def test_multilabel_heads_cross_fit_with_sigmoid_outputs():
    from triview.train.loss import MultiLabelLoss

    pool = _features(n=200, seed=4)
    y = np.stack([pool.y == 0, pool.y != 2], axis=1).astype(np.float32)
    pool = hd.PassFeatures(pool.ids, y, pool.passes)
    fit = hd.cross_fit(pool, MultiLabelLoss(torch.ones(2), 0.1), "multilabel", 2,
                       train_passes=("identity",), folds=3, l2_grid=(1e-2,))
    prob = tp.scale_logits(fit.oof_logits, fit.temperature, "multilabel")
    assert prob.shape == (200, 2) and ((prob >= 0.5) == y).mean() > 0.8


def test_missing_passes_and_too_few_folds_are_refused():
    pool = _features(n=30)
    with pytest.raises(ValueError, match="not among the features"):
        hd.cross_fit(pool, _criterion(), "multiclass", 3, train_passes=("aug1",))
    with pytest.raises(ValueError, match="at least 2 folds"):
        hd.cross_fit(pool, _criterion(), "multiclass", 3, train_passes=("identity",), folds=1)


# ----------------------------------------------------------------------------- temperature


def test_temperature_scaling_recovers_an_overconfident_model_and_lowers_its_ece():
    rng = np.random.default_rng(0)
    n, c = 4000, 4
    true_logits = rng.normal(0, 1.5, (n, c))
    y = np.array([rng.choice(c, p=p) for p in tp.scale_logits(true_logits, 1.0)])
    overconfident = true_logits * 3.0  # a model three times too sure of itself
    t = tp.fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    before = tp.expected_calibration_error(y, tp.scale_logits(overconfident, 1.0))
    after = tp.expected_calibration_error(y, tp.scale_logits(overconfident, t))
    assert after < 0.03 < before
    # the same through probabilities (what the ensemble's temperature rescales)
    prob = tp.scale_logits(overconfident, 1.0)
    assert tp.fit_probability_temperature(prob, y) == pytest.approx(t, rel=1e-3)
    assert np.allclose(tp.scale_probabilities(prob, 1.0), prob, atol=1e-6)
    assert (tp.scale_probabilities(prob, t).argmax(1) == prob.argmax(1)).all()


def test_expected_calibration_error_and_its_reliability_bins():
    y = np.array([0, 0, 1, 1])
    prob = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3]])
    bins = tp.reliability(y, prob)
    # two bins: confidence 0.7 (one right, one wrong) and 0.9 (both right)
    assert [(b["count"], round(b["confidence"], 6), b["accuracy"]) for b in bins] == \
        [(2, 0.7, 0.5), (2, 0.9, 1.0)]
    assert tp.expected_calibration_error(y, prob) == pytest.approx(0.5 * 0.2 + 0.5 * 0.1)
    # bins weigh by their size: three right at 0.9, one wrong at 0.7
    uneven = np.array([[0.9, 0.1]] * 3 + [[0.7, 0.3]])
    assert tp.expected_calibration_error(np.array([0, 0, 0, 1]), uneven) == \
        pytest.approx(0.75 * 0.1 + 0.25 * 0.7)
    # multi-label: every label's probability of its predicted state
    assert tp.expected_calibration_error(np.array([[1, 0]]), np.array([[0.8, 0.4]])) == \
        pytest.approx(0.5 * 0.2 + 0.5 * 0.4)


def test_the_head_phase_passes_read_a_feature_store_and_match_computing_them(tmp_path):
    """Passes exact on pixels (the crop, its mirror, augmented draws) are read from the
    feature store a study shares, equal to computing them; a float pass (zoom) and another
    network compute afresh."""
    from triview.augment import AugmentConfig
    from triview.models import BranchNet, create_backbone
    from triview.train.data import ViewData
    from triview.train.features import FeatureStore
    from triview.train.passes import extract

    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    data = ViewData(images, torch.arange(12) % 3, [f"img{k}" for k in range(12)])
    augment = AugmentConfig(mode="online", seed=3)
    passes = ("identity", "flip", "zoom", "aug1")
    net = BranchNet(create_backbone("shufflenet_v2_x0_5", 3, 32)).eval()
    forwards = []
    net.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
    plain = extract(net, data, passes, augment)
    store = FeatureStore(tmp_path / "features")
    forwards.clear()
    first = extract(net, data, passes, augment, store=store)
    assert sum(forwards) == 4 * 12  # every pass computed once
    forwards.clear()
    again = extract(net, data, passes, augment, store=FeatureStore(tmp_path / "features"))
    assert sum(forwards) == 0  # every pass from the store, zoom keyed by crop and pass name
    for name in passes:
        assert np.allclose(plain.passes[name], first.passes[name], atol=1e-5)
        assert np.allclose(first.passes[name], again.passes[name], atol=1e-6)
    assert not np.allclose(first.passes["identity"], first.passes["flip"])
    assert not np.allclose(first.passes["identity"], first.passes["zoom"])
    other = BranchNet(create_backbone("shufflenet_v2_x0_5", 3, 32)).eval()  # other weights
    other.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
    forwards.clear()
    extract(other, data, ("identity",), store=FeatureStore(tmp_path / "features"))
    assert sum(forwards) == 12
