"""Train one view's branch from the stage's folders and write its output folder (the
contract of :mod:`triview.artifacts`); rebuild a trained branch from it."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from triview import artifacts
from triview import weights as published_weights
from triview import distributed as ddp
from triview import manifest as mf
from triview import metrics
from triview.artifacts import HEAD_HISTORY_FILE, HISTORY_FILE, HISTORY_PLOT, MODEL_FILE
from triview.augment import load_config as load_augment_config
from triview.balance import read_balance
from triview.models import BranchNet, create_backbone, resolve_normalization
from triview.scoring import tune_thresholds
from triview.storage import atomic_path, atomic_write_text
from triview.train.config import TrainConfig
from triview.train.data import apply_multiplicity, load_view
from triview.train.folds import out_of_fold
from triview.train.features import FeatureStore
from triview.train.loop import EpochCallback, fit, predict_proba_with
from triview.train.loss import make_criterion


def train_branch(views_dir: str | Path, augmented_dir: str | Path | None, balance_dir: str | Path,
                 view: str, out_dir: str | Path, config: TrainConfig, log=print,
                 stage: str | None = None, checkpoint_dir: str = "",
                 feature_cache: str | Path | None = None,
                 on_epoch: EpochCallback | None = None) -> dict:
    """Train the branch for ``view``; write model, history and val/test probabilities
    (and, with ``voter_folds > 1``, out-of-fold probabilities of the training images).
    ``stage`` names the per-epoch metrics group (default ``train-branch-<view>``);
    checkpoints go to ``checkpoint_dir`` (default: ``<out_dir>/checkpoints``).
    ``feature_cache``: a folder of frozen features (:mod:`triview.train.features`) that the
    head phase and the predictions read and fill. ``on_epoch``: see :func:`fit`.

    Returns a summary with the best epoch and its validation metrics. Under torchrun,
    every rank trains and rank 0 alone writes.
    """
    # before any data is read: a missing or tampered weights file fails the task at once
    published_weights.resolve(config.backbone, config.weights, config.weights_root)
    ddp.init_from_env()
    rank, world = ddp.rank_and_world()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if world == 1 and "OMP_NUM_THREADS" not in os.environ:  # an explicit setting wins
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    views_dir = Path(views_dir)
    classes = mf.read_classes(views_dir)
    tables = [(views_dir, mf.read_views(views_dir))]
    task = mf.task_of_table(tables[0][1]) if config.task == "auto" else config.task
    if augmented_dir is not None and (Path(augmented_dir) / mf.VIEWS_FILE).exists():
        tables.append((Path(augmented_dir), mf.read_views(augmented_dir)))
    train = load_view(tables, view, "train", classes, task)
    online = load_augment_config(augmented_dir) if augmented_dir is not None else None
    online = online if online is not None and online.mode == "online" else None
    val = load_view(tables[:1], view, "val", classes, task)
    test = load_view(tables[:1], view, "test", classes, task)
    image_size = int(train.images.shape[-1])

    balance = read_balance(balance_dir)
    train = apply_multiplicity(train, balance.get("train_multiplicity"))
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    criterion = make_criterion(task, balance, classes, config)
    ckpt_dir = checkpoint_dir or str(Path(out_dir) / artifacts.CHECKPOINTS_DIR)
    store = FeatureStore.open(feature_cache) if feature_cache else None
    result = fit(config, train, val, classes, task, criterion, view, ckpt_dir,
                 metrics.run_id_for(out_dir), online, log, stage=stage, features=store,
                 on_epoch=on_epoch)
    oof = None
    if config.voter_folds > 1:
        oof = out_of_fold(config, train, val, classes, task, criterion, view, ckpt_dir, online, log,
                          features=store)
    digest = ddp.parameter_digest(result.net)
    ddp.write_rank_report(out_dir, {"rank": rank, "world_size": world, "parameter_digest": digest,
                                    "images_per_epoch": len(result.drawn),
                                    "last_epoch_image_ids": [train.image_ids[i] for i in result.drawn]})
    summary = {"view": view, "task": task, "best_epoch": result.best_epoch,
               "val_macro_f1": result.best_f1,
               "val_accuracy": next(h["val_accuracy"] for h in result.history
                                    if h["epoch"] == result.best_epoch),
               "parameters": result.parameters, "epochs_run": len(result.history),
               "resumed_from_epoch": result.resumed_from_epoch,
               "stopped_early": result.stopped_early, "device": str(result.device),
               "head_epochs": len(result.head_curve),
               "world_size": world, "parameter_digest": digest,
               "seconds_per_epoch": float(np.mean([h["seconds"] for h in result.history]))}
    if rank != 0:
        return summary
    model, history = result.net, result.history
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    val_prob = predict_proba_with(model, val.images, task=task, store=store, memory_format=layout)
    test_prob = predict_proba_with(model, test.images, task=task, store=store, memory_format=layout)
    thresholds = tune_thresholds(val.labels.numpy(), val_prob) if task == "multilabel" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp:
        torch.save(model.state_dict(), tmp)
    meta = {"view": view, "classes": classes, "image_size": image_size, "task": task,
            "config": asdict(config), "parameters": result.parameters,
            "normalization": resolve_normalization(config.normalization, config.backbone),
            "best_epoch": result.best_epoch, "val_macro_f1": result.best_f1,
            "pretrained": result.pretrained, "world_size": world,
            "thresholds": None if thresholds is None else thresholds.tolist(),
            "input": "float RGB in [0,1], NCHW; normalisation inside the model",
            "output": "per-label logits (sigmoid)" if task == "multilabel" else "class logits (softmax)"}
    artifacts.write_branch_meta(out, meta)
    atomic_write_text(out / HISTORY_FILE, pd.DataFrame(history).to_csv(index=False))
    if result.head_curve:
        atomic_write_text(out / HEAD_HISTORY_FILE, pd.DataFrame(result.head_curve).to_csv(index=False))
    plot_history(pd.DataFrame(history), out / HISTORY_PLOT, title=f"{view}: {config.backbone}")
    arrays = dict(val_prob=val_prob, val_ids=np.array(val.image_ids), val_labels=val.labels.numpy(),
                  test_prob=test_prob, test_ids=np.array(test.image_ids),
                  test_labels=test.labels.numpy())
    if task == "multilabel":
        arrays = {k: (v.astype(np.int64) if k.endswith("_labels") else v) for k, v in arrays.items()}
        arrays["thresholds"] = thresholds
    if oof is not None:
        arrays.update(oof_prob=oof[0], oof_ids=oof[1], oof_labels=oof[2].astype(np.int64))
        summary["voter_folds"] = config.voter_folds
    artifacts.write_predictions(out, arrays)
    return summary


def plot_history(history: pd.DataFrame, path: Path, title: str = "") -> None:
    """Loss curves, validation macro-F1 and the learning rate per epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(history["epoch"], history["train_loss"], marker="o", label="train")
    axes[0].plot(history["epoch"], history["val_loss"], marker="o", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(history["epoch"], history["val_macro_f1"], marker="o", color="tab:green")
    axes[1].set_title("val macro-F1")
    axes[2].plot(history["epoch"], history["lr"], marker="o", color="tab:purple")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def load_branch(folder: str | Path) -> tuple[BranchNet, dict]:
    """Rebuild a trained branch from its folder (weights_only load)."""
    folder = Path(folder)
    meta = artifacts.read_branch_meta(folder)
    cfg = meta["config"]
    model = BranchNet(create_backbone(cfg["backbone"], len(meta["classes"]), meta["image_size"],
                                      cfg["hidden"]), branch_normalization(meta))
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval(), meta


def branch_normalization(meta: dict) -> str:
    """The input normalisation a trained branch uses (older branches: their config's)."""
    cfg = meta["config"]
    return meta.get("normalization") or resolve_normalization(cfg.get("normalization", "imagenet"),
                                                              cfg["backbone"])
