"""Train one view's branch: a torchvision backbone with class-weighted, label-smoothed
cross-entropy (multi-class) or sigmoid binary cross-entropy with per-label ``pos_weight``
(multi-label); AdamW / Adam / SGD with a warmed-up cosine, linear, poly, step or multistep
schedule from ``lr`` to ``lr * lrf``; early stopping on validation macro-F1 (``patience``);
gradient clipping and accumulation; AMP on GPU; DistributedDataParallel under torchrun.
The best epoch by validation macro-F1 is kept.

The branch also writes its probabilities on the validation and test splits, which the
voter and the evaluation consume (no branch ever sees those labels in training), its
per-label decision thresholds tuned on validation (multi-label), and with
``voter_folds > 1`` out-of-fold probabilities of the training images for the voter.

Every epoch ends with a checkpoint (``last.pt``: model, optimiser, scheduler, RNG
states, history; ``best.pt``: the best weights so far). A retried task finds them
and resumes after the last finished epoch, so a killed pod loses at most one epoch
and, with the same seed, ends with the same weights as an uninterrupted run.

One concern per module: ``config`` (the spec's train-branch parameters), ``data``
(crops in memory, batches), ``optim`` (optimiser, schedule, precision), ``loss``,
``loop`` (an epoch, :func:`fit`), ``checkpoint`` (on the storage layer), ``folds``
(out-of-fold voter inputs) and ``branch`` (the stage's folders in and out).
"""
from triview.train.branch import load_branch, load_served_branch, plot_history, train_branch
from triview.train.config import TrainConfig, resume_key
from triview.train.data import ViewData, apply_multiplicity, batches, load_view
from triview.train.loop import (FitResult, fit, predict_logits, predict_proba, recalibrate_batchnorm,
                                train_one_epoch)

__all__ = ["FitResult", "TrainConfig", "ViewData", "apply_multiplicity", "batches", "fit",
           "load_branch", "load_served_branch", "load_view", "plot_history", "predict_logits",
           "predict_proba", "recalibrate_batchnorm", "resume_key", "train_branch", "train_one_epoch"]
