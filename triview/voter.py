"""The voter: combines the three views' probabilities into one prediction.

Candidates are scored on the validation split, which no branch trained on:
mean of probabilities, their normalised geometric mean (a product of experts: per
label, the mean logit), each single view, majority vote (the sum of the views'
one-hot label vectors, ties broken by the mean probability; multi-label: per label,
the share of views that say yes), a weighted mean (view weights fitted by log-loss),
and learned voters on the concatenated log-probabilities: multinomial logistic
regression (multi-class) and a small MLP (one hidden ReLU layer; softmax, or sigmoid
per label).

Fitted candidates are never judged on data they were fitted to. Without out-of-fold
inputs they are scored by cross-validated predictions on the validation split; with
``oof`` (the branches' out-of-fold probabilities of the training images, from
``voter_folds > 1``) they are fitted on those and scored on the whole validation
split, and the chosen one is refitted on both. The best by validation macro-F1 is
kept, with Breiman's one-standard-error rule: of the candidates within one standard
error of it, the simplest (unfitted combinations before fitted voters, single views
last; see :func:`choose`). Multi-label voters carry per-label decision
thresholds tuned on validation.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.neural_network import MLPClassifier

from triview.storage import atomic_write_text

VOTER_FILE = "voter.json"
CANDIDATES_FILE = "candidates.csv"
EPS = 1e-6
VOTE_TIE_BREAK = 1e-3  # mean probability's share in the majority vote: breaks ties only
FIXED_RULES = ("mean", "geomean", "vote")  # combinations with nothing fitted
PREFERENCE = ("geomean", "mean", "vote", "weighted", "logistic", "mlp")  # then single views


def stack_features(probs: list[np.ndarray]) -> np.ndarray:
    """Features of the learned voter: concatenated log-probabilities of the views."""
    return np.concatenate([np.log(p + EPS) for p in probs], axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p + EPS) - np.log1p(EPS - p)


def apply_voter(voter: dict, probs: dict[str, np.ndarray]) -> np.ndarray:
    """Ensemble probabilities (N, C) from per-view probabilities, as the voter says."""
    method, views = voter["method"], voter["views"]
    multilabel = voter.get("task") == "multilabel"
    if method == "mean":
        return np.mean([probs[v] for v in views], axis=0)
    if method == "geomean":  # normalised geometric mean: a product of experts
        logs = np.mean([_logit(probs[v]) if multilabel else np.log(probs[v] + EPS) for v in views], 0)
        return _sigmoid(logs) if multilabel else _softmax(logs)
    if method == "weighted":
        return np.tensordot(np.asarray(voter["weights"]), np.stack([probs[v] for v in views]), 1)
    if method == "mlp":
        hidden = np.maximum(stack_features([probs[v] for v in views]) @ np.asarray(voter["w1"])
                            + np.asarray(voter["b1"]), 0.0)
        logits = hidden @ np.asarray(voter["w2"]) + np.asarray(voter["b2"])
        return _sigmoid(logits) if multilabel else _softmax(logits)
    if method == "vote" and multilabel:  # per label: the share of views above 0.5
        stacked = np.stack([probs[v] for v in views])
        return (1 - VOTE_TIE_BREAK) * (stacked >= 0.5).mean(0) + VOTE_TIE_BREAK * stacked.mean(0)
    if method == "vote":
        stacked = np.stack([probs[v] for v in views])
        n_classes = stacked.shape[-1]
        votes = np.eye(n_classes)[stacked.argmax(-1)].sum(0)  # sum of one-hot label vectors
        score = votes + VOTE_TIE_BREAK * stacked.mean(0)
        return score / score.sum(axis=1, keepdims=True)
    if method == "single":
        return probs[voter["view"]]
    if method == "logistic":
        logits = stack_features([probs[v] for v in views]) @ np.asarray(voter["coef"]).T
        logits = logits + np.asarray(voter["intercept"])
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(f"unknown voter method {method!r}")


def _scores(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Validation accuracy and macro-F1 (multi-label: at thresholds tuned on these data,
    the way the chosen voter will be used)."""
    from triview.evaluate import predicted, task_of, tune_thresholds

    task = task_of(y)
    pred = predicted(prob, task, tune_thresholds(y, prob) if task == "multilabel" else None)
    if task == "multilabel":  # mean binary cross-entropy over every (image, label)
        loss = log_loss(y.ravel(), prob.ravel(), labels=[0, 1])
    else:  # the vote's scores and float32 averages: rows renormalised to sum to one
        loss = log_loss(y, prob / prob.sum(1, keepdims=True), labels=np.arange(prob.shape[1]))
    return {"val_accuracy": float(accuracy_score(y, pred)),
            "val_macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
            "val_log_loss": float(loss)}


def _mlp_model(seed: int, hidden: int) -> MLPClassifier:
    return MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-2, max_iter=800,
                         learning_rate_init=3e-3, random_state=seed)


def _mlp_voter(model: MLPClassifier, views: list[str], n_classes: int, task: str) -> dict:
    """The fitted MLP as plain weights; classes absent from its training data get a
    very low logit (multi-class) so that they are never predicted."""
    w1, w2 = model.coefs_
    b1, b2 = model.intercepts_
    if task == "multiclass":
        full_w2 = np.zeros((w2.shape[0], n_classes))
        full_b2 = np.full(n_classes, -1e4)
        full_w2[:, model.classes_] = w2
        full_b2[model.classes_] = b2
        w2, b2 = full_w2, full_b2
    return {"method": "mlp", "views": views, "task": task, "hidden": int(w1.shape[1]),
            "w1": w1.tolist(), "b1": b1.tolist(), "w2": w2.tolist(), "b2": b2.tolist()}


def fit_mlp_voter(probs: dict[str, np.ndarray], y: np.ndarray, n_classes: int, seed: int = 0,
                  hidden: int = 32, held_out: tuple[dict[str, np.ndarray], np.ndarray] | None = None
                  ) -> tuple[dict, np.ndarray] | None:
    """A small MLP on the views' log-probabilities (the old "vote model").

    Returns the voter and the probabilities it is scored with: cross-validated on
    ``(probs, y)``, or, given ``held_out`` data, its predictions there. None when
    there are too few examples per class for cross-validation (multi-class needs
    at least 3 classes with 2 images each).
    """
    from triview.evaluate import task_of

    task = task_of(y)
    views = list(probs)
    X = stack_features([probs[v] for v in views])
    if task == "multiclass":
        present = np.unique(y)
        if len(present) < 3 or np.bincount(y, minlength=n_classes)[present].min() < 2:
            return None
    with _quiet_convergence():
        if held_out is not None:
            model = _mlp_model(seed, hidden).fit(X, y)
            voter = _mlp_voter(model, views, n_classes, task)
            return voter, apply_voter(voter, held_out[0])
        folds = (min(5, int(np.bincount(y, minlength=n_classes)[np.unique(y)].min()))
                 if task == "multiclass" else min(5, len(y)))
        splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if task == "multiclass"
                    else KFold(folds, shuffle=True, random_state=seed))
        oof = np.zeros((len(y), n_classes))
        for train_idx, test_idx in splitter.split(X, y if task == "multiclass" else None):
            fold = _mlp_voter(_mlp_model(seed, hidden).fit(X[train_idx], y[train_idx]),
                              views, n_classes, task)
            oof[test_idx] = apply_voter(fold, {v: probs[v][test_idx] for v in views})
        model = _mlp_model(seed, hidden).fit(X, y)
    return _mlp_voter(model, views, n_classes, task), oof


@contextlib.contextmanager
def _quiet_convergence():
    """MLPClassifier warns when max_iter ends the fit; the voter is scored, not trusted."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def fit_logistic_voter(val_probs: dict[str, np.ndarray], y_val: np.ndarray, n_classes: int,
                       seed: int = 0, C: float = 1.0,
                       held_out: tuple[dict[str, np.ndarray], np.ndarray] | None = None
                       ) -> tuple[dict, np.ndarray] | None:
    """Multinomial logistic regression on the views' log-probabilities (multi-class).

    Returns the voter and the probabilities it is scored with (out-of-fold on the
    data it is fitted to, or its predictions on ``held_out``), or None when some
    class has fewer than 2 images for cross-validation.
    """
    views = list(val_probs)
    X = stack_features([val_probs[v] for v in views])
    present = np.unique(y_val)
    folds = min(5, int(np.bincount(y_val, minlength=n_classes)[present].min()))
    if folds < 2 and held_out is None:
        return None
    lr = LogisticRegression(C=C, max_iter=2000)
    oof = None
    if held_out is None:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        oof = np.zeros((len(y_val), n_classes))
        oof[:, present] = cross_val_predict(lr, X, y_val, cv=cv, method="predict_proba")
    lr.fit(X, y_val)
    coef = np.zeros((n_classes, X.shape[1]))
    intercept = np.full(n_classes, -1e4)  # classes never seen in fitting are never predicted
    coef[lr.classes_] = lr.coef_ if len(lr.classes_) > 2 else np.vstack([-lr.coef_, lr.coef_]) / 2
    intercept[lr.classes_] = lr.intercept_ if len(lr.classes_) > 2 else \
        np.concatenate([-lr.intercept_, lr.intercept_]) / 2
    voter = {"method": "logistic", "views": views, "C": C, "coef": coef.tolist(),
             "intercept": intercept.tolist(), "cv_folds": folds}
    return voter, (apply_voter(voter, held_out[0]) if held_out is not None else oof)


def _fit_weights(probs: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """View weights on the simplex minimising the log-loss of the weighted mean
    (multi-label: the binary cross-entropy over every label)."""
    from scipy.optimize import minimize

    stacked = np.stack(probs)                      # (V, N, C)
    if y.ndim == 2:
        def nll(p):
            p = np.clip(p, EPS, 1 - EPS)
            return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

        def loss(theta: np.ndarray) -> float:
            w = np.exp(theta - theta.max())
            return nll(np.tensordot(w / w.sum(), stacked, 1))
    else:
        picked = stacked[:, np.arange(len(y)), y]  # (V, N): each view's probability of the truth

        def loss(theta: np.ndarray) -> float:
            w = np.exp(theta - theta.max())
            w /= w.sum()
            return float(-np.log(w @ picked + EPS).mean())

    theta = minimize(loss, np.zeros(len(probs)), method="Nelder-Mead",
                     options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000}).x
    w = np.exp(theta - theta.max())
    return w / w.sum()


def fit_weighted_voter(val_probs: dict[str, np.ndarray], y_val: np.ndarray, n_classes: int,
                       seed: int = 0, held_out: tuple[dict[str, np.ndarray], np.ndarray] | None = None
                       ) -> tuple[dict, np.ndarray]:
    """Weighted mean of the views' probabilities; returns the voter (weights fitted on
    all of ``val_probs``) and the probabilities it is scored with (out-of-fold, or on
    ``held_out``)."""
    views = list(val_probs)
    probs = [val_probs[v] for v in views]
    weights = _fit_weights(probs, y_val)
    voter = {"method": "weighted", "views": views, "weights": weights.tolist()}
    if held_out is not None:
        return voter, apply_voter(voter, held_out[0])
    folds = min(5, len(y_val) // 2)
    if folds < 2:
        return voter, np.tensordot(weights, np.stack(probs), 1)
    oof = np.zeros((len(y_val), n_classes))
    for train_idx, test_idx in KFold(folds, shuffle=True, random_state=seed).split(y_val):
        w = _fit_weights([p[train_idx] for p in probs], y_val[train_idx])
        oof[test_idx] = np.tensordot(w, np.stack([p[test_idx] for p in probs]), 1)
    return voter, oof


def _concat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {v: np.concatenate([a[v], b[v]]) for v in a}


def preference(candidate: str) -> int:
    """Order among candidates tied on validation: unfitted combinations first (the
    geometric mean, where one confident view can veto a class, then the mean, then the
    vote), then fitted voters by parameter count, single views last."""
    return PREFERENCE.index(candidate) if candidate in PREFERENCE else len(PREFERENCE)


def choose(table: pd.DataFrame, n_val: int) -> str:
    """The candidate to keep: Breiman's one-standard-error rule. On a few hundred
    validation images the macro-F1 order of close candidates is mostly noise, and its
    top is the candidate that happens to fit that noise best; so every candidate within
    one standard error of the best (binomial, of the best's validation accuracy, at
    least one image) counts as tied, and the first of the tied in :func:`preference`
    order is kept."""
    best = table.sort_values("val_macro_f1", ascending=False).iloc[0]
    acc = float(best["val_accuracy"])
    se = max(np.sqrt(acc * (1 - acc) / n_val), 1.0 / n_val)
    tied = table[table["val_macro_f1"] >= best["val_macro_f1"] - se]
    return str(min(tied["candidate"], key=preference))


def fit_voter(val_probs: dict[str, np.ndarray], y_val: np.ndarray, n_classes: int,
              seed: int = 0, C: float = 1.0,
              oof: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
              mlp_hidden: int = 32) -> tuple[dict, pd.DataFrame]:
    """Fit and compare candidate voters; return the chosen voter and the candidates table.

    ``oof``: the views' out-of-fold probabilities of the training images and their
    labels; fitted candidates then learn from them and are scored on validation.
    """
    from triview.evaluate import task_of, tune_thresholds

    task = task_of(y_val)
    views = list(val_probs)
    rows: list[dict] = []
    voters: dict[str, dict] = {}
    scored: dict[str, np.ndarray] = {}  # what each candidate was scored on (validation)

    def add(name: str, voter: dict, prob: np.ndarray, fitted_on: str) -> None:
        voters[name] = {**voter, "task": task}
        scored[name] = prob
        rows.append({"candidate": name, "fitted_on": fitted_on,
                     **_scores(y_val, prob)})

    for name in FIXED_RULES:
        voter = {"method": name, "views": views, "task": task}
        add(name, voter, apply_voter(voter, val_probs), "-")
    for v in views:
        add(f"single:{v}", {"method": "single", "views": views, "view": v}, val_probs[v], "-")

    if oof is not None:  # fit on out-of-fold training predictions, score on validation
        fit_probs, fit_y, held, how = oof[0], oof[1], (val_probs, y_val), "train out-of-fold"
    else:                # cross-validate on validation
        fit_probs, fit_y, held, how = val_probs, y_val, None, "validation (cross-validated)"
    fitted = {"weighted": fit_weighted_voter(fit_probs, fit_y, n_classes, seed, held_out=held)}
    if task == "multiclass":
        fitted["logistic"] = fit_logistic_voter(fit_probs, fit_y, n_classes, seed, C, held_out=held)
    fitted["mlp"] = fit_mlp_voter(fit_probs, fit_y, n_classes, seed, mlp_hidden, held_out=held)
    for name, result in fitted.items():
        if result is not None:
            add(name, result[0], result[1], how)

    table = pd.DataFrame(rows)
    chosen = choose(table, len(y_val))
    table["chosen"] = table["candidate"] == chosen
    voter = voters[chosen]
    if oof is not None and chosen in fitted:  # refit the chosen one on everything it may see
        both, both_y = _concat(oof[0], val_probs), np.concatenate([oof[1], y_val])
        refit = {"weighted": lambda: fit_weighted_voter(both, both_y, n_classes, seed, held_out=held),
                 "logistic": lambda: fit_logistic_voter(both, both_y, n_classes, seed, C, held_out=held),
                 "mlp": lambda: fit_mlp_voter(both, both_y, n_classes, seed, mlp_hidden, held_out=held)}
        voter = {**refit[chosen]()[0], "task": task, "fitted_on": "train out-of-fold + validation"}
    voter = {**voter, "name": chosen,
             "val_macro_f1": float(table.loc[table["chosen"], "val_macro_f1"].iloc[0])}
    if task == "multilabel":
        voter["thresholds"] = tune_thresholds(y_val, scored[chosen]).tolist()
    return voter, table


def save_voter(voter: dict, table: pd.DataFrame, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / VOTER_FILE, json.dumps(voter, indent=2))
    atomic_write_text(out / CANDIDATES_FILE, table.to_csv(index=False))


def load_voter(folder: str | Path) -> dict:
    return json.loads((Path(folder) / VOTER_FILE).read_text())


def aligned(preds: dict[str, dict[str, np.ndarray]], split: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-view probabilities of one split aligned on image id; returns (probs, labels, ids)."""
    views = list(preds)
    ref_ids = preds[views[0]][f"{split}_ids"]
    order = np.argsort(ref_ids)
    ids = ref_ids[order]
    labels = preds[views[0]][f"{split}_labels"][order]
    out = {}
    for v in views:
        vid = preds[v][f"{split}_ids"]
        o = np.argsort(vid)
        if not np.array_equal(vid[o], ids):
            raise ValueError(f"view {v!r} was predicted on different {split} images")
        out[v] = preds[v][f"{split}_prob"][o]
    return out, labels, ids
