"""The voter: combines the three views' class probabilities into one prediction.

Candidates are scored on the validation split, which no branch trained on:
mean of probabilities, each single view, majority vote (the sum of the views'
one-hot label vectors, ties broken by the mean probability), a weighted mean
(view weights fitted by log-loss), and a learned voter (multinomial logistic
regression on the concatenated log-probabilities). Fitted candidates are scored by
cross-validated predictions so that they are not judged on data they were fitted to.
The best by validation macro-F1 is kept; ties go to the simpler candidate.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from triview.storage import atomic_write_text

VOTER_FILE = "voter.json"
CANDIDATES_FILE = "candidates.csv"
EPS = 1e-6
VOTE_TIE_BREAK = 1e-3  # mean probability's share in the majority vote: breaks ties only


def stack_features(probs: list[np.ndarray]) -> np.ndarray:
    """Features of the learned voter: concatenated log-probabilities of the views."""
    return np.concatenate([np.log(p + EPS) for p in probs], axis=1)


def apply_voter(voter: dict, probs: dict[str, np.ndarray]) -> np.ndarray:
    """Ensemble probabilities (N, C) from per-view probabilities, as the voter says."""
    method, views = voter["method"], voter["views"]
    if method == "mean":
        return np.mean([probs[v] for v in views], axis=0)
    if method == "weighted":
        return np.tensordot(np.asarray(voter["weights"]), np.stack([probs[v] for v in views]), 1)
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
    pred = prob.argmax(1)
    return {"val_accuracy": float(accuracy_score(y, pred)),
            "val_macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}


def fit_logistic_voter(val_probs: dict[str, np.ndarray], y_val: np.ndarray, n_classes: int,
                       seed: int = 0, C: float = 1.0) -> tuple[dict, np.ndarray] | None:
    """Multinomial logistic regression on the views' log-probabilities.

    Returns the voter and its out-of-fold validation probabilities (what it is
    scored on), or None when some class has fewer than 2 validation images.
    """
    views = list(val_probs)
    X = stack_features([val_probs[v] for v in views])
    present = np.unique(y_val)
    folds = min(5, int(np.bincount(y_val, minlength=n_classes)[present].min()))
    if folds < 2:
        return None
    lr = LogisticRegression(C=C, max_iter=2000)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    oof = np.zeros((len(y_val), n_classes))
    oof[:, present] = cross_val_predict(lr, X, y_val, cv=cv, method="predict_proba")
    lr.fit(X, y_val)
    coef = np.zeros((n_classes, X.shape[1]))
    intercept = np.full(n_classes, -1e4)  # classes never seen on validation are never predicted
    coef[lr.classes_] = lr.coef_
    intercept[lr.classes_] = lr.intercept_
    voter = {"method": "logistic", "views": views, "C": C, "coef": coef.tolist(),
             "intercept": intercept.tolist(), "cv_folds": folds}
    return voter, oof


def _fit_weights(probs: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """View weights on the simplex minimising the log-loss of the weighted mean."""
    from scipy.optimize import minimize

    stacked = np.stack(probs)                      # (V, N, C)
    picked = stacked[:, np.arange(len(y)), y]      # (V, N): each view's probability of the truth

    def loss(theta: np.ndarray) -> float:
        w = np.exp(theta - theta.max())
        w /= w.sum()
        return float(-np.log(w @ picked + EPS).mean())

    theta = minimize(loss, np.zeros(len(probs)), method="Nelder-Mead",
                     options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000}).x
    w = np.exp(theta - theta.max())
    return w / w.sum()


def fit_weighted_voter(val_probs: dict[str, np.ndarray], y_val: np.ndarray, n_classes: int,
                       seed: int = 0) -> tuple[dict, np.ndarray]:
    """Weighted mean of the views' probabilities; returns the voter (weights fitted on the
    whole validation split) and its out-of-fold validation probabilities."""
    views = list(val_probs)
    probs = [val_probs[v] for v in views]
    folds = min(5, int(np.bincount(y_val).max())) if len(y_val) >= 4 else 1
    oof = np.zeros((len(y_val), n_classes))
    if folds >= 2:
        from sklearn.model_selection import KFold

        for train_idx, test_idx in KFold(folds, shuffle=True, random_state=seed).split(y_val):
            w = _fit_weights([p[train_idx] for p in probs], y_val[train_idx])
            oof[test_idx] = np.tensordot(w, np.stack([p[test_idx] for p in probs]), 1)
    weights = _fit_weights(probs, y_val)
    if folds < 2:
        oof = np.tensordot(weights, np.stack(probs), 1)
    return {"method": "weighted", "views": views, "weights": weights.tolist()}, oof


def fit_voter(val_probs: dict[str, np.ndarray], y_val: np.ndarray, n_classes: int,
              seed: int = 0, C: float = 1.0) -> tuple[dict, pd.DataFrame]:
    """Fit and compare candidate voters; return the chosen voter and the candidates table."""
    views = list(val_probs)
    rows: list[dict] = []
    voters: dict[str, dict] = {}

    voters["mean"] = {"method": "mean", "views": views}
    rows.append({"candidate": "mean", "complexity": 1,
                 **_scores(y_val, apply_voter(voters["mean"], val_probs))})
    voters["vote"] = {"method": "vote", "views": views}
    rows.append({"candidate": "vote", "complexity": 1,
                 **_scores(y_val, apply_voter(voters["vote"], val_probs))})
    voters["weighted"], oof_w = fit_weighted_voter(val_probs, y_val, n_classes, seed=seed)
    rows.append({"candidate": "weighted", "complexity": 2, **_scores(y_val, oof_w)})
    for v in views:
        name = f"single:{v}"
        voters[name] = {"method": "single", "views": views, "view": v}
        rows.append({"candidate": name, "complexity": 0, **_scores(y_val, val_probs[v])})

    fitted = fit_logistic_voter(val_probs, y_val, n_classes, seed=seed, C=C)
    if fitted is not None:
        voters["logistic"], oof = fitted
        rows.append({"candidate": "logistic", "complexity": 3, **_scores(y_val, oof)})

    table = pd.DataFrame(rows)
    ranked = table.sort_values(["val_macro_f1", "complexity"], ascending=[False, True])
    chosen = ranked.iloc[0]["candidate"]
    table["chosen"] = table["candidate"] == chosen
    voter = {**voters[chosen], "name": chosen,
             "val_macro_f1": float(ranked.iloc[0]["val_macro_f1"])}
    return voter, table.drop(columns="complexity")


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
