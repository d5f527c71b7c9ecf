import json

import numpy as np
import pytest

from triview.evaluate import evaluate
from triview.voter import VOTERS, aligned, apply_voter, fit_voter, get_method


def _noisy_views(n=300, c=5, seed=0):
    """Three views that each see the truth through independent noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    probs = {}
    for v in ("left", "center", "right"):
        logits = rng.normal(0, 1.0, (n, c))
        logits[np.arange(n), y] += 1.2
        e = np.exp(logits)
        probs[v] = e / e.sum(1, keepdims=True)
    return probs, y


def test_combining_views_beats_each_single_view():
    probs, y = _noisy_views()
    voter, table = fit_voter(probs, y, 5)
    assert voter["method"] in ("mean", "geomean", "weighted", "vote", "logistic", "mlp")
    single = table[table["candidate"].str.startswith("single")]["val_macro_f1"].max()
    assert voter["val_macro_f1"] > single + 0.05
    assert table["chosen"].sum() == 1
    assert set(table["candidate"]) == {"mean", "geomean", "vote", "weighted", "single:left",
                                       "single:center", "single:right", "logistic", "mlp"}


def test_a_dominant_view_decides():
    probs, y = _noisy_views()
    probs["center"] = np.eye(5)[y] * 0.9 + 0.02
    rng = np.random.default_rng(3)  # the other views confidently wrong, at random
    for v in ("left", "right"):
        probs[v] = np.eye(5)[(y + rng.integers(1, 5, len(y))) % 5] * 0.9 + 0.02
    voter, table = fit_voter(probs, y, 5)
    assert table.set_index("candidate").loc["mean", "val_macro_f1"] < 0.9  # the mean is misled
    assert voter["val_macro_f1"] == 1.0
    assert np.array_equal(apply_voter(voter, probs).argmax(1), y)


def test_logistic_voter_probabilities_are_valid_and_cover_unseen_classes():
    probs, y = _noisy_views(c=5)
    y = np.where(y == 4, 3, y)  # class 4 never appears on validation
    logistic = get_method("logistic")
    params, oof = logistic.fit(list(probs.values()), y, 5, seed=0)
    p = logistic.apply(params, list(probs.values()), "multiclass")
    assert np.allclose(p.sum(1), 1) and (p[:, 4] < 1e-3).all() and (oof[:, 4] == 0).all()
    assert logistic.fit([v[:3] for v in probs.values()], np.array([0, 1, 2]), 5, seed=0) is None


def test_evaluate_scores_views_and_ensemble(tmp_path):
    probs, y = _noisy_views(n=200)
    ids = np.array([f"img{i:04d}" for i in range(200)])
    perm = np.random.default_rng(1).permutation(200)
    preds = {v: {"test_prob": p[perm], "test_ids": ids[perm], "test_labels": y[perm]}
             for v, p in probs.items()}
    voter = {"method": "mean", "params": {}, "views": list(probs), "name": "mean"}
    result = evaluate(preds, voter, [str(i) for i in range(5)], tmp_path)
    mean = np.mean(list(probs.values()), axis=0)
    assert result["ensemble"]["accuracy"] == pytest.approx((mean.argmax(1) == y).mean())
    assert result["views"]["left"]["accuracy"] == pytest.approx((probs["left"].argmax(1) == y).mean())
    assert np.array(result["confusion_matrix"]).sum() == 200
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["ensemble"]["method"] == "mean"
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table" in html
    assert "| ensemble" in (tmp_path / "report.md").read_text()


def test_views_predicted_on_different_images_are_refused():
    probs, y = _noisy_views(n=10)
    preds = {v: {"val_prob": p, "val_ids": np.array([f"{v}{i}" for i in range(10)]),
                 "val_labels": y} for v, p in probs.items()}
    with pytest.raises(ValueError, match="different val images"):
        aligned(preds, "val")


def test_weighted_voter_leans_on_the_better_view_and_vote_counts_labels():
    probs, y = _noisy_views(n=400)
    probs["center"] = 0.5 * probs["center"] + 0.5 * (np.eye(5)[y] * 0.9 + 0.02)  # a better view
    params, oof = get_method("weighted").fit(list(probs.values()), y, 5, seed=0)
    w = dict(zip(probs, params["weights"]))
    assert abs(sum(w.values()) - 1) < 1e-9 and w["center"] > max(w["left"], w["right"])
    assert np.allclose(oof.sum(1), 1)
    # majority vote: two views say class 1, one says class 0 -> class 1, whatever the confidences
    p = {"left": np.array([[0.1, 0.9]]), "center": np.array([[0.45, 0.55]]),
         "right": np.array([[0.99, 0.01]])}
    vote = apply_voter({"method": "vote", "params": {}, "views": list(p)}, p)
    assert vote.argmax() == 1 and np.isclose(vote.sum(), 1)
    assert apply_voter({"method": "mean", "params": {}, "views": list(p)}, p).argmax() == 0


def test_geometric_mean_is_a_normalised_product_of_experts():
    probs, _ = _noisy_views(n=40, c=4)
    p = apply_voter({"method": "geomean", "params": {}, "views": list(probs)}, probs)
    product = np.prod([probs[v] for v in probs], axis=0) ** (1 / 3)
    assert np.allclose(p, product / product.sum(1, keepdims=True), atol=1e-5)
    # one confident "no" vetoes a class that the mean would still pick
    q = {"left": np.array([[0.9, 0.1]]), "center": np.array([[0.9, 0.1]]),
         "right": np.array([[0.001, 0.999]])}
    assert apply_voter({"method": "mean", "params": {}, "views": list(q)}, q).argmax() == 0
    assert apply_voter({"method": "geomean", "params": {}, "views": list(q)}, q).argmax() == 1


def test_the_simplest_candidate_within_paired_noise_of_the_best_is_kept():
    """The choice counts the images a candidate gets wrong that the best gets right and
    the other way round: within one standard error of that paired difference (sqrt of the
    images where exactly one is right, at least one image) it is tied, and the lowest rank
    among the tied wins."""
    import pandas as pd

    from triview.voter import choose

    n = 400

    def right(wrong: list[int]) -> np.ndarray:
        out = np.ones(n, bool)
        out[wrong] = False
        return out

    def pick(**wrong):
        correct = {k.replace("_", ":"): right(v) for k, v in wrong.items()}
        table = pd.DataFrame([{"candidate": k, "val_macro_f1": c.mean(), "val_log_loss": 0.1}
                              for k, c in correct.items()])
        return choose(table, correct)

    # the best view gets 4 images wrong, geomean 7 others: 7 - 4 = 3 <= sqrt(11) -> tied
    assert pick(single_center=[0, 1, 2, 3], geomean=list(range(10, 17))) == "geomean"
    # geomean gets 20 others wrong: 20 - 4 = 16 > sqrt(24): worse than the view beyond noise
    assert pick(single_center=[0, 1, 2, 3], geomean=list(range(10, 30))) == "single:center"
    # paired, not binomial: 3 more wrong and none fewer is beyond noise (3 > sqrt(3)), though
    # 3 images are within one binomial standard error at 96 % of 400 (3.9 images)
    assert pick(single_center=list(range(16)), geomean=list(range(19))) == "single:center"
    assert pick(single_center=list(range(16)), geomean=list(range(15)) + [20, 21]) == "geomean"
    # the best stays when every simpler candidate trails it beyond noise
    assert pick(logistic=[0], mean=list(range(10, 30)), single_center=list(range(40, 60))) \
        == "logistic"
    # one image of slack even when both are perfect but one
    assert pick(single_center=[], vote=[5], mean=[6]) == "mean"


def _fitted_params(method, probs, y, n_classes):
    """Real parameters for every method: fitted ones fit on the data, single picks a view."""
    if method.name == "single":
        return {"view": "center", "index": 1}
    return method.fit(list(probs.values()), y, n_classes, seed=0)[0]


@pytest.mark.parametrize("name,task", [(n, t) for n in sorted(VOTERS) for t in ("multiclass", "multilabel")
                                       if t == "multiclass" or VOTERS[n].multilabel])
def test_every_registered_voter_exports_to_torch_and_onnx_with_numpy_parity(name, task, tmp_path):
    """Every method of the registry (not a hand-kept list), for every task it combines:
    its torch module, and that module exported to ONNX, compute what its numpy apply
    computes."""
    import onnxruntime as ort
    import torch

    method = get_method(name)
    probs, y = _noisy_views(n=60, c=4)
    if task == "multilabel":  # independent per-label probabilities and 0/1 targets
        probs = {v: 1 / (1 + np.exp(-np.log(p / (1 - p + 1e-9)))) for v, p in probs.items()}
        y = (np.eye(4)[y] + (np.random.default_rng(5).random((60, 4)) < 0.2)).clip(0, 1).astype(int)
    params = _fitted_params(method, probs, y, 4)
    voter = {"method": name, "params": params, "views": list(probs), "task": task}
    expected = apply_voter(voter, probs)
    module = method.module(params, 3, 4, task).eval()
    tensors = [torch.tensor(probs[v], dtype=torch.float32) for v in probs]
    assert np.abs(module(tensors).detach().numpy() - expected).max() < 1e-5

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.voter = module

        def forward(self, a, b, c):
            return self.voter([a, b, c])

    path = tmp_path / "voter.onnx"
    torch.onnx.export(Wrap(), tuple(tensors), str(path), input_names=["a", "b", "c"],
                      output_names=["p"], opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the exporter drops inputs a voter ignores ("single"): feed by name
    feed = {i.name: tensors["abc".index(i.name)].numpy() for i in session.get_inputs()}
    out = session.run(None, feed)[0]
    assert np.abs(out - expected).max() < 1e-5


def test_a_sign_flipped_logistic_export_is_caught():
    """The parity check above fails for a wrong torch module (here: negated weights)."""
    import torch

    probs, y = _noisy_views(n=60, c=4)
    method = get_method("logistic")
    params = _fitted_params(method, probs, y, 4)
    flipped = {**params, "coef": (-np.asarray(params["coef"])).tolist()}
    tensors = [torch.tensor(p, dtype=torch.float32) for p in probs.values()]
    out = method.module(flipped, 3, 4, "multiclass")(tensors).detach().numpy()
    expected = apply_voter({"method": "logistic", "params": params, "views": list(probs)}, probs)
    assert np.abs(out - expected).max() > 1e-2


def test_voter_files_of_the_earlier_format_are_read():
    from triview.voter import upgrade

    old = {"method": "weighted", "views": ["a", "b", "c"], "weights": [0.2, 0.3, 0.5],
           "name": "weighted", "task": "multiclass", "val_macro_f1": 0.9}
    new = upgrade(old)
    assert new["params"] == {"weights": [0.2, 0.3, 0.5]} and new["name"] == "weighted"
    single = upgrade({"method": "single", "views": ["a", "b", "c"], "view": "b"})
    assert single["params"] == {"view": "b", "index": 1}
