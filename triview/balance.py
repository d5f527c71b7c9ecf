"""Balance: per-split class counts and the class weights handed to training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from triview import manifest as mf
from triview.storage import atomic_write_text

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


def balance(views_dir: str | Path, out_dir: str | Path, weighting: str = "inverse_frequency",
            beta: float = 0.999) -> dict:
    """Write ``class_counts.csv`` and ``balance.json`` (classes, counts, class weights).

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
    result = {
        "classes": classes,
        "strategy": weighting,
        "beta": beta if weighting == "effective_number" else None,
        "class_weights": [round(float(w), 6) for w in weights],
        "counts": {split: {c: int(counts.loc[c, split]) for c in classes} for split in mf.SPLITS},
        "imbalance_ratio": float(train_counts.max() / max(1, train_counts.min())),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / COUNTS_FILE, counts.to_csv())
    atomic_write_text(out / BALANCE_FILE, json.dumps(result, indent=2))
    return result


def read_balance(folder: str | Path) -> dict:
    return json.loads((Path(folder) / BALANCE_FILE).read_text())
