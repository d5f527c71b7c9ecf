"""The voter: combines the three views' probabilities into one prediction.

Every method is one class in :data:`VOTERS`, registered by name, with what it is:
how it is fitted (nothing, for the fixed rules), how it combines probabilities in numpy
(:meth:`VoterMethod.apply`), its torch module for the exported ensemble
(:meth:`VoterMethod.module`), and its rank among candidates tied on held-out images.

The candidates: mean of probabilities, their normalised geometric mean (a product of
experts: per label, the mean logit), majority vote (the sum of the views' one-hot label
vectors, ties broken by the mean probability; multi-label: per label, the share of views
that say yes), each single view, a weighted mean (view weights fitted by log-loss), and
learned voters on the concatenated log-probabilities: multinomial logistic regression
(multi-class) and a small MLP (one hidden ReLU layer; softmax, or sigmoid per label).

The voter is fitted and chosen on the views' held-out probabilities: by default the
branches' out-of-fold predictions of every training and validation image (the heads are
cross-fitted, :mod:`triview.train.head`), else validation (fine-tuned branches), with the
fold models' out-of-fold training predictions added when the branches ran with
``voter_folds > 1``. Fitted candidates are never judged on data they were fitted to: they
are scored by cross-validated predictions on those images, then refitted on all of them.
The choice (:func:`choose`) keeps the simplest candidate whose held-out errors are within
noise of the best's, so that a combination is never preferred to a single view it trails
by more than noise. A temperature fitted on the chosen candidate's held-out predictions
calibrates the ensemble's probabilities (:mod:`triview.temperature`); multi-label voters
carry per-label decision thresholds tuned on the calibrated held-out predictions.

``voter.json`` holds ``{"method", "params", "views", "task", "name", "temperature",
"scored_on", "n_scored", ...}``.
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
from triview.scoring import predicted, selection_scores, task_of, tune_thresholds
from triview.temperature import sigmoid, softmax

EPS = 1e-6
VOTE_TIE_BREAK = 1e-3  # mean probability's share in the majority vote: breaks ties only

Probs = list[np.ndarray]            # one (N, C) array per view, in the voter's view order
HeldOut = tuple[Probs, np.ndarray] | None


def stack_features(probs: Probs) -> np.ndarray:
    """Features of the learned voters: concatenated log-probabilities of the views."""
    return np.concatenate([np.log(p + EPS) for p in probs], axis=1)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p + EPS) - np.log1p(EPS - p)


class VoterMethod:
    """One way of combining the views. Subclasses set ``name`` and ``rank`` and implement
    :meth:`apply` and :meth:`module`; fitted ones also :meth:`fit`."""
    name = ""
    rank = 99                 # lower wins among candidates tied on held-out images
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
            return sigmoid(np.mean([_logit(p) for p in probs], 0))
        return softmax(np.mean([np.log(p + EPS) for p in probs], 0))

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
        return softmax(logits)

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
        return sigmoid(logits) if task == "multilabel" else softmax(logits)

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


def apply_voter(voter: dict, probs: dict[str, np.ndarray], calibrated: bool = True) -> np.ndarray:
    """Ensemble probabilities (N, C) from per-view probabilities, as the voter says, with
    the voter's temperature (``calibrated=False``: without it)."""
    from triview.temperature import scale_probabilities

    voter = upgrade(voter)
    method = get_method(voter["method"])
    task = voter.get("task", "multiclass")
    out = method.apply(voter["params"], [probs[v] for v in voter["views"]], task)
    if calibrated and voter.get("temperature") is not None:
        out = scale_probabilities(out, voter["temperature"], task)
    return out


def upgrade(voter: dict) -> dict:
    """A ``voter.json`` of triview 0.1 (method fields at the top level) in today's form."""
    if "params" in voter:
        return voter
    method = voter["method"]
    keep = {"method", "views", "task", "name", "val_macro_f1", "thresholds", "seed", "fitted_on",
            "temperature", "scored_on", "n_scored"}
    params = {k: v for k, v in voter.items() if k not in keep}
    if method == "single":
        params = {"view": voter["view"], "index": list(voter["views"]).index(voter["view"])}
    return {**{k: v for k, v in voter.items() if k in keep}, "params": params}


def preference(candidate: str) -> int:
    """Order among tied candidates (``single:<view>`` ranks as ``single``)."""
    return get_method(candidate.split(":")[0]).rank


def correct_of(y: np.ndarray, prob: np.ndarray, thresholds=None) -> np.ndarray:
    """Per image: is the prediction right (multi-label: every label)."""
    task = task_of(y)
    pred = predicted(prob, task, thresholds)
    return (pred == y).all(axis=1) if task == "multilabel" else pred == y


def choose(table: pd.DataFrame, correct: dict[str, np.ndarray]) -> str:
    """The candidate to keep. The best by held-out macro-F1 (ties: lower log-loss) sets
    the mark; a candidate counts as tied with it when it gets at most one standard error
    of the paired difference more images wrong: with d images where exactly one of the
    two is right, sqrt(d), at least one image. Among the tied the lowest ``rank`` wins
    (unfitted combinations, then fitted voters by parameter count, single views last), so
    a combination is kept only when it is no worse than any single view beyond that noise,
    and a single view wins only when every combination trails it by more than noise."""
    ordered = table.sort_values(["val_macro_f1", "val_log_loss"], ascending=[False, True])
    best = str(ordered.iloc[0]["candidate"])
    tied = []
    for name in table["candidate"]:
        worse = int((correct[best] & ~correct[name]).sum())
        better = int((correct[name] & ~correct[best]).sum())
        if worse - better <= max(1.0, np.sqrt(worse + better)):
            tied.append(str(name))
    return min(tied, key=preference)


def fit_voter(probs: dict[str, np.ndarray], y: np.ndarray, n_classes: int, seed: int = 0,
              scored_on: str = "validation") -> tuple[dict, pd.DataFrame]:
    """Fit and compare every registered method on the views' held-out probabilities
    ``probs`` (one (N, C) array per view, aligned) and labels ``y``; return the chosen
    voter, calibrated, and the candidates table (held-out accuracy, macro-F1, log-loss)."""
    from triview.temperature import fit_probability_temperature, scale_probabilities

    task = task_of(y)
    views = list(probs)
    held = [probs[v] for v in views]
    how = f"{scored_on} (cross-validated)"
    rows, params, scored = [], {}, {}
    for method in VOTERS.values():
        if task == "multilabel" and not method.multilabel:
            continue
        if method.name == "single":
            candidates = [(f"single:{v}", {"view": v, "index": k}, held[k], "-")
                          for k, v in enumerate(views)]
        elif not method.fitted:
            candidates = [(method.name, {}, method.apply({}, held, task), "-")]
        else:  # parameters fitted on every image, scored by cross-validated predictions
            result = method.fit(held, y, n_classes, seed)
            candidates = [] if result is None else [(method.name, result[0], result[1], how)]
        for name, p, prob, fitted_on in candidates:
            params[name], scored[name] = p, prob
            rows.append({"candidate": name, "fitted_on": fitted_on, **selection_scores(y, prob)})

    table = pd.DataFrame(rows)
    correct = {name: correct_of(y, scored[name], tune_thresholds(y, scored[name])
                                if task == "multilabel" else None) for name in scored}
    chosen = choose(table, correct)
    table["errors"] = [int((~correct[name]).sum()) for name in table["candidate"]]
    table["chosen"] = table["candidate"] == chosen
    method = get_method(chosen.split(":")[0])
    temperature = fit_probability_temperature(scored[chosen], y, task)
    calibrated = scale_probabilities(scored[chosen], temperature, task)
    voter = {"method": method.name, "params": params[chosen], "views": views, "task": task,
             "name": chosen, "temperature": temperature, "scored_on": scored_on,
             "n_scored": int(len(y)),
             "val_macro_f1": float(table.loc[table["chosen"], "val_macro_f1"].iloc[0]),
             "fitted_on": scored_on if method.fitted else "-"}
    if task == "multilabel":
        voter["thresholds"] = tune_thresholds(y, calibrated).tolist()
    return voter, table


def save_voter(voter: dict, table: pd.DataFrame, out_dir: str | Path) -> None:
    out = Path(out_dir)
    artifacts.write_voter(out, voter)
    from triview.storage import atomic_write_text

    atomic_write_text(out / artifacts.CANDIDATES_FILE, table.to_csv(index=False))


def load_voter(folder: str | Path) -> dict:
    return upgrade(artifacts.load_voter(folder))


def held_out_set(preds: dict[str, dict[str, np.ndarray]]
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, str]:
    """What the voter is fitted and chosen on: every view's held-out probabilities of the
    same images, aligned on image id, with their labels, ids and what they are. The
    branches' out-of-fold predictions (``oof_*``) where all have them, plus the validation
    images they do not cover; else validation alone. Test predictions are never read."""
    if not all("oof_prob" in p for p in preds.values()):
        probs, y, ids = aligned(preds, "val")
        return probs, y, ids, "validation"
    oof, y_oof, ids_oof = aligned(preds, "oof")
    val, y_val, ids_val = aligned(preds, "val")
    extra = ~np.isin(ids_val, ids_oof)
    if not extra.any():
        return oof, y_oof, ids_oof, "out-of-fold (train + validation)"
    probs = {v: np.concatenate([oof[v], val[v][extra]]) for v in oof}
    return (probs, np.concatenate([y_oof, y_val[extra]]), np.concatenate([ids_oof, ids_val[extra]]),
            "train out-of-fold + validation")


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
