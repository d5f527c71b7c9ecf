"""Balance: per-split class counts and the class weights handed to training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from triview import manifest as mf
from triview.params import stage_config
from triview.storage import atomic_write_text

DEFAULTS = stage_config("balance", {})

BALANCE_FILE = "balance.json"
COUNTS_FILE = "class_counts.csv"


def split_class_counts(views: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Images (not crops) per class and split; rows are classes in label-encoding order."""
    images = views[views["augmented"] == 0].drop_duplicates("image_id")
    counts = (images.groupby(["label", "split"]).size().unstack(fill_value=0)
              .reindex(index=classes, columns=list(mf.SPLITS), fill_value=0))
    counts.index.name = "label"
    return counts


def inverse_frequency_weights(train_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """w_c = N / (C * n_c) (scikit-learn's "balanced"); classes absent from train get 0."""
    present = np.unique(train_labels)
    weights = np.zeros(n_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=train_labels)
    return weights


def effective_number_weights(train_labels: np.ndarray, n_classes: int, beta: float = 0.999) -> np.ndarray:
    """Class-balanced weights of Cui et al. (2019): w_c ∝ (1 − β) / (1 − β^n_c),
    normalised to sum to the number of classes present; absent classes get 0."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    return weights * (present.sum() / weights.sum())


WEIGHTINGS = {
    "none": lambda y, n, beta: (np.bincount(y, minlength=n) > 0).astype(np.float64),
    "inverse_frequency": lambda y, n, beta: inverse_frequency_weights(y, n),
    "effective_number": effective_number_weights,
}


RESAMPLING = ("none", "oversample", "undersample")


def resample_plan(image_ids: np.ndarray, labels: np.ndarray, strategy: str = "none",
                  target: float = 0.0, seed: int = 0) -> dict[str, int]:
    """How many times each training image is used per epoch.

    ``oversample`` raises every class to a target count by repeating its images
    (``target`` 0: the largest class; 0 < target <= 1: that share of the largest
    class; > 1: that count); ``undersample`` lowers every class to the target by
    dropping images (0: the smallest class). Repeats and drops are spread evenly
    and chosen with ``seed``.
    """
    if strategy not in RESAMPLING:
        raise ValueError(f"resample must be one of {RESAMPLING}, got {strategy!r}")
    plan = {str(i): 1 for i in image_ids}
    if strategy == "none":
        return plan
    rng = np.random.default_rng(seed)
    counts = {c: int((labels == c).sum()) for c in np.unique(labels)}
    largest, smallest = max(counts.values()), min(counts.values())
    if target <= 0:
        goal = largest if strategy == "oversample" else smallest
    elif target <= 1:
        goal = int(round(target * largest))
    else:
        goal = int(target)
    for c, n in counts.items():
        members = np.asarray(image_ids)[labels == c]
        want = max(n, goal) if strategy == "oversample" else min(n, goal)
        each, extra = divmod(want, n)
        chosen = set(rng.choice(members, size=extra, replace=False).tolist()) if extra else set()
        for i in members:
            plan[str(i)] = each + (1 if i in chosen else 0)
    return plan


def label_statistics(labels: pd.Series, classes: list[str]) -> dict:
    """Per-label positives and ``pos_weight`` = negatives / positives (multi-label BCE)."""
    sets = labels.fillna("").map(lambda s: set(filter(None, s.split(";"))))
    n = len(sets)
    pos = {c: int(sum(c in s for s in sets)) for c in classes}
    return {"positives": pos,
            "pos_weight": {c: (round((n - p) / p, 6) if p else 0.0) for c, p in pos.items()}}


def _plot_counts(counts: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = counts.plot.bar(figsize=(max(5, 0.5 * len(counts)), 3.5), width=0.8)
    ax.set_ylabel("images")
    ax.set_title("images per class and split")
    fig = ax.get_figure()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def balance(views_dir: str | Path, out_dir: str | Path, weighting: str = DEFAULTS["weighting"],
            beta: float = DEFAULTS["beta"], resample: str = DEFAULTS["resample"],
            target: float = DEFAULTS["target"], seed: int = DEFAULTS["seed"]) -> dict:
    """Analyse the class balance and decide how training compensates for it.

    Writes ``class_counts.csv`` (per split), ``class_counts.png`` and ``balance.json``
    (counts, imbalance ratios, class weights, per-label pos_weight and the training
    resampling plan). Only the training split is ever resampled.
    ``weighting`` is one of :data:`WEIGHTINGS`; ``beta`` is the effective-number β.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
    views = mf.read_views(views_dir)
    classes = mf.read_classes(views_dir)
    counts = split_class_counts(views, classes)
    train = views[(views["split"] == "train") & (views["augmented"] == 0)].drop_duplicates("image_id")
    y = mf.encode_labels(train["label"], classes).to_numpy()
    weights = WEIGHTINGS[weighting](y, len(classes), beta)
    train_counts = counts["train"]
    plan = resample_plan(train["image_id"].to_numpy(), train["label"].to_numpy(), resample,
                         target, seed)
    resampled = pd.Series({c: 0 for c in classes})
    for image_id, label in zip(train["image_id"], train["label"]):
        resampled[label] += plan[str(image_id)]
    result = {
        "classes": classes,
        "strategy": weighting,
        "beta": beta if weighting == "effective_number" else None,
        "class_weights": [round(float(w), 6) for w in weights],
        "counts": {split: {c: int(counts.loc[c, split]) for c in classes} for split in mf.SPLITS},
        "imbalance_ratio": float(train_counts.max() / max(1, train_counts.min())),
        "imbalance_ratio_per_split": {
            split: float(counts[split].max() / max(1, counts[split].min())) for split in mf.SPLITS},
        "labels": label_statistics(train["labels"], classes),
        "resample": {"strategy": resample, "target": target,
                     "train_counts_after": {c: int(resampled[c]) for c in classes}},
        "train_multiplicity": plan,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / COUNTS_FILE, counts.to_csv())
    _plot_counts(counts, out / "class_counts.png")
    atomic_write_text(out / BALANCE_FILE, json.dumps(result, indent=2))
    return result


def read_balance(folder: str | Path) -> dict:
    return json.loads((Path(folder) / BALANCE_FILE).read_text())
