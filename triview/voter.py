"""The voter: combines the three views' probabilities into one prediction.

Every method is one class in :data:`VOTERS`, registered by name, with what it is:
how it is fitted (nothing, for the fixed rules), how it combines probabilities in numpy
(:meth:`VoterMethod.apply`), its torch module for the exported ensemble
(:meth:`VoterMethod.module`), and its rank among candidates tied on validation.

The candidates: mean of probabilities, their normalised geometric mean (a product of
experts: per label, the mean logit), majority vote (the sum of the views' one-hot label
vectors, ties broken by the mean probability; multi-label: per label, the share of views
that say yes), each single view, a weighted mean (view weights fitted by log-loss), and
learned voters on the concatenated log-probabilities: multinomial logistic regression
(multi-class) and a small MLP (one hidden ReLU layer; softmax, or sigmoid per label).

Fitted candidates are never judged on data they were fitted to. Without out-of-fold
inputs they are scored by cross-validated predictions on the validation split; with
``oof`` (the branches' out-of-fold probabilities of the training images, from
``voter_folds > 1``) they are fitted on those and scored on the whole validation split,
and the chosen one is refitted on both. The best by validation macro-F1 is kept, with
Breiman's one-standard-error rule (:func:`choose`). Multi-label voters carry per-label
decision thresholds tuned on validation.

``voter.json`` holds ``{"method", "params", "views", "task", "name", ...}``.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.neural_network import MLPClassifier

from triview import artifacts
from triview.scoring import selection_scores, task_of, tune_thresholds

EPS = 1e-6
VOTE_TIE_BREAK = 1e-3  # mean probability's share in the majority vote: breaks ties only

Probs = list[np.ndarray]            # one (N, C) array per view, in the voter's view order
HeldOut = tuple[Probs, np.ndarray] | None


def stack_features(probs: Probs) -> np.ndarray:
    """Features of the learned voters: concatenated log-probabilities of the views."""
    return np.concatenate([np.log(p + EPS) for p in probs], axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p + EPS) - np.log1p(EPS - p)


class VoterMethod:
    """One way of combining the views. Subclasses set ``name`` and ``rank`` and implement
    :meth:`apply` and :meth:`module`; fitted ones also :meth:`fit`."""
    name = ""
    rank = 99                 # lower wins among candidates tied on validation
    fitted = False
    multilabel = True         # also combines per-label (sigmoid) probabilities
    reads_every_view = True   # False: the exported graph computes only the views it reads

    def fit(self, probs: Probs, y: np.ndarray, n_classes: int, seed: int,
            held_out: HeldOut = None) -> tuple[dict, np.ndarray] | None:
        """Fitted parameters and the probabilities the candidate is scored with: its
        predictions on ``held_out`` when given, else cross-validated ones on ``probs``.
        None when the data are too few to fit it. Fixed rules fit nothing."""
        params: dict = {}
        return params, self.apply(params, held_out[0] if held_out else probs,
                                  task_of(y))

    def apply(self, params: dict, probs: Probs, task: str) -> np.ndarray:
        raise NotImplementedError

    def module(self, params: dict, n_views: int, n_classes: int, task: str):
        """The same combination as a torch ``nn.Module`` (``forward(list of (N, C)
        probabilities) -> (N, C)``), for the exported ensemble."""
        raise NotImplementedError


VOTERS: dict[str, VoterMethod] = {}


def register(cls: type[VoterMethod]) -> type[VoterMethod]:
    VOTERS[cls.name] = cls()
    return cls


def get_method(name: str) -> VoterMethod:
    if name not in VOTERS:
        raise ValueError(f"unknown voter method {name!r}; known: {sorted(VOTERS)}")
    return VOTERS[name]


@register
class GeometricMean(VoterMethod):
    """Normalised geometric mean: a product of experts, where one confident view can veto
    a class (multi-label: the mean logit per label)."""
    name, rank = "geomean", 0

    def apply(self, params, probs, task):
        if task == "multilabel":
            return _sigmoid(np.mean([_logit(p) for p in probs], 0))
        return _softmax(np.mean([np.log(p + EPS) for p in probs], 0))

    def module(self, params, n_views, n_classes, task):
        from triview import voter_modules

        return voter_modules.GeometricMean(task == "multilabel", EPS)


@register
class Mean(VoterMethod):
    name, rank = "mean", 1

    def apply(self, params, probs, task):
        return np.mean(probs, axis=0)

    def module(self, params, n_views, n_classes, task):
        from triview import voter_modules

        return voter_modules.WeightedMean([1.0 / n_views] * n_views)


@register
class MajorityVote(VoterMethod):
    """Sum of the views' one-hot label vectors, ties broken by the mean probability
    (multi-label: per label, the share of views at or above 0.5)."""
    name, rank = "vote", 2

    def apply(self, params, probs, task):
        stacked = np.stack(probs)
        if task == "multilabel":
            return (1 - VOTE_TIE_BREAK) * (stacked >= 0.5).mean(0) + VOTE_TIE_BREAK * stacked.mean(0)
        votes = np.eye(stacked.shape[-1])[stacked.argmax(-1)].sum(0)
        score = votes + VOTE_TIE_BREAK * stacked.mean(0)
        return score / score.sum(axis=1, keepdims=True)

    def module(self, params, n_views, n_classes, task):
        from triview import voter_modules

        return voter_modules.MajorityVote(n_classes, task == "multilabel", VOTE_TIE_BREAK)


@register
class Weighted(VoterMethod):
    """Weighted mean of the views' probabilities, weights on the simplex fitted by
    log-loss (multi-label: binary cross-entropy over every label)."""
    name, rank, fitted = "weighted", 3, True

    def fit(self, probs, y, n_classes, seed, held_out=None):
        params = {"weights": _fit_weights(probs, y).tolist()}
        if held_out is not None:
            return params, self.apply(params, held_out[0], task_of(y))
        folds = min(5, len(y) // 2)
        if folds < 2:
            return params, self.apply(params, probs, task_of(y))
        oof = np.zeros(probs[0].shape)
        for train_idx, test_idx in KFold(folds, shuffle=True, random_state=seed).split(y):
            w = _fit_weights([p[train_idx] for p in probs], y[train_idx])
            oof[test_idx] = np.tensordot(w, np.stack([p[test_idx] for p in probs]), 1)
        return params, oof

    def apply(self, params, probs, task):
        return np.tensordot(np.asarray(params["weights"]), np.stack(probs), 1)

    def module(self, params, n_views, n_classes, task):
        from triview import voter_modules

        return voter_modules.WeightedMean(params["weights"])


@register
class Logistic(VoterMethod):
    """Multinomial logistic regression on the views' log-probabilities (multi-class)."""
    name, rank, fitted, multilabel = "logistic", 4, True, False
    C = 1.0

    def fit(self, probs, y, n_classes, seed, held_out=None):
        X = stack_features(probs)
        present = np.unique(y)
        folds = min(5, int(np.bincount(y, minlength=n_classes)[present].min()))
        if folds < 2 and held_out is None:
            return None
        model = LogisticRegression(C=self.C, max_iter=2000)
        oof = None
        if held_out is None:
            cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            oof = np.zeros((len(y), n_classes))
            oof[:, present] = cross_val_predict(model, X, y, cv=cv, method="predict_proba")
        model.fit(X, y)
        coef = np.zeros((n_classes, X.shape[1]))
        intercept = np.full(n_classes, -1e4)  # classes never seen in fitting are never predicted
        binary = len(model.classes_) == 2
        coef[model.classes_] = np.vstack([-model.coef_, model.coef_]) / 2 if binary else model.coef_
        intercept[model.classes_] = (np.concatenate([-model.intercept_, model.intercept_]) / 2
                                     if binary else model.intercept_)
        params = {"C": self.C, "coef": coef.tolist(), "intercept": intercept.tolist(),
                  "cv_folds": folds}
        return params, (self.apply(params, held_out[0], "multiclass") if held_out else oof)

    def apply(self, params, probs, task):
        logits = stack_features(probs) @ np.asarray(params["coef"]).T + np.asarray(params["intercept"])
        return _softmax(logits)

    def module(self, params, n_views, n_classes, task):
        from triview import voter_modules

        return voter_modules.LogisticHead(params["coef"], params["intercept"], EPS)


@register
class Mlp(VoterMethod):
    """One hidden ReLU layer on the views' log-probabilities (scikit-learn's
    MLPClassifier; softmax, or sigmoid per label)."""
    name, rank, fitted = "mlp", 5, True
    hidden = 32

    def _model(self, seed: int) -> MLPClassifier:
        return MLPClassifier(hidden_layer_sizes=(self.hidden,), alpha=1e-2, max_iter=800,
                             learning_rate_init=3e-3, random_state=seed)

    def _params(self, model: MLPClassifier, n_classes: int, task: str) -> dict:
        """Plain weights; classes absent from the fitting data get a very low logit
        (multi-class) so that they are never predicted."""
        w1, w2 = model.coefs_
        b1, b2 = model.intercepts_
        if task == "multiclass":
            full_w2 = np.zeros((w2.shape[0], n_classes))
            full_b2 = np.full(n_classes, -1e4)
            full_w2[:, model.classes_] = w2
            full_b2[model.classes_] = b2
            w2, b2 = full_w2, full_b2
        return {"hidden": int(w1.shape[1]), "w1": w1.tolist(), "b1": b1.tolist(),
                "w2": w2.tolist(), "b2": b2.tolist()}

    def fit(self, probs, y, n_classes, seed, held_out=None):
        task = task_of(y)
        X = stack_features(probs)
        if task == "multiclass":
            present = np.unique(y)
            if len(present) < 3 or np.bincount(y, minlength=n_classes)[present].min() < 2:
                return None
        with _quiet_convergence():
            if held_out is not None:
                params = self._params(self._model(seed).fit(X, y), n_classes, task)
                return params, self.apply(params, held_out[0], task)
            folds = (min(5, int(np.bincount(y, minlength=n_classes)[np.unique(y)].min()))
                     if task == "multiclass" else min(5, len(y)))
            splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed)
                        if task == "multiclass" else KFold(folds, shuffle=True, random_state=seed))
            oof = np.zeros((len(y), n_classes))
            for train_idx, test_idx in splitter.split(X, y if task == "multiclass" else None):
                fold = self._params(self._model(seed).fit(X[train_idx], y[train_idx]), n_classes, task)
                oof[test_idx] = self.apply(fold, [p[test_idx] for p in probs], task)
            params = self._params(self._model(seed).fit(X, y), n_classes, task)
        return params, oof

    def apply(self, params, probs, task):
        hidden = np.maximum(stack_features(probs) @ np.asarray(params["w1"]) + np.asarray(params["b1"]), 0)
        logits = hidden @ np.asarray(params["w2"]) + np.asarray(params["b2"])
        return _sigmoid(logits) if task == "multilabel" else _softmax(logits)

    def module(self, params, n_views, n_classes, task):
        from triview import voter_modules

        return voter_modules.MlpHead(params["w1"], params["b1"], params["w2"], params["b2"],
                                     task == "multilabel", EPS)


@register
class SingleView(VoterMethod):
    """One view alone (``params["view"]``): the baseline every combination must beat."""
    name, rank = "single", 6
    reads_every_view = False

    def apply(self, params, probs, task):
        return probs[params["index"]]

    def module(self, params, n_views, n_classes, task):
        from triview import voter_modules

        return voter_modules.Pick(params["index"])


@contextlib.contextmanager
def _quiet_convergence():
    """MLPClassifier warns when max_iter ends the fit; the voter is scored, not trusted."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _fit_weights(probs: Probs, y: np.ndarray) -> np.ndarray:
    """View weights on the simplex minimising the log-loss of the weighted mean
    (multi-label: the binary cross-entropy over every label)."""
    from scipy.optimize import minimize

    stacked = np.stack(probs)                      # (V, N, C)
    if y.ndim == 2:
        def loss(theta: np.ndarray) -> float:
            w = np.exp(theta - theta.max())
            p = np.clip(np.tensordot(w / w.sum(), stacked, 1), EPS, 1 - EPS)
            return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    else:
        picked = stacked[:, np.arange(len(y)), y]  # (V, N): each view's probability of the truth

        def loss(theta: np.ndarray) -> float:
            w = np.exp(theta - theta.max())
            return float(-np.log((w / w.sum()) @ picked + EPS).mean())

    theta = minimize(loss, np.zeros(len(probs)), method="Nelder-Mead",
                     options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000}).x
    w = np.exp(theta - theta.max())
    return w / w.sum()


# ----------------------------------------------------------------------------- voters


def apply_voter(voter: dict, probs: dict[str, np.ndarray]) -> np.ndarray:
    """Ensemble probabilities (N, C) from per-view probabilities, as the voter says."""
    voter = upgrade(voter)
    method = get_method(voter["method"])
    return method.apply(voter["params"], [probs[v] for v in voter["views"]],
                        voter.get("task", "multiclass"))


def upgrade(voter: dict) -> dict:
    """A ``voter.json`` of triview 0.1 (method fields at the top level) in today's form."""
    if "params" in voter:
        return voter
    method = voter["method"]
    keep = {"method", "views", "task", "name", "val_macro_f1", "thresholds", "seed", "fitted_on"}
    params = {k: v for k, v in voter.items() if k not in keep}
    if method == "single":
        params = {"view": voter["view"], "index": list(voter["views"]).index(voter["view"])}
    return {**{k: v for k, v in voter.items() if k in keep}, "params": params}


def preference(candidate: str) -> int:
    """Order among candidates tied on validation (``single:<view>`` ranks as ``single``)."""
    return get_method(candidate.split(":")[0]).rank


def choose(table: pd.DataFrame, n_val: int) -> str:
    """The candidate to keep: Breiman's one-standard-error rule. On a few hundred
    validation images the macro-F1 order of close candidates is mostly noise, and its
    top is the candidate that happens to fit that noise best; so every candidate within
    one standard error of the best (binomial, of the best's validation accuracy, at
    least one image) counts as tied, and the lowest ``rank`` among the tied is kept:
    unfitted combinations first, then fitted voters by parameter count, single views last."""
    best = table.sort_values("val_macro_f1", ascending=False).iloc[0]
    acc = float(best["val_accuracy"])
    se = max(np.sqrt(acc * (1 - acc) / n_val), 1.0 / n_val)
    tied = table[table["val_macro_f1"] >= best["val_macro_f1"] - se]
    return str(min(tied["candidate"], key=preference))


def fit_voter(val_probs: dict[str, np.ndarray], y_val: np.ndarray, n_classes: int,
              seed: int = 0, oof: tuple[dict[str, np.ndarray], np.ndarray] | None = None
              ) -> tuple[dict, pd.DataFrame]:
    """Fit and compare every registered method; return the chosen voter and the
    candidates table (validation accuracy, macro-F1 and log-loss of each).

    ``oof``: the views' out-of-fold probabilities of the training images and their
    labels; fitted candidates then learn from them and are scored on validation.
    """
    task = task_of(y_val)
    views = list(val_probs)
    val = [val_probs[v] for v in views]
    if oof is not None:  # fit on out-of-fold training predictions, score on validation
        fit_probs, fit_y, held = [oof[0][v] for v in views], oof[1], (val, y_val)
        how = "train out-of-fold"
    else:                # cross-validate on validation
        fit_probs, fit_y, held, how = val, y_val, None, "validation (cross-validated)"

    rows, params, scored = [], {}, {}
    for method in VOTERS.values():
        if task == "multilabel" and not method.multilabel:
            continue
        if method.name == "single":
            candidates = [(f"single:{v}", {"view": v, "index": k}, val[k], "-")
                          for k, v in enumerate(views)]
        elif not method.fitted:
            candidates = [(method.name, {}, method.apply({}, val, task), "-")]
        else:
            result = method.fit(fit_probs, fit_y, n_classes, seed, held_out=held)
            candidates = [] if result is None else [(method.name, result[0], result[1], how)]
        for name, p, prob, fitted_on in candidates:
            params[name], scored[name] = p, prob
            rows.append({"candidate": name, "fitted_on": fitted_on,
                         **selection_scores(y_val, prob)})

    table = pd.DataFrame(rows)
    chosen = choose(table, len(y_val))
    table["chosen"] = table["candidate"] == chosen
    method = get_method(chosen.split(":")[0])
    voter = {"method": method.name, "params": params[chosen], "views": views, "task": task,
             "name": chosen, "val_macro_f1": float(table.loc[table["chosen"], "val_macro_f1"].iloc[0])}
    if oof is not None and method.fitted:  # refit the chosen one on everything it may see
        both = [np.concatenate([a, b]) for a, b in zip(fit_probs, val)]
        voter["params"] = method.fit(both, np.concatenate([fit_y, y_val]), n_classes, seed,
                                     held_out=held)[0]
        voter["fitted_on"] = "train out-of-fold + validation"
    if task == "multilabel":
        voter["thresholds"] = tune_thresholds(y_val, scored[chosen]).tolist()
    return voter, table


def save_voter(voter: dict, table: pd.DataFrame, out_dir: str | Path) -> None:
    out = Path(out_dir)
    artifacts.write_voter(out, voter)
    from triview.storage import atomic_write_text

    atomic_write_text(out / artifacts.CANDIDATES_FILE, table.to_csv(index=False))


def load_voter(folder: str | Path) -> dict:
    return upgrade(artifacts.load_voter(folder))


def aligned(preds: dict[str, dict[str, np.ndarray]], split: str
            ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
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
