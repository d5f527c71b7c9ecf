"""Out-of-fold voter inputs: K fold models per branch, each predicting the training
images it did not see."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from triview import distributed as ddp
from triview import storage
from triview.train.config import TrainConfig
from triview.train.data import ViewData
from triview.models import TTA_MODES, ServedBranch
from triview.train.features import FeatureStore
from triview.train.loop import fit, predict_logits


def _held_out_rows(data: ViewData, task: str, folds: int, seed: int) -> list[np.ndarray]:
    """For each of ``folds`` folds of the training images, the rows of its real crops
    (one per image id), stratified by class for multi-class data."""
    from sklearn.model_selection import KFold, StratifiedKFold

    real = data.real.numpy() if data.real is not None else np.ones(len(data.image_ids), bool)
    first: dict[str, int] = {}
    for i, image_id in enumerate(data.image_ids):
        if real[i]:
            first.setdefault(image_id, i)
    rows = np.array(list(first.values()))
    splitter = KFold(folds, shuffle=True, random_state=seed)
    y = data.labels.numpy()[rows] if task == "multiclass" else None
    if y is not None and np.bincount(y)[np.unique(y)].min() >= folds:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return [rows[held] for _, held in splitter.split(rows, y)]


def out_of_fold(config: TrainConfig, train: ViewData, val: ViewData, classes: list[str],
                task: str, criterion: nn.Module, view: str, ckpt_dir: str, online, log=print,
                features: FeatureStore | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold logits for the voter: ``config.voter_folds`` extra branches, each
    trained without one fold of the training images (and their augmented copies) and
    predicting that fold (averaged over the ``tta`` passes, as the branch itself).
    Returns (logits, labels, image ids) of the real training crops. Each fold
    checkpoints (and resumes) under ``ckpt_dir/fold-k``; ``features``: the
    frozen-feature store their head phases read."""
    rank, _ = ddp.rank_and_world()
    probs, ids, labels = [], [], []
    for k, rows in enumerate(_held_out_rows(train, task, config.voter_folds, config.seed)):
        heldout = train.subset(torch.from_numpy(rows))
        held_ids = set(heldout.image_ids)
        inside = torch.tensor([i for i, x in enumerate(train.image_ids) if x not in held_ids])
        if rank == 0:
            log(f"[{view}] voter fold {k + 1}/{config.voter_folds}: {len(inside)} training "
                f"crops, {len(heldout.image_ids)} held out")
        result = fit(config, train.subset(inside), val, classes, task, criterion, view,
                     storage.join(ckpt_dir, f"fold-{k}"), online=online, log=lambda *a: None, push=False,
                     features=features)
        probs.append(predict_logits(ServedBranch(result.net, TTA_MODES[config.tta]), heldout.images))
        ids.extend(heldout.image_ids)
        labels.append(heldout.labels.numpy())
    return np.concatenate(probs), np.concatenate(labels), np.array(ids)
