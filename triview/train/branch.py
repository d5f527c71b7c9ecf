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
from triview.augment import AugmentConfig
from triview.augment import load_config as load_augment_config
from triview.balance import read_balance
from triview.models import (TTA_MODES, BranchNet, ServedBranch, count_parameters, create_backbone,
                            resolve_normalization)
from triview.scoring import selection_scores, tune_thresholds
from triview.storage import atomic_path, atomic_write_text
from triview.train.config import TrainConfig
from triview.temperature import fit_temperature, scale_logits
from triview.train.data import ViewData, apply_multiplicity, load_view
from triview.train.folds import out_of_fold
from triview.train.features import FeatureStore
from triview.train.head import cross_fit
from triview.train.loop import (EpochCallback, FitResult, build_branch, fit, head_module,
                                predict_logits)
from triview.train.loss import make_criterion
from triview.train.optim import training_device
from triview.train.passes import extract, pass_names
from triview.train.shardimages import concat


def train_branch(views_dir: str | Path, augmented_dir: str | Path | None, balance_dir: str | Path,
                 view: str, out_dir: str | Path, config: TrainConfig, log=print,
                 stage: str | None = None, checkpoint_dir: str = "",
                 feature_cache: str | Path | None = None,
                 on_epoch: EpochCallback | None = None) -> dict:
    """Train the branch for ``view``; write model, history and held-out and test
    probabilities. ``stage`` names the per-epoch metrics group (default
    ``train-branch-<view>``); checkpoints go to ``checkpoint_dir`` (default:
    ``<out_dir>/checkpoints``). ``feature_cache``: a folder of frozen features
    (:mod:`triview.train.features`) that the head phase reads and fills. ``on_epoch``: see
    :func:`fit`.

    With ``epochs=0`` (the photo default) the branch is the pretrained backbone and a head
    fitted on its cached features over train and validation together, cross-fitted
    (:func:`fit_head_only`): every one of those images gets an out-of-fold prediction.
    With fine-tuning, the best epoch is chosen on validation and, with ``voter_folds > 1``,
    K fold models predict the training images out of fold. Either way the branch's logits
    are averaged over the ``tta`` passes and divided by a temperature fitted on its
    held-out logits (out-of-fold, else validation; never test).

    Returns a summary with the best epoch and its held-out metrics. Under torchrun,
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
    train = load_view(tables, view, "train", classes, task, config.loader)
    augment = load_augment_config(augmented_dir) if augmented_dir is not None else None
    online = augment if augment is not None and augment.mode == "online" else None
    val = load_view(tables[:1], view, "val", classes, task, config.loader)
    test = load_view(tables[:1], view, "test", classes, task, config.loader)
    image_size = int(train.images.shape[-1])

    balance = read_balance(balance_dir)
    train = apply_multiplicity(train, balance.get("train_multiplicity"))
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    criterion = make_criterion(task, balance, classes, config)
    ckpt_dir = checkpoint_dir or str(Path(out_dir) / artifacts.CHECKPOINTS_DIR)
    passes = TTA_MODES[config.tta]
    store = FeatureStore.open(feature_cache) if feature_cache else None
    if config.epochs == 0 and config.head_folds:
        if rank != 0:  # nothing to share: rank 0 fits the head alone
            return {"view": view, "task": task, "rank": rank}
        result, logits, held_out = fit_head_only(config, train, val, test, classes, task, criterion,
                                                 augment or AugmentConfig(seed=config.seed), view, log,
                                                 store=store)
        if on_epoch is not None:
            on_epoch({**result.history[0], "head_epoch": 1})
        scored_on = "out-of-fold (train + validation)"
    else:
        result = fit(config, train, val, classes, task, criterion, view, ckpt_dir,
                     metrics.run_id_for(out_dir), online, log, stage=stage, features=store,
                     on_epoch=on_epoch)
        served = ServedBranch(result.net, passes)
        logits = {"val": predict_logits(served, val.images), "test": predict_logits(served, test.images)}
        held_out = None
        if config.voter_folds > 1:
            held_out = out_of_fold(config, train, val, classes, task, criterion, view, ckpt_dir,
                                   online, log, features=store)
        scored_on = "validation"
    digest = ddp.parameter_digest(result.net)
    ddp.write_rank_report(out_dir, {"rank": rank, "world_size": world, "parameter_digest": digest,
                                    "images_per_epoch": len(result.drawn),
                                    "last_epoch_image_ids": [train.image_ids[i] for i in result.drawn]})
    summary = {"view": view, "task": task, "best_epoch": result.best_epoch,
               "val_macro_f1": result.best_f1,
               "val_accuracy": next(h["val_accuracy"] for h in result.history
                                    if h["epoch"] == result.best_epoch),
               "scored_on": scored_on,
               "parameters": result.parameters,
               # the head phase is epoch 0, however many rows (penalties, epochs) it wrote
               "epochs_run": int(any(h.get("phase") == "head" for h in result.history))
               + sum(h.get("phase") != "head" for h in result.history),
               "resumed_from_epoch": result.resumed_from_epoch,
               "stopped_early": result.stopped_early, "device": str(result.device),
               "head_epochs": len(result.head_curve),
               "head_folds": config.head_folds if result.history and result.history[0].get("phase") == "head"
               and not result.head_curve else 0,
               "world_size": world, "parameter_digest": digest,
               "seconds_per_epoch": float(np.mean([h["seconds"] for h in result.history]))}
    if rank != 0:
        return summary
    # the temperature: fitted on held-out logits (out-of-fold when there are, else validation)
    fit_on = held_out if held_out is not None else (logits["val"], val.labels.numpy())
    temperature = fit_temperature(fit_on[0], fit_on[1], task)
    prob = {split: scale_logits(z, temperature, task) for split, z in logits.items()}
    tune_on = (scale_logits(held_out[0], temperature, task), held_out[1]) if held_out is not None \
        else (prob["val"], val.labels.numpy())
    thresholds = tune_thresholds(tune_on[1], tune_on[0]) if task == "multilabel" else None
    model, history = result.net, result.history
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp:
        torch.save(model.state_dict(), tmp)
    meta = {"view": view, "classes": classes, "image_size": image_size, "task": task,
            "config": asdict(config), "parameters": result.parameters,
            "normalization": resolve_normalization(config.normalization, config.backbone),
            "best_epoch": result.best_epoch, "val_macro_f1": result.best_f1, "scored_on": scored_on,
            "pretrained": result.pretrained, "world_size": world,
            "tta": list(passes), "temperature": temperature,
            "thresholds": None if thresholds is None else thresholds.tolist(),
            "input": "float RGB in [0,1], NCHW; normalisation inside the model",
            "output": ("per-label logits (sigmoid)" if task == "multilabel" else "class logits (softmax)")
                      + "; the ensemble averages them over the tta passes and divides by the temperature"}
    artifacts.write_branch_meta(out, meta)
    atomic_write_text(out / HISTORY_FILE, pd.DataFrame(history).to_csv(index=False))
    if result.head_curve:
        atomic_write_text(out / HEAD_HISTORY_FILE, pd.DataFrame(result.head_curve).to_csv(index=False))
    plot_history(pd.DataFrame(history), out / HISTORY_PLOT, title=f"{view}: {config.backbone}")
    arrays = dict(val_prob=prob["val"], val_logits=logits["val"], val_ids=np.array(val.image_ids),
                  val_labels=val.labels.numpy(), test_prob=prob["test"], test_logits=logits["test"],
                  test_ids=np.array(test.image_ids), test_labels=test.labels.numpy())
    if held_out is not None:
        arrays.update(oof_prob=scale_logits(held_out[0], temperature, task), oof_logits=held_out[0],
                      oof_ids=np.asarray(held_out[2]), oof_labels=np.asarray(held_out[1]))
        if config.epochs:
            summary["voter_folds"] = config.voter_folds
    if task == "multilabel":
        arrays = {k: (v.astype(np.int64) if k.endswith("_labels") else v) for k, v in arrays.items()}
        arrays["thresholds"] = thresholds
    artifacts.write_predictions(out, arrays)
    summary["temperature"] = temperature
    return summary


def fit_head_only(config: TrainConfig, train: ViewData, val: ViewData, test: ViewData,
                  classes: list[str], task: str, criterion: torch.nn.Module,
                  augment: AugmentConfig, view: str, log=print, store: FeatureStore | None = None):
    """The branch with ``epochs=0``: the pretrained backbone, frozen, and a head fitted on
    its features of the training and validation crops together (the fit pool), under the
    ``tta`` passes and ``feature_passes - 1`` augmented passes, cross-fitted over
    ``head_folds`` folds (:func:`triview.train.head.cross_fit`).

    Returns the fit (as :class:`FitResult`), the logits of ``val`` and ``test`` (averaged
    over the tta passes; the validation images' are out-of-fold) and the held-out
    (logits, labels, ids) of the whole pool."""
    import time

    start = time.perf_counter()
    net, pretrained, found = build_branch(config, len(classes), int(train.images.shape[-1]))
    params = count_parameters(net)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    device = training_device()
    net = net.to(device=device, memory_format=memory_format)
    if found is not None:
        log(f"[{view}] {config.backbone} ({task}), frozen: {config.weights} weights from "
            f"{found.source} {found.location} (sha256 {found.sha256[:12]}, "
            f"{pretrained['loaded']} tensors)")
    tta = TTA_MODES[config.tta]
    names = pass_names(config.tta, config.feature_passes)
    real = train if train.real is None else train.subset(torch.nonzero(train.real).flatten())
    extract_log = (lambda msg: log(f"[{view}] {msg}"))
    pool_data = ViewData(concat([real.images, val.images]), torch.cat([real.labels, val.labels]),
                         real.image_ids + val.image_ids)
    pool = extract(net, pool_data, names, augment, memory_format=memory_format, log=extract_log,
                   store=store).unique()
    test_features = extract(net, test, tta, memory_format=memory_format, log=extract_log, store=store)
    feature_seconds = time.perf_counter() - start
    head = head_module(net)
    fitted = cross_fit(pool, criterion.cpu(), task, head.out_features, train_passes=names, tta=tta,
                       folds=config.head_folds, seed=config.seed)
    fitted.head.load_into(head)
    net = net.cpu().eval()
    oof = fitted.oof_logits
    row_of = {image_id: k for k, image_id in enumerate(pool.ids)}
    val_logits = oof[[row_of[i] for i in val.image_ids]]
    oof_prob = scale_logits(oof, fitted.temperature, task)
    scores = selection_scores(pool.y, oof_prob)
    history = [{"epoch": 0, "phase": "head", "l2": r["l2"], "train_loss": r["oof_log_loss"],
                "val_loss": r["oof_log_loss"], "val_accuracy": r["oof_accuracy"],
                "val_macro_f1": scores["val_macro_f1"] if r["l2"] == fitted.l2 else float("nan"),
                "lr": float("nan"), "chosen": r["l2"] == fitted.l2,
                "seconds": round(feature_seconds + fitted.seconds, 3),
                "feature_seconds": round(feature_seconds, 3)} for r in fitted.table]
    chosen = next(h for h in history if h["chosen"])
    chosen["val_accuracy"] = scores["val_accuracy"]
    log(f"[{view}] head cross-fitted over {fitted.folds} folds of {len(pool.ids)} train + val "
        f"images x {len(names)} passes ({', '.join(names)}): L2 {fitted.l2:g}, out-of-fold "
        f"accuracy {scores['val_accuracy']:.4f}, macro-F1 {scores['val_macro_f1']:.4f}, "
        f"temperature {fitted.temperature:.3f}; features {feature_seconds:.1f} s, fits "
        f"{fitted.seconds:.1f} s")
    result = FitResult(net, [chosen] + [h for h in history if not h["chosen"]], 0,
                       scores["val_macro_f1"], False, 0, params, pretrained, device, 1, [])
    logits = {"val": val_logits, "test": fitted.head.logits(test_features, tta)}
    return result, logits, (oof, pool.y, pool.ids)


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


def load_served_branch(folder: str | Path) -> tuple[ServedBranch, dict]:
    """A trained branch as the ensemble runs it: its test-time passes and temperature
    (branches written before either existed: the crop alone, temperature 1)."""
    net, meta = load_branch(folder)
    return ServedBranch(net, tuple(meta.get("tta") or ("identity",)),
                        float(meta.get("temperature") or 1.0)).eval(), meta
