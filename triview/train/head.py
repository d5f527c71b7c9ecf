"""The head phase on cached features: a branch's new linear head fitted on features of the
frozen backbone, cross-fitted so that every image of the fit pool is predicted by a head
that never saw it.

Everything here takes feature arrays, never images (where they come from is the caller's
business): :class:`PassFeatures` holds one view's features of a set of images under named
passes (``identity``, the test-time passes ``flip`` and ``zoom``, augmented passes
``aug1``, ``aug2``, ...), one row per image in every pass.

:func:`cross_fit` splits the pool into K folds (stratified by class), fits a head on the
training passes of K - 1 folds and predicts the held-out fold, averaging the logits over
the test-time passes: these out-of-fold (OOF) logits are what the branch's temperature,
the voter and the voter's choice are fitted on, and they are honest for all of them
because no head that produced them saw the image. The L2 penalty is chosen from a small
grid by the OOF log-loss (after a temperature, so that the choice is about how well the
head ranks, not about its scale) and the final head is fitted on the whole pool with it:
no epoch or penalty is ever chosen on images the voter is later scored on.

The head is multinomial logistic regression (sigmoid per label for multi-label) with the
branch's loss (class weights, label smoothing; ``pos_weight`` per label) plus the L2
penalty, minimised full-batch with L-BFGS: a convex problem, so there is no epoch budget
to tune and the same data give the same head.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from triview.scoring import mean_log_loss
from triview.temperature import fit_temperature, scale_logits

#: L2 penalties (on the mean loss) the cross-fit chooses from, in half-decades (measured
#: on photos and digits: the chosen one ranged from 1e-3 to 1e-2, data-dependent).
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
IDENTITY = "identity"


@dataclass
class PassFeatures:
    """One view's frozen-backbone features of a set of images: ``passes[name]`` is an
    (N, D) array whose row k belongs to image ``ids[k]`` with label ``y[k]`` (a class
    index, or a 0/1 row per label)."""
    ids: np.ndarray
    y: np.ndarray
    passes: dict[str, np.ndarray] = field(default_factory=dict)
    #: how many times each image counts when a head is fitted (balance's resampling plan)
    repeat: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name, x in self.passes.items():
            if len(x) != len(self.ids):
                raise ValueError(f"pass {name!r} has {len(x)} rows for {len(self.ids)} images")

    def take(self, rows: np.ndarray) -> "PassFeatures":
        return PassFeatures(self.ids[rows], self.y[rows], {k: v[rows] for k, v in self.passes.items()},
                            None if self.repeat is None else self.repeat[rows])

    def unique(self) -> "PassFeatures":
        """One row per image (its first), each counted as often as it appeared."""
        _, first, counts = np.unique(self.ids, return_index=True, return_counts=True)
        order = np.argsort(first)
        out = self.take(first[order])
        out.repeat = counts[order]
        return out


@dataclass
class LinearHead:
    """``logits = x @ weight.T + bias`` (what ``nn.Linear`` holds)."""
    weight: np.ndarray   # (C, D)
    bias: np.ndarray     # (C,)

    def logits(self, features: PassFeatures, passes: tuple[str, ...]) -> np.ndarray:
        """The logits averaged over ``passes`` (the test-time augmentation)."""
        return np.mean([features.passes[p] @ self.weight.T + self.bias for p in passes], axis=0)

    def load_into(self, linear: nn.Linear) -> None:
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(self.weight))
            linear.bias.copy_(torch.from_numpy(self.bias))


@dataclass
class CrossFit:
    """The result of :func:`cross_fit`."""
    head: LinearHead            # fitted on the whole pool with the chosen penalty
    l2: float
    oof_logits: np.ndarray      # (N, C), rows in the pool's order
    temperature: float          # fitted on the OOF logits
    folds: int
    table: list[dict]           # per penalty: OOF log-loss (after its temperature), accuracy
    seconds: float


@contextlib.contextmanager
def _one_thread():
    """Full-batch fits of a few thousand rows gain nothing from threads, and OpenMP's
    spinning workers slow them many-fold on a shared CPU (measured 20x on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_linear(x: np.ndarray, y: np.ndarray, criterion: nn.Module, l2: float, n_out: int,
               max_iter: int = 200, start: LinearHead | None = None) -> LinearHead:
    """Minimise ``criterion(x W^T + b, y) + l2/2 |W|^2`` over ``n_out`` outputs with
    L-BFGS, from zero or from ``start`` (a neighbouring penalty's solution: the problem is
    convex, so the start changes the time, not the answer)."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y).float() if y.ndim == 2 else torch.from_numpy(y).long()
    weight = torch.zeros(n_out, xt.shape[1]) if start is None else torch.tensor(start.weight)
    bias = torch.zeros(n_out) if start is None else torch.tensor(start.bias)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9,
                                  line_search_fn="strong_wolfe")
    criterion = criterion.cpu()

    def closure():
        optimizer.zero_grad()
        loss = criterion(xt @ weight.T + bias, yt) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with _one_thread():
        optimizer.step(closure)
    return LinearHead(weight.detach().numpy().copy(), bias.detach().numpy().copy())


def _training_rows(features: PassFeatures, passes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(features.ids))
    if features.repeat is not None:
        rows = np.repeat(rows, features.repeat)
    return (np.concatenate([features.passes[p][rows] for p in passes]),
            np.concatenate([features.y[rows]] * len(passes)))


def fold_rows(y: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out rows of each of ``folds`` folds: stratified by class when every class has
    ``folds`` images (multi-class), else plain shuffled folds."""
    from sklearn.model_selection import KFold, StratifiedKFold

    rows = np.arange(len(y))
    splitter = KFold(folds, shuffle=True, random_state=seed)
    if y.ndim == 1 and np.bincount(y)[np.unique(y)].min() >= folds:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(rows, y if y.ndim == 1 else None)]


def cross_fit(pool: PassFeatures, criterion: nn.Module, task: str, n_out: int, *, train_passes: tuple[str, ...],
              tta: tuple[str, ...] = (IDENTITY,), folds: int = 5, seed: int = 0,
              l2_grid: tuple[float, ...] = L2_GRID) -> CrossFit:
    """Out-of-fold logits of every pool image (averaged over ``tta``) from heads fitted on
    the ``train_passes`` of the other folds; the penalty of ``l2_grid`` with the lowest
    OOF log-loss after a temperature; the final head on the whole pool; the temperature
    of its OOF logits."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    missing = [p for p in (*train_passes, *tta) if p not in pool.passes]
    if missing:
        raise ValueError(f"passes {missing} are not among the features ({sorted(pool.passes)})")
    start = time.perf_counter()
    held_out = fold_rows(pool.y, min(folds, len(pool.ids)), seed)
    rows = np.arange(len(pool.ids))
    fold_data = [(pool.take(np.setdiff1d(rows, held)), pool.take(held)) for held in held_out]
    fold_data = [(_training_rows(fit, train_passes), test) for fit, test in fold_data]
    oof_by_l2, previous = {}, [None] * len(held_out)
    for l2 in sorted(l2_grid, reverse=True):  # strong to weak penalty, each fold warm-started
        oof = np.zeros((len(pool.ids), n_out))
        for k, (held, ((x, y), test)) in enumerate(zip(held_out, fold_data)):
            previous[k] = fit_linear(x, y, criterion, l2, n_out, start=previous[k])
            oof[held] = previous[k].logits(test, tta)
        oof_by_l2[l2] = oof
    table = []
    for l2 in l2_grid:
        oof = oof_by_l2[l2]
        t = fit_temperature(oof, pool.y, task)
        prob = scale_logits(oof, t, task)
        pred = (prob >= 0.5) if task == "multilabel" else prob.argmax(1)
        table.append({"l2": l2, "oof_log_loss": mean_log_loss(pool.y, prob), "temperature": t,
                      "oof_accuracy": float((pred == pool.y).all(axis=-1).mean()
                                            if task == "multilabel" else (pred == pool.y).mean())})
    best = min(table, key=lambda row: (row["oof_log_loss"], -row["l2"]))
    l2 = best["l2"]
    head = fit_linear(*_training_rows(pool, train_passes), criterion, l2, n_out)
    return CrossFit(head, l2, oof_by_l2[l2], best["temperature"], len(held_out), table,
                    time.perf_counter() - start)

