"""Train one view's branch: a torchvision backbone with class-weighted, label-smoothed
cross-entropy, AdamW and cosine decay; the best epoch by validation macro-F1 is kept.

The branch also writes its class probabilities on the validation and test splits,
which the voter and the evaluation consume (no branch ever sees those labels in
training).

Every epoch ends with a checkpoint (``last.pt``: model, optimiser, scheduler, RNG
states, history; ``best.pt``: the best weights so far). A retried task finds them
and resumes after the last finished epoch, so a killed pod loses at most one epoch
and, with the same seed, ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from triview import manifest as mf
from triview import metrics
from triview.augment import augment_batch
from triview.augment import load_config as load_augment_config
from triview.balance import read_balance
from triview.crop import read_rgb
from triview.models import BranchNet, count_parameters, create_backbone
from triview.storage import atomic_path, atomic_write_bytes, atomic_write_text

MODEL_FILE = "model.pt"
MODEL_META_FILE = "model.json"
PREDICTIONS_FILE = "predictions.npz"
HISTORY_FILE = "history.csv"
CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


@dataclass
class TrainConfig:
    backbone: str = "shufflenet_v2_x1_0"
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    lrf: float = 0.05            # final lr = lr * lrf (cosine decay over the epochs)
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4   # decoupled (AdamW)
    hidden: int = 0
    seed: int = 0
    channels_last: bool = True   # NHWC kernels: ~1.2-1.4x faster on CPU here, and the GPU default
    checkpoint_dir: str = ""     # where last.pt / best.pt live ("" : <out_dir>/checkpoints)


def _save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _resume_key(config: TrainConfig, view: str, classes: list[str], n_train: int) -> str:
    """What must match for a checkpoint to be resumed (not where it is stored)."""
    fields = {k: v for k, v in asdict(config).items() if k != "checkpoint_dir"}
    return json.dumps({"config": fields, "view": view, "classes": classes, "n_train": n_train},
                      sort_keys=True)


def load_checkpoint(folder: str | Path, key: str | None = None) -> dict | None:
    """The last checkpoint in ``folder``, or None when there is none (or it belongs to a
    different configuration, with a warning)."""
    path = Path(folder) / CHECKPOINT_LAST
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None and state.get("key") != key:
        warnings.warn(f"checkpoint {path} was written by a different configuration; "
                      "training starts from scratch", RuntimeWarning, stacklevel=2)
        return None
    return state


@dataclass
class ViewData:
    images: torch.Tensor       # uint8 (N, 3, H, W)
    labels: torch.Tensor       # int64 (N,)
    image_ids: list[str]


def load_view(tables: list[tuple[Path, pd.DataFrame]], view: str, split: str,
              classes: list[str]) -> ViewData:
    """Load one view's crops of one split from one or more view tables into memory."""
    arrays, labels, ids = [], [], []
    for folder, table in tables:
        part = table[(table["view"] == view) & (table["split"] == split)]
        for rec in part.itertuples(index=False):
            arrays.append(read_rgb(folder / rec.path))
        labels.extend(mf.encode_labels(part["label"], classes).tolist())
        ids.extend(part["image_id"].tolist())
    if not arrays:
        raise ValueError(f"no {split} crops for view {view!r}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ViewData(images, torch.tensor(labels, dtype=torch.int64), ids)


def apply_multiplicity(data: ViewData, plan: dict[str, int] | None) -> ViewData:
    """Repeat or drop training samples as balance's resampling plan says (augmented
    copies follow their source image)."""
    if not plan or all(v == 1 for v in plan.values()):
        return data
    index = [i for i, image_id in enumerate(data.image_ids) for _ in range(plan.get(image_id, 1))]
    if not index:
        raise ValueError("resampling left no training images")
    idx = torch.tensor(index)
    return ViewData(data.images[idx], data.labels[idx], [data.image_ids[i] for i in index])


def _make_batch(data: ViewData, idx: torch.Tensor, memory_format, online, epoch: int):
    images = data.images[idx]
    if online is not None:  # a fresh augmentation draw per epoch, seeded by image id
        ids = [data.image_ids[i] for i in idx.tolist()]
        hwc = augment_batch(images.permute(0, 2, 3, 1).numpy(), ids, online, epoch)
        images = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    return _as_float(images).contiguous(memory_format=memory_format), data.labels[idx]


def batches(data: ViewData, order: torch.Tensor, batch_size: int,
            memory_format=torch.contiguous_format, online=None, epoch: int = 0):
    """Yield (float batch, labels) in ``order``. With online augmentation the next batch
    is prepared on a background thread (OpenCV releases the GIL) while this one trains."""
    starts = range(0, len(order), batch_size)
    if online is None:
        for i in starts:
            yield _make_batch(data, order[i:i + batch_size], memory_format, None, epoch)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = None
        for i in starts:
            nxt = pool.submit(_make_batch, data, order[i:i + batch_size], memory_format, online, epoch)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(_as_float(images[i:i + batch_size])), dim=1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int,
                          memory_format=torch.contiguous_format, max_images: int = 1024) -> None:
    """Recompute BatchNorm running statistics as exact averages over training images
    ("precise BN"). The running averages lag behind fast-moving weights in short
    trainings, and evaluation with stale statistics can collapse to one class."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = exact mean over the batches
    was_training = model.training
    model.train()
    for i in range(0, min(len(images), max_images), batch_size):
        model(_as_float(images[i:i + batch_size]).contiguous(memory_format=memory_format))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was_training)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def train_branch(views_dir: str | Path, augmented_dir: str | Path | None, balance_dir: str | Path,
                 view: str, out_dir: str | Path, config: TrainConfig, log=print) -> dict:
    """Train the branch for ``view``; write model, history and val/test probabilities.

    Returns a summary with the best epoch and its validation metrics.
    """
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    views_dir = Path(views_dir)
    classes = mf.read_classes(views_dir)
    tables = [(views_dir, mf.read_views(views_dir))]
    if augmented_dir is not None and (Path(augmented_dir) / mf.VIEWS_FILE).exists():
        tables.append((Path(augmented_dir), mf.read_views(augmented_dir)))
    train = load_view(tables, view, "train", classes)
    online = load_augment_config(augmented_dir) if augmented_dir is not None else None
    online = online if online is not None and online.mode == "online" else None
    val = load_view(tables[:1], view, "val", classes)
    test = load_view(tables[:1], view, "test", classes)
    image_size = int(train.images.shape[-1])

    balance = read_balance(balance_dir)
    weights = torch.tensor(balance["class_weights"], dtype=torch.float32)
    train = apply_multiplicity(train, balance.get("train_multiplicity"))
    model = BranchNet(create_backbone(config.backbone, len(classes), image_size, config.hidden))
    params = count_parameters(model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train.labels) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch, eta_min=config.lr * config.lrf)
    generator = torch.Generator().manual_seed(config.seed)

    history, best_f1, best_state, best_epoch = [], -1.0, None, 0
    run_id = metrics.run_id_for(out_dir)
    ckpt_dir = Path(config.checkpoint_dir or Path(out_dir) / "checkpoints")
    key = _resume_key(config, view, classes, len(train.labels))
    first_epoch = 1
    state = load_checkpoint(ckpt_dir, key)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_f1, best_epoch = state["history"], state["best_f1"], state["best_epoch"]
        best_state = torch.load(ckpt_dir / CHECKPOINT_BEST, map_location="cpu", weights_only=True)
        first_epoch = state["epoch"] + 1
        log(f"[{view}] resuming from the checkpoint of epoch {state['epoch']} in {ckpt_dir}")
    for epoch in range(first_epoch, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train.labels), generator=generator)
        total_loss = 0.0
        for batch, labels in batches(train, order, config.batch_size, memory_format, online, epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(batch), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(labels)
        recalibrate_batchnorm(model, train.images[order], config.batch_size, memory_format)
        seconds = time.perf_counter() - start
        val_prob = predict_proba(model, val.images)
        val_pred = val_prob.argmax(1)
        y_val = val.labels.numpy()
        row = {
            "epoch": epoch,
            "train_loss": total_loss / len(order),
            "val_loss": float(nn.functional.nll_loss(torch.log(torch.from_numpy(val_prob) + 1e-12),
                                                      val.labels, weight=weights)),
            "val_accuracy": float(accuracy_score(y_val, val_pred)),
            "val_macro_f1": macro_f1(y_val, val_pred),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(seconds, 3),
            "images_per_s": round(len(order) / seconds, 1),
        }
        history.append(row)
        log(f"[{view}] epoch {epoch}/{config.epochs} loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} "
            f"val_macro_f1 {row['val_macro_f1']:.4f} ({row['images_per_s']:.0f} img/s)")
        metrics.push(f"train-branch-{view}", {
            "epoch": epoch, "train_loss": row["train_loss"], "val_loss": row["val_loss"],
            "val_macro_f1": row["val_macro_f1"], "learning_rate": row["lr"],
            "images_per_second": row["images_per_s"]}, run_id)
        if row["val_macro_f1"] > best_f1:
            best_f1, best_epoch = row["val_macro_f1"], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _save(best_state, ckpt_dir / CHECKPOINT_BEST)
        # best.pt first: a last.pt on disk always has its best.pt beside it
        _save({"key": key, "epoch": epoch, "model": model.state_dict(),
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
               "history": history, "best_f1": best_f1, "best_epoch": best_epoch},
              ckpt_dir / CHECKPOINT_LAST)

    model.load_state_dict(best_state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp:
        torch.save(best_state, tmp)
    meta = {"view": view, "classes": classes, "image_size": image_size, "config": asdict(config),
            "parameters": params, "best_epoch": best_epoch, "val_macro_f1": best_f1,
            "input": "float RGB in [0,1], NCHW; ImageNet mean/std applied inside the model"}
    atomic_write_text(out / MODEL_META_FILE, json.dumps(meta, indent=2))
    atomic_write_text(out / HISTORY_FILE, pd.DataFrame(history).to_csv(index=False))
    val_prob, test_prob = predict_proba(model, val.images), predict_proba(model, test.images)
    with atomic_path(out / PREDICTIONS_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, val_prob=val_prob, val_ids=np.array(val.image_ids),
                     val_labels=val.labels.numpy(), test_prob=test_prob,
                     test_ids=np.array(test.image_ids), test_labels=test.labels.numpy())
    return {"view": view, "best_epoch": best_epoch, "val_macro_f1": best_f1,
            "val_accuracy": history[best_epoch - 1]["val_accuracy"], "parameters": params,
            "epochs_run": len(history), "resumed_from_epoch": first_epoch - 1,
            "seconds_per_epoch": float(np.mean([h["seconds"] for h in history]))}


def load_branch(folder: str | Path) -> tuple[BranchNet, dict]:
    """Rebuild a trained branch from its folder (weights_only load)."""
    folder = Path(folder)
    meta = json.loads((folder / MODEL_META_FILE).read_text())
    cfg = meta["config"]
    model = BranchNet(create_backbone(cfg["backbone"], len(meta["classes"]), meta["image_size"],
                                      cfg["hidden"]))
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval(), meta


def load_predictions(folder: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / PREDICTIONS_FILE) as data:
        return {k: data[k] for k in data.files}
