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
"""
from __future__ import annotations

import io
import json
import math
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
from triview.models import (BranchNet, count_parameters, create_backbone, load_pretrained,
                            set_backbone_frozen)
from triview import storage
from triview.storage import atomic_path, atomic_write_bytes, atomic_write_text

MODEL_FILE = "model.pt"
MODEL_META_FILE = "model.json"
PREDICTIONS_FILE = "predictions.npz"
HISTORY_FILE = "history.csv"
HISTORY_PLOT = "history.png"
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "linear", "poly", "step", "multistep", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")
CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


@dataclass
class TrainConfig:
    backbone: str = "shufflenet_v2_x1_0"
    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    lrf: float = 0.05            # final lr = lr * lrf, whatever the schedule
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4   # decoupled for AdamW, L2 for Adam / SGD
    hidden: int = 0
    seed: int = 0
    optimizer: str = "adamw"     # adamw | adam | sgd (momentum 0.9, Nesterov)
    momentum: float = 0.9        # SGD only
    scheduler: str = "cosine"    # cosine | linear | poly | step | multistep | constant
    warmup_epochs: float = 0.0   # linear warmup from lr/10, counted in (fractional) epochs
    milestones: str = ""         # step: every N epochs ("N"); multistep: "e1,e2,..." (default 1/2, 3/4)
    poly_power: float = 0.9
    patience: int = 0            # stop after this many epochs without a better val macro-F1 (0: never)
    clip_grad_norm: float = 0.0  # max global gradient norm (0: no clipping)
    accumulate: int = 1          # optimiser step every N batches (effective batch = N * batch_size)
    amp: str = "auto"            # auto (bf16 on a GPU that has it, else fp16; off on CPU) | off | bf16 | fp16
    compile: bool = False        # torch.compile the model
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    normalization: str = "imagenet"  # imagenet | per_sample | unit (/255)
    weights: str = ""            # pretrained backbone: local file or s3:// URI (.safetensors preferred)
    finetune: str = "full"       # full | linear_probe (only the new head trains)
    unfreeze_epoch: int = 0      # linear_probe: train everything from this epoch on (0: never)
    channels_last: bool = True   # NHWC kernels: ~1.2-1.4x faster on CPU here, and the GPU default
    checkpoint_dir: str = ""     # where last.pt / best.pt live ("" : <out_dir>/checkpoints)
    task: str = "auto"           # auto (multilabel when some image has several labels) | multiclass | multilabel
    voter_folds: int = 0         # >1: also K fold models, for out-of-fold voter inputs (K x the training time)
    ddp_procs: int = 0           # DDP processes (torchrun) for this branch; 0: one per visible GPU when >1


def _join(root: str | Path, name: str) -> str:
    """``root/name`` for a local folder or an ``s3://`` prefix."""
    return f"{str(root).rstrip('/')}/{name}"


def _save(obj, location: str) -> None:
    """Atomically, to a local path (temp + rename) or an s3:// URI (one PUT)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(location, buffer.getvalue())


def _exists(location: str) -> bool:
    if storage.is_s3(location):
        return storage.default_store().exists(location)
    return Path(location).is_file()


def _load(location: str):
    return torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu",
                      weights_only=True)


def _resume_key(config: TrainConfig, view: str, classes: list[str], n_train: int,
                task: str = "multiclass", world_size: int = 1) -> str:
    """What must match for a checkpoint to be resumed (not where it is stored, nor the
    out-of-fold setting, which does not change this model)."""
    fields = {k: v for k, v in asdict(config).items()
              if k not in ("checkpoint_dir", "voter_folds", "ddp_procs")}
    return json.dumps({"config": fields, "view": view, "classes": classes, "n_train": n_train,
                       "task": task, "world_size": world_size}, sort_keys=True)


def load_checkpoint(folder: str | Path, key: str | None = None) -> dict | None:
    """The last checkpoint in ``folder`` (a local folder or an s3:// prefix), or None when
    there is none (or it belongs to a different configuration, with a warning)."""
    path = _join(folder, CHECKPOINT_LAST)
    if not _exists(path):
        return None
    state = _load(path)
    if key is not None and state.get("key") != key:
        warnings.warn(f"checkpoint {path} was written by a different configuration; "
                      "training starts from scratch", RuntimeWarning, stacklevel=2)
        return None
    return state


def lr_factor(config: TrainConfig, steps_per_epoch: int):
    """The schedule as a function of the optimiser step: a multiplier of ``lr`` that
    warms up linearly from 0.1 and ends at ``lrf``."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    lrf = config.lrf
    if config.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {config.scheduler!r}; choose from {SCHEDULERS}")
    if config.scheduler in ("step", "multistep"):
        if config.milestones.strip():
            marks = sorted(float(m) for m in config.milestones.split(","))
        else:
            marks = [0.5 * config.epochs, 0.75 * config.epochs]
        if config.scheduler == "step":
            every = marks[0] if config.milestones.strip() else max(1.0, config.epochs / 3)
            marks = [every * k for k in range(1, int(config.epochs / every) + 1) if every * k < config.epochs]
        marks = [m * steps_per_epoch for m in marks if 0 < m < config.epochs] or [total]
        gamma = lrf ** (1.0 / len(marks))  # the last drop lands on lrf

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.scheduler == "cosine":
            return lrf + (1 - lrf) * 0.5 * (1 + math.cos(math.pi * t))
        if config.scheduler == "linear":
            return lrf + (1 - lrf) * (1 - t)
        if config.scheduler == "poly":
            return lrf + (1 - lrf) * (1 - t) ** config.poly_power
        if config.scheduler == "constant":
            return 1.0
        return gamma ** sum(step >= m for m in marks)

    return factor


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose from {OPTIMIZERS}")


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision (CPU autocast is slower here)."""
    if config.amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {config.amp!r}; choose from {AMP_MODES}")
    if config.amp == "off" or device.type != "cuda":
        return None
    if config.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if config.amp == "bf16" else torch.float16


def training_device() -> torch.device:
    """The GPU this process should use (LOCAL_RANK under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass
class ViewData:
    images: torch.Tensor       # uint8 (N, 3, H, W)
    labels: torch.Tensor       # int64 (N,) multi-class; float32 0/1 (N, C) multi-label
    image_ids: list[str]
    real: torch.Tensor | None = None  # bool (N,): a real crop (not an augmented copy)

    def subset(self, idx: torch.Tensor) -> "ViewData":
        real = None if self.real is None else self.real[idx]
        return ViewData(self.images[idx], self.labels[idx], [self.image_ids[i] for i in idx.tolist()], real)


def load_view(tables: list[tuple[Path, pd.DataFrame]], view: str, split: str,
              classes: list[str], task: str = "multiclass") -> ViewData:
    """Load one view's crops of one split from one or more view tables into memory
    (labels as class indices, or as 0/1 indicators for ``task="multilabel"``)."""
    arrays, labels, ids, real = [], [], [], []
    for folder, table in tables:
        part = table[(table["view"] == view) & (table["split"] == split)]
        for rec in part.itertuples(index=False):
            arrays.append(read_rgb(folder / rec.path))
        if task == "multilabel":
            labels.extend(mf.encode_multilabel(part["labels"], classes).tolist())
        else:
            labels.extend(mf.encode_labels(part["label"], classes).tolist())
        ids.extend(part["image_id"].tolist())
        real.extend((part["augmented"] == 0).tolist() if "augmented" in part else [True] * len(part))
    if not arrays:
        raise ValueError(f"no {split} crops for view {view!r}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    dtype = torch.float32 if task == "multilabel" else torch.int64
    return ViewData(images, torch.tensor(labels, dtype=dtype), ids, torch.tensor(real, dtype=torch.bool))


def apply_multiplicity(data: ViewData, plan: dict[str, int] | None) -> ViewData:
    """Repeat or drop training samples as balance's resampling plan says (augmented
    copies follow their source image)."""
    if not plan or all(v == 1 for v in plan.values()):
        return data
    index = [i for i, image_id in enumerate(data.image_ids) for _ in range(plan.get(image_id, 1))]
    if not index:
        raise ValueError("resampling left no training images")
    return data.subset(torch.tensor(index))


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
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
                  task: str = "multiclass") -> np.ndarray:
    """Class probabilities (softmax), or per-label probabilities (sigmoid) for multi-label."""
    model.eval()
    device = next(model.parameters()).device
    squash = torch.sigmoid if task == "multilabel" else (lambda z: torch.softmax(z, dim=1))
    out = [squash(model(_as_float(images[i:i + batch_size].to(device))).float()).cpu()
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
    device = next(model.parameters()).device
    for i in range(0, min(len(images), max_images), batch_size):
        model(_as_float(images[i:i + batch_size].to(device)).contiguous(memory_format=memory_format))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was_training)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


class MultiLabelLoss(nn.Module):
    """Sigmoid binary cross-entropy per label with ``pos_weight`` (negatives / positives
    of each label) and label smoothing towards 0.5."""

    def __init__(self, pos_weight: torch.Tensor, smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype) * (1 - self.smoothing) + 0.5 * self.smoothing
        return nn.functional.binary_cross_entropy_with_logits(logits, target,
                                                              pos_weight=self.pos_weight)


def make_criterion(task: str, balance: dict, classes: list[str], config: TrainConfig) -> nn.Module:
    """Multi-class: softmax cross-entropy with class weights and label smoothing;
    multi-label: :class:`MultiLabelLoss` with balance's per-label ``pos_weight``."""
    if task == "multilabel":
        pos = balance.get("labels", {}).get("pos_weight", {})
        pos_weight = torch.tensor([float(pos.get(c, 1.0)) or 1.0 for c in classes])
        return MultiLabelLoss(pos_weight, config.label_smoothing)
    weights = torch.tensor(balance["class_weights"], dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)


def validation_row(prob: np.ndarray, labels: torch.Tensor, task: str, criterion: nn.Module) -> dict:
    """Validation loss, accuracy and macro-F1 of one epoch (multi-label: at 0.5, plus the
    binary accuracy)."""
    from triview.evaluate import predicted

    y = labels.numpy()
    pred = predicted(prob, task)
    p = torch.from_numpy(prob).clamp(1e-7, 1 - 1e-7)
    if task == "multilabel":
        loss = float(nn.functional.binary_cross_entropy(p, labels.float()))
    else:
        weight = getattr(criterion, "weight", None)
        loss = float(nn.functional.nll_loss(torch.log(p), labels,
                                            weight=None if weight is None else weight.cpu()))
    row = {"val_loss": loss, "val_accuracy": float(accuracy_score(y, pred)),
           "val_macro_f1": macro_f1(y, pred)}
    if task == "multilabel":
        row["val_binary_accuracy"] = float((pred == y).mean())
    return row


def train_one_epoch(model: nn.Module, batches_iter, criterion, optimizer, scheduler, scaler,
                    config: TrainConfig, device: torch.device, dtype: torch.dtype | None) -> float:
    """One pass over ``batches_iter`` (float images, labels): autocast, gradient scaling,
    accumulation every ``config.accumulate`` batches, clipping, one scheduler step per
    optimiser step. Returns the summed loss (mean loss x batch size)."""
    model.train()
    total_loss, pending = torch.zeros((), device=device), 0
    optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        if config.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    for batch, labels in batches_iter:
        batch = batch.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(model(batch), labels)
        scaler.scale(loss / config.accumulate).backward()
        pending += 1
        if pending == config.accumulate:
            step()
            pending = 0
        total_loss += loss.detach().float() * len(labels)  # no host sync per batch
    if pending:  # the epoch's last, partial accumulation
        step()
    return float(total_loss)


@dataclass
class FitResult:
    net: BranchNet             # on the CPU, with the best epoch's weights
    history: list[dict]
    best_epoch: int
    best_f1: float
    stopped_early: bool
    resumed_from_epoch: int
    parameters: dict
    pretrained: str | None
    device: torch.device
    world_size: int


def _shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of an epoch's order; padded (by wrapping round) so that every
    rank runs the same number of batches, as DistributedSampler does."""
    if world == 1:
        return order
    total = -(-len(order) // world) * world
    padded = torch.cat([order, order[:total - len(order)]])
    return padded[rank::world]


def fit(config: TrainConfig, train: ViewData, val: ViewData, classes: list[str], task: str,
        criterion: nn.Module, view: str, ckpt_dir: str, run_id: str | None = None,
        online=None, log=print, push: bool = True, stage: str | None = None) -> FitResult:
    """Train a fresh branch on ``train``, choosing the epoch by validation macro-F1.

    Checkpoints go to ``ckpt_dir`` every epoch and a matching checkpoint found there is
    resumed. Under ``torchrun`` (a process group is initialised) the model is wrapped
    in DistributedDataParallel: every rank trains on its share of each epoch with
    ``batch_size / world_size`` images per step, rank 0 alone validates (and tells the
    others what it found), writes checkpoints and pushes metrics.
    """
    from triview import distributed as ddp

    rank, world = ddp.rank_and_world()
    torch.manual_seed(config.seed)
    image_size = int(train.images.shape[-1])
    device = training_device()
    dtype = amp_dtype(config, device)
    backbone = create_backbone(config.backbone, len(classes), image_size, config.hidden)
    pretrained = load_pretrained(backbone, config.weights) if config.weights else None
    if config.finetune not in ("full", "linear_probe"):
        raise ValueError(f"unknown finetune mode {config.finetune!r}; choose full or linear_probe")
    frozen = config.finetune == "linear_probe"
    set_backbone_frozen(backbone, frozen)
    net = BranchNet(backbone, config.normalization)
    params = count_parameters(net)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    net = net.to(device=device, memory_format=memory_format)
    model = ddp.wrap(net, device, config.compile)
    criterion = criterion.to(device)
    optimizer = make_optimizer(config, net.parameters())
    if config.accumulate < 1:
        raise ValueError(f"accumulate must be at least 1, got {config.accumulate}")
    per_rank_batch = max(1, config.batch_size // world)
    per_rank_images = -(-len(train.labels) // world)
    batches_per_epoch = -(-per_rank_images // per_rank_batch)
    steps_per_epoch = -(-batches_per_epoch // config.accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(config.seed)
    if rank == 0:
        log(f"[{view}] {config.backbone} ({task}) on {device} x{world}: "
            f"{params['trainable'] / 1e6:.2f}M trainable, {params['frozen'] / 1e6:.2f}M frozen "
            f"parameters; {config.optimizer} + {config.scheduler}, amp {dtype or 'off'}"
            + (f"; weights {config.weights} ({pretrained})" if pretrained else ""))

    history, best_f1, best_state, best_epoch = [], -1.0, None, 0
    key = _resume_key(config, view, classes, len(train.labels), task, world)
    first_epoch = 1
    state = load_checkpoint(ckpt_dir, key)
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_f1, best_epoch = state["history"], state["best_f1"], state["best_epoch"]
        best_state = _load(_join(ckpt_dir, CHECKPOINT_BEST))
        first_epoch = state["epoch"] + 1
        if rank == 0:
            log(f"[{view}] resuming from the checkpoint of epoch {state['epoch']} in {ckpt_dir}")
    stopped_early = False
    for epoch in range(first_epoch, config.epochs + 1):
        if config.patience and best_epoch and epoch - best_epoch > config.patience:
            stopped_early = True  # (a resumed run that had already run out of patience)
            break
        if frozen and config.unfreeze_epoch and epoch >= config.unfreeze_epoch:
            set_backbone_frozen(backbone, False)
            frozen = False
            model = ddp.wrap(net, device, config.compile)  # DDP registers trainable parameters once
            if rank == 0:
                log(f"[{view}] epoch {epoch}: backbone unfrozen, fine-tuning everything")
        start = time.perf_counter()
        order = torch.randperm(len(train.labels), generator=generator)
        mine = _shard(order, rank, world)
        total_loss = train_one_epoch(
            model, batches(train, mine, per_rank_batch, memory_format, online, epoch),
            criterion, optimizer, scheduler, scaler, config, device, dtype)
        total_loss = ddp.sum_across(total_loss)
        recalibrate_batchnorm(net, train.images[order], config.batch_size, memory_format)
        seconds = time.perf_counter() - start
        row = None
        if rank == 0:
            val_prob = predict_proba(net, val.images, task=task)
            row = {"epoch": epoch, "train_loss": total_loss / (len(mine) * world),
                   **validation_row(val_prob, val.labels, task, criterion),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
                   "images_per_s": round(len(mine) * world / seconds, 1)}
        row = ddp.broadcast(row)  # every rank takes the same early-stopping decision
        history.append(row)
        if rank == 0:
            log(f"[{view}] epoch {epoch}/{config.epochs} loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} "
                f"val_macro_f1 {row['val_macro_f1']:.4f} ({row['images_per_s']:.0f} img/s)")
            if push:
                metrics.push(stage or f"train-branch-{view}", {
                    "epoch": epoch, "train_loss": row["train_loss"], "val_loss": row["val_loss"],
                    "val_macro_f1": row["val_macro_f1"], "learning_rate": row["lr"],
                    "images_per_second": row["images_per_s"]}, run_id)
        if row["val_macro_f1"] > best_f1:
            best_f1, best_epoch = row["val_macro_f1"], epoch
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            if rank == 0:
                _save(best_state, _join(ckpt_dir, CHECKPOINT_BEST))
        # best.pt first: a last.pt on disk always has its best.pt beside it
        if rank == 0:
            _save({"key": key, "epoch": epoch, "model": net.state_dict(),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "generator": generator.get_state(),
                   "torch_rng": torch.get_rng_state(), "history": history, "best_f1": best_f1,
                   "best_epoch": best_epoch},
                  _join(ckpt_dir, CHECKPOINT_LAST))
        ddp.barrier()
        if config.patience and epoch - best_epoch >= config.patience and epoch < config.epochs:
            if rank == 0:
                log(f"[{view}] no better val macro-F1 for {config.patience} epochs: stopping "
                    f"after epoch {epoch} (best {best_epoch})")
            stopped_early = True
            break

    net = net.cpu()
    net.load_state_dict(best_state)
    return FitResult(net, history, best_epoch, best_f1, stopped_early, first_epoch - 1, params,
                     pretrained, device, world)


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
                task: str, criterion: nn.Module, view: str, ckpt_dir: str, online, log=print
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold probabilities for the voter: ``config.voter_folds`` extra branches,
    each trained without one fold of the training images (and their augmented copies)
    and predicting that fold. Returns (probabilities, image ids, labels) of the real
    training crops. Each fold checkpoints (and resumes) under ``ckpt_dir/fold-k``."""
    from triview import distributed as ddp

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
                     _join(ckpt_dir, f"fold-{k}"), online=online, log=lambda *a: None, push=False)
        probs.append(predict_proba(result.net, heldout.images, task=task))
        ids.extend(heldout.image_ids)
        labels.append(heldout.labels.numpy())
    return np.concatenate(probs), np.array(ids), np.concatenate(labels)


def train_branch(views_dir: str | Path, augmented_dir: str | Path | None, balance_dir: str | Path,
                 view: str, out_dir: str | Path, config: TrainConfig, log=print,
                 stage: str | None = None) -> dict:
    """Train the branch for ``view``; write model, history and val/test probabilities
    (and, with ``voter_folds > 1``, out-of-fold probabilities of the training images).
    ``stage`` names the per-epoch metrics group (default ``train-branch-<view>``).

    Returns a summary with the best epoch and its validation metrics. Under torchrun,
    every rank trains and rank 0 alone writes.
    """
    from triview import distributed as ddp
    from triview.evaluate import tune_thresholds

    ddp.init_from_env()
    rank, world = ddp.rank_and_world()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if world == 1 and "OMP_NUM_THREADS" not in os.environ:  # an explicit setting wins
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    views_dir = Path(views_dir)
    classes = mf.read_classes(views_dir)
    tables = [(views_dir, mf.read_views(views_dir))]
    if config.task not in ("auto",) + mf.TASKS:
        raise ValueError(f"unknown task {config.task!r}; choose auto, multiclass or multilabel")
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
    ckpt_dir = config.checkpoint_dir or str(Path(out_dir) / "checkpoints")
    result = fit(config, train, val, classes, task, criterion, view, ckpt_dir,
                 metrics.run_id_for(out_dir), online, log, stage=stage)
    oof = None
    if config.voter_folds > 1:
        oof = out_of_fold(config, train, val, classes, task, criterion, view, ckpt_dir, online, log)
    digest = ddp.parameter_digest(result.net)
    ddp.write_rank_report(out_dir, {"rank": rank, "world_size": world, "parameter_digest": digest,
                                    "images_per_epoch": -(-len(train.labels) // world)})
    summary = {"view": view, "task": task, "best_epoch": result.best_epoch,
               "val_macro_f1": result.best_f1,
               "val_accuracy": result.history[result.best_epoch - 1]["val_accuracy"],
               "parameters": result.parameters, "epochs_run": len(result.history),
               "resumed_from_epoch": result.resumed_from_epoch,
               "stopped_early": result.stopped_early, "device": str(result.device),
               "world_size": world, "parameter_digest": digest,
               "seconds_per_epoch": float(np.mean([h["seconds"] for h in result.history]))}
    if rank != 0:
        return summary
    model, history = result.net, result.history
    val_prob = predict_proba(model, val.images, task=task)
    test_prob = predict_proba(model, test.images, task=task)
    thresholds = tune_thresholds(val.labels.numpy(), val_prob) if task == "multilabel" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp:
        torch.save(model.state_dict(), tmp)
    meta = {"view": view, "classes": classes, "image_size": image_size, "task": task,
            "config": asdict(config), "parameters": result.parameters,
            "best_epoch": result.best_epoch, "val_macro_f1": result.best_f1,
            "pretrained": result.pretrained, "world_size": world,
            "thresholds": None if thresholds is None else thresholds.tolist(),
            "input": f"float RGB in [0,1], NCHW; {config.normalization} normalisation inside the model",
            "output": "per-label logits (sigmoid)" if task == "multilabel" else "class logits (softmax)"}
    atomic_write_text(out / MODEL_META_FILE, json.dumps(meta, indent=2))
    atomic_write_text(out / HISTORY_FILE, pd.DataFrame(history).to_csv(index=False))
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
    with atomic_path(out / PREDICTIONS_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
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
    meta = json.loads((folder / MODEL_META_FILE).read_text())
    cfg = meta["config"]
    model = BranchNet(create_backbone(cfg["backbone"], len(meta["classes"]), meta["image_size"],
                                      cfg["hidden"]), cfg.get("normalization", "imagenet"))
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval(), meta


def load_predictions(folder: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / PREDICTIONS_FILE) as data:
        return {k: data[k] for k in data.files}
