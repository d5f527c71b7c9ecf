"""The training loop: one epoch, and :func:`fit`, which trains a fresh branch epoch by
epoch (checkpointing and resuming, early stopping, DDP when a process group exists) and
keeps the best epoch by validation macro-F1."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from sklearn.metrics import accuracy_score
from torch import nn

from triview import distributed as ddp
from triview import metrics
from triview import progress
from triview import weights as published_weights
from triview.models import (BranchNet, count_parameters, create_backbone, load_pretrained,
                            resolve_normalization, set_backbone_frozen, tta_transform)
from triview.scoring import macro_f1, predicted
from triview.train import checkpoint
from triview.train.config import TrainConfig, resume_key
from triview.train.data import StreamLoader, ViewData, as_float, batches
from triview.train.features import FeatureStore
from triview.train.shardimages import ShardImages
from triview.train.optim import amp_dtype, kernel, lr_factor, make_optimizer, training_device


#: Called with an epoch's history row as the epoch ends.
EpochCallback = Callable[[dict], None]


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
                  task: str = "multiclass") -> np.ndarray:
    """Class probabilities (softmax), or per-label probabilities (sigmoid) for multi-label."""
    model.eval()
    device = next(model.parameters()).device
    squash = torch.sigmoid if task == "multilabel" else (lambda z: torch.softmax(z, dim=1))
    out = [squash(model(as_float(images[i:i + batch_size].to(device))).float()).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The model's raw outputs (logits) for uint8 NCHW ``images``."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(as_float(images[i:i + batch_size].to(device))).float().cpu()
                      for i in range(0, len(images), batch_size)]).numpy()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor | None, batch_size: int,
                          memory_format=torch.contiguous_format, max_images: int = 1024,
                          batches=None) -> None:
    """Recompute BatchNorm running statistics as exact averages over training images
    ("precise BN"). The running averages lag behind fast-moving weights in short
    trainings, and evaluation with stale statistics can collapse to one class.
    ``batches``: float batches to use instead of slicing ``images`` (streamed crops)."""
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
    if batches is None:
        batches = (as_float(images[i:i + batch_size]).contiguous(memory_format=memory_format)
                   for i in range(0, min(len(images), max_images), batch_size))
    for batch in batches:
        model(batch.to(device))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was_training)


def validation_row(prob: np.ndarray, labels: torch.Tensor, task: str, criterion: nn.Module) -> dict:
    """Validation loss, accuracy and macro-F1 of one epoch (multi-label: at 0.5, plus the
    binary accuracy)."""
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
    if config.freeze_bn:
        set_batchnorm_eval(model)
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
    #: positions in ``train`` this rank drew in its last fine-tuning epoch (its shard)
    drawn: list[int] = field(default_factory=list)
    #: one row per epoch of the head phase (:func:`fit_head`'s ``curve``; [] without one)
    head_curve: list[dict] = field(default_factory=list)


def head_module(net: BranchNet) -> nn.Module:
    """The new head the backbone got from :func:`create_backbone` (a Linear, or the hidden
    ReLU head around one)."""
    return net.backbone.get_submodule(net.backbone.triview_head)


@torch.no_grad()
def head_inputs(net: BranchNet, images: torch.Tensor, batch_size: int = 64,
                memory_format=torch.contiguous_format, transform=None) -> torch.Tensor:
    """What the head sees for each image (the frozen backbone's pooled features), computed
    once: a forward hook on the head records its input. ``transform``: applied to each float
    batch first (a test-time pass computed on floats, e.g. ``zoom``)."""
    device = next(net.parameters()).device
    captured: list[torch.Tensor] = []
    hook = head_module(net).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().float().cpu()))
    was_training = net.training
    net.eval()
    try:
        for i in range(0, len(images), batch_size):
            batch = as_float(images[i:i + batch_size].to(device))
            if transform is not None:
                batch = transform(batch)
            net(batch.contiguous(memory_format=memory_format))
    finally:
        hook.remove()
        net.train(was_training)
    return torch.cat(captured)


def fit_head(net: BranchNet, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
             val_y: torch.Tensor, criterion: nn.Module, config: TrainConfig, task: str,
             on_epoch: EpochCallback | None = None) -> dict:
    """Train only the head on cached features for ``config.head_epochs`` (AdamW, cosine
    from head_lr, the branch's loss) and keep its best epoch by validation macro-F1.
    Returns that epoch's history row (``epoch`` 0, ``phase`` head), with every head
    epoch's row under ``curve`` (what the report draws); ``on_epoch`` sees every epoch's
    row as it ends."""
    head = head_module(net)
    device = next(head.parameters()).device
    head.train()
    generator = torch.Generator().manual_seed(config.seed)
    params = list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.head_lr, weight_decay=config.weight_decay,
                                  **kernel(params))
    steps = config.head_epochs * -(-len(train_y) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    squash = torch.sigmoid if task == "multilabel" else (lambda z: torch.softmax(z, dim=1))
    best, best_state, start, curve = None, None, time.perf_counter(), []
    train_x, train_y, val_x = train_x.to(device), train_y.to(device), val_x.to(device)
    # the head's ops are tiny: on a busy CPU, waiting for a second OpenMP thread at every op
    # costs far more than the op itself
    with intra_op_threads(1 if device.type == "cpu" else torch.get_num_threads()):
        for epoch in range(1, config.head_epochs + 1):
            head.train()
            total = 0.0
            order = torch.randperm(len(train_y), generator=generator)
            for i in range(0, len(order), config.batch_size):
                idx = order[i:i + config.batch_size].to(device)
                loss = criterion(head(train_x[idx]), train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(idx)
            head.eval()
            with torch.no_grad():
                val_prob = squash(head(val_x).float()).cpu().numpy()
            row = {"epoch": 0, "phase": "head", "head_epoch": epoch, "train_loss": total / len(train_y),
                   **validation_row(val_prob, val_y, task, criterion),
                   "lr": optimizer.param_groups[0]["lr"]}
            curve.append(row)
            if best is None or row["val_macro_f1"] > best["val_macro_f1"]:
                best, best_state = row, {k: v.detach().clone() for k, v in head.state_dict().items()}
            if on_epoch is not None:
                on_epoch(row)
    head.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    return {**best, "seconds": round(seconds, 3),
            "images_per_s": round(config.head_epochs * len(train_y) / max(seconds, 1e-9), 1),
            "curve": curve}


def parameter_groups(net: BranchNet, config: TrainConfig) -> list[dict]:
    """The head at ``lr``, the pretrained backbone at ``lr * backbone_lr_scale``."""
    head = {id(p) for p in head_module(net).parameters()}
    # frozen parameters too: a linear probe that unfreezes later trains them with this
    # optimizer (until then they have no gradient, so it leaves them alone)
    everything = list(net.parameters())
    return [{"params": [p for p in everything if id(p) in head], "lr": config.lr},
            {"params": [p for p in everything if id(p) not in head],
             "lr": config.lr * config.backbone_lr_scale}]


def set_batchnorm_eval(net: nn.Module) -> None:
    """BatchNorm layers to inference mode (``freeze_bn``): their statistics stay as loaded."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of an epoch's order; padded (by wrapping round) so that every
    rank runs the same number of batches, as DistributedSampler does."""
    if world == 1:
        return order
    total = -(-len(order) // world) * world
    padded = torch.cat([order, order[:total - len(order)]])
    return padded[rank::world]


def by_shard(shard_of: np.ndarray, order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of an epoch when the crops stream from shards: each rank reads
    its own shards. The shards are dealt, in the order the epoch's permutation ``order``
    first meets them, each to the rank holding fewest crops so far; a rank's crops keep
    ``order``'s order. Every rank gets ceil(N / world) positions, as :func:`_shard` gives:
    a rank short of that wraps round its own crops, a rank over it leaves its last ones
    for this epoch (another epoch deals the shards afresh). With fewer shards than ranks,
    :func:`_shard`."""
    order_np = order.numpy()
    groups = shard_of[order_np]
    first = list(dict.fromkeys(groups.tolist()))  # shards in the order the epoch meets them
    if world == 1 or len(first) < world:
        return _shard(order, rank, world)
    counts = np.bincount(shard_of, minlength=int(shard_of.max()) + 1)
    load, owner = [0] * world, {}
    for shard in first:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[shard] = r
        load[r] += int(counts[shard])
    mask = np.fromiter((owner[g] == rank for g in groups.tolist()), bool, len(groups))
    mine = order_np[mask]
    per_rank = -(-len(order_np) // world)
    if len(mine) < per_rank:
        mine = np.resize(mine, per_rank)  # wraps round
    return torch.from_numpy(np.ascontiguousarray(mine[:per_rank]))


def frozen_features(net: BranchNet, images: torch.Tensor, memory_format=torch.contiguous_format,
                    store: FeatureStore | None = None, transform: str = "") -> torch.Tensor:
    """:func:`head_inputs` of ``images``, read from ``store`` where it holds them.
    ``transform``: a test-time pass computed on floats (``zoom``: :func:`tta_transform`)
    applied to each crop first; the store keys it by the crop's pixels and its name."""
    fn = (lambda x: tta_transform(x, transform)) if transform else None
    if store is None:
        return head_inputs(net, images, memory_format=memory_format, transform=fn)

    def compute(n: BranchNet, x: torch.Tensor) -> torch.Tensor:
        with intra_op_threads(store.threads or torch.get_num_threads()):
            return head_inputs(n, x, memory_format=memory_format, transform=fn)
    return store.features(net, images, compute, memory_format, transform)


@torch.no_grad()
def predict_proba_with(model: BranchNet, images: torch.Tensor, task: str = "multiclass",
                       store: FeatureStore | None = None,
                       memory_format=torch.contiguous_format) -> np.ndarray:
    """:func:`predict_proba`; with a ``store`` that holds features of ``model``'s backbone
    (the head phase computed them, and the branch kept that backbone), the head applied to
    them: the crops the store lacks are computed and kept. A fine-tuned backbone is not
    stored: no other training would meet it."""
    if store is None or not store.holds(model, memory_format):
        return predict_proba(model, images, task=task)
    model.eval()
    x = frozen_features(model, images, memory_format, store).to(next(model.parameters()).device)
    logits = head_module(model)(x).float()
    prob = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
    return prob.cpu().numpy()


def _head_phase(net: BranchNet, train: ViewData, val: ViewData, criterion: nn.Module,
                config: TrainConfig, task: str, memory_format,
                store: FeatureStore | None = None, on_epoch: EpochCallback | None = None) -> dict:
    """Features of the training crops and of the validation crops through the frozen
    backbone, once (or from ``store``); then the head: with ``head_folds`` cross-fitted on
    the real training crops' features (:func:`triview.train.head.cross_fit`, one row, no
    curve), else :func:`fit_head` for ``head_epochs``. Its validation scores are the row
    fine-tuning has to beat. The backbone is untouched."""
    start = time.perf_counter()
    if not config.head_folds:
        train_x = frozen_features(net, train.images, memory_format, store)
        val_x = frozen_features(net, val.images, memory_format, store)
        feature_seconds = time.perf_counter() - start
        row = fit_head(net, train_x, train.labels, val_x, val.labels,
                       criterion.to(next(net.parameters()).device), config, task, on_epoch)
        return {**row, "feature_seconds": round(feature_seconds, 3),
                "seconds": round(feature_seconds + row["seconds"], 3)}
    from triview.train.head import PassFeatures, cross_fit

    real = train if train.real is None else train.subset(torch.nonzero(train.real).flatten())
    train_x = frozen_features(net, real.images, memory_format, store).numpy()
    val_x = frozen_features(net, val.images, memory_format, store)
    feature_seconds = time.perf_counter() - start
    head = head_module(net)
    pool = PassFeatures(np.asarray(real.image_ids), real.labels.numpy(), {"identity": train_x})
    fitted = cross_fit(pool.unique(), criterion.cpu(), task, head.out_features,
                       train_passes=("identity",), folds=config.head_folds, seed=config.seed)
    fitted.head.load_into(head)
    with torch.no_grad():
        logits = head(val_x.to(next(head.parameters()).device)).float().cpu()
    val_prob = (torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, 1)).numpy()
    chosen = next(r for r in fitted.table if r["l2"] == fitted.l2)
    row = {"epoch": 0, "phase": "head", "head_epoch": 1, "train_loss": chosen["oof_log_loss"],
           **validation_row(val_prob, val.labels, task, criterion), "lr": float("nan"),
           "l2": fitted.l2, "feature_seconds": round(feature_seconds, 3),
           "seconds": round(feature_seconds + fitted.seconds, 3)}
    if on_epoch is not None:
        on_epoch(row)
    return {**row, "curve": []}


def build_branch(config: TrainConfig, n_classes: int, image_size: int):
    """A fresh branch (the backbone with a new head, its input normalisation) with its
    pretrained weights loaded; returns (net, the weights' record or None, the resolved file)."""
    backbone = create_backbone(config.backbone, n_classes, image_size, config.hidden)
    found = published_weights.resolve(config.backbone, config.weights, config.weights_root)
    pretrained = None
    if found is not None:
        pretrained = {**load_pretrained(backbone, published_weights.load_state(found, backbone)),
                      **found.record()}
    net = BranchNet(backbone, resolve_normalization(config.normalization, config.backbone))
    return net, pretrained, found


def fit(config: TrainConfig, train: ViewData, val: ViewData, classes: list[str], task: str,
        criterion: nn.Module, view: str, ckpt_dir: str, run_id: str | None = None,
        online=None, log=print, push: bool = True, stage: str | None = None,
        features: FeatureStore | None = None, on_epoch: EpochCallback | None = None) -> FitResult:
    """Train a fresh branch on ``train``, choosing the epoch by validation macro-F1.

    ``features``: a store of frozen features the head phase reads and fills.
    ``on_epoch``: called on rank 0 with each epoch's history row as it ends (head epochs:
    ``phase`` head, ``head_epoch`` k; fine-tuning epochs: ``phase`` finetune, ``epoch`` k);
    an exception it raises stops the training (a search prunes a trial so).

    Checkpoints go to ``ckpt_dir`` every epoch and a matching checkpoint found there is
    resumed. Under ``torchrun`` (a process group is initialised) the model is wrapped
    in DistributedDataParallel: every rank trains on its share of each epoch with
    ``batch_size / world_size`` images per step, rank 0 alone validates (and tells the
    others what it found), writes checkpoints and pushes metrics.
    """
    rank, world = ddp.rank_and_world()
    torch.manual_seed(config.seed)
    image_size = int(train.images.shape[-1])
    device = training_device()
    dtype = amp_dtype(config, device)
    net, pretrained, found = build_branch(config, len(classes), image_size)
    backbone = net.backbone
    frozen = config.finetune == "linear_probe"
    set_backbone_frozen(backbone, frozen)
    params = count_parameters(net)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    net = net.to(device=device, memory_format=memory_format)
    model = ddp.wrap(net, device, config.compile)
    criterion = criterion.to(device)
    optimizer = make_optimizer(config, parameter_groups(net, config))
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
            + (f"; {config.weights} weights from {found.source} {found.location} "
               f"(sha256 {found.sha256[:12]}, {pretrained['loaded']} tensors)" if found else ""))

    history, best_f1, best_state, best_epoch, head_curve = [], -1.0, None, 0, []
    key = resume_key(config, view, classes, len(train.labels), task, world)
    first_epoch = 1
    state = checkpoint.load_checkpoint(ckpt_dir, key)
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_f1, best_epoch = state["history"], state["best_f1"], state["best_epoch"]
        head_curve = state.get("head_curve", [])
        best_state = checkpoint.load_best(ckpt_dir)
        first_epoch = state["epoch"] + 1
        if rank == 0:
            log(f"[{view}] resuming from the checkpoint of epoch {state['epoch']} in {ckpt_dir}")
    elif config.head_folds or config.head_epochs:
        if rank == 0:
            progress.Reporter("phase", 1, desc=view).note(phase="head on cached features")
        row = _head_phase(net, train, val, criterion, config, task, memory_format, features,
                          on_epoch if rank == 0 else None)
        head_curve = row.pop("curve")
        history, best_f1, best_epoch = [row], row["val_macro_f1"], 0
        best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        if rank == 0:
            how = (f"cross-fitted over {config.head_folds} folds (L2 {row['l2']:g})"
                   if config.head_folds else f"{config.head_epochs} epochs, best {row['head_epoch']}")
            log(f"[{view}] head on cached features: {how} in {row['seconds']:.1f} s (features "
                f"{row['feature_seconds']:.1f} s): val_acc {row['val_accuracy']:.4f} "
                f"val_macro_f1 {row['val_macro_f1']:.4f}")
            checkpoint.save_best(best_state, ckpt_dir)
            checkpoint.save_last({"key": key, "epoch": 0, "model": net.state_dict(),
                                  "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                  "generator": generator.get_state(),
                                  "torch_rng": torch.get_rng_state(), "history": history,
                                  "best_f1": best_f1, "best_epoch": best_epoch,
                                  "head_curve": head_curve}, ckpt_dir)
    stopped_early = False
    drawn: list[int] = []
    # live progress for the local console (a no-op unless TRIVIEW_PROGRESS is set)
    events = progress.Reporter("batch", max(0, config.epochs - first_epoch + 1) * batches_per_epoch,
                               desc=view, enabled=rank == 0)
    # crops in shards: one loader whose worker processes serve every epoch
    stream = (StreamLoader(train, memory_format, config.loader_workers)
              if isinstance(train.images, ShardImages) and first_epoch <= config.epochs else None)
    for epoch in range(first_epoch, config.epochs + 1):
        events.note(epoch=f"{epoch}/{config.epochs}")
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
        mine = (by_shard(train.images.shard_of(), order, rank, world)
                if isinstance(train.images, ShardImages) else _shard(order, rank, world))
        drawn = mine.tolist()
        total_loss = train_one_epoch(
            model, events.track(stream(mine, per_rank_batch, online, epoch) if stream else
                                batches(train, mine, per_rank_batch, memory_format, online, epoch)),
            criterion, optimizer, scheduler, scaler, config, device, dtype)
        total_loss = ddp.sum_across(total_loss)
        if not config.freeze_bn and config.precise_bn:
            recalibrate_batchnorm(net, None if stream else train.images[order[:config.precise_bn]],
                                  config.batch_size, memory_format, max_images=config.precise_bn,
                                  batches=None if stream is None else (b for b, _ in stream(
                                      order[:config.precise_bn], config.batch_size)))
        elif not config.freeze_bn:
            ddp.broadcast_buffers(net)  # running statistics: rank 0's, as DDP's next step would
        seconds = time.perf_counter() - start
        row = None
        if rank == 0:
            val_prob = predict_proba(net, val.images, task=task)
            row = {"epoch": epoch, "phase": "finetune",
                   "train_loss": total_loss / (len(mine) * world),
                   **validation_row(val_prob, val.labels, task, criterion),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
                   "images_per_s": round(len(mine) * world / seconds, 1)}
        row = ddp.broadcast(row)  # every rank takes the same early-stopping decision
        history.append(row)
        if rank == 0 and on_epoch is not None:
            on_epoch(row)
        if rank == 0:
            log(f"[{view}] epoch {epoch}/{config.epochs} loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} "
                f"val_macro_f1 {row['val_macro_f1']:.4f} ({row['images_per_s']:.0f} img/s)")
            events.note(loss=round(row["train_loss"], 4), val_macro_f1=round(row["val_macro_f1"], 4))
            if push:
                metrics.push(stage or f"train-branch-{view}", {
                    "epoch": epoch, "train_loss": row["train_loss"], "val_loss": row["val_loss"],
                    "val_macro_f1": row["val_macro_f1"], "learning_rate": row["lr"],
                    "images_per_second": row["images_per_s"]}, run_id)
        if row["val_macro_f1"] > best_f1:
            best_f1, best_epoch = row["val_macro_f1"], epoch
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            if rank == 0:
                checkpoint.save_best(best_state, ckpt_dir)
        # best.pt first: a last.pt on disk always has its best.pt beside it
        if rank == 0:
            checkpoint.save_last({"key": key, "epoch": epoch, "model": net.state_dict(),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "generator": generator.get_state(),
                   "torch_rng": torch.get_rng_state(), "history": history, "best_f1": best_f1,
                   "best_epoch": best_epoch, "head_curve": head_curve},
                  ckpt_dir)
        ddp.barrier()
        if config.patience and epoch - best_epoch >= config.patience and epoch < config.epochs:
            if rank == 0:
                log(f"[{view}] no better val macro-F1 for {config.patience} epochs: stopping "
                    f"after epoch {epoch} (best {best_epoch})")
            stopped_early = True
            break

    if stream is not None:
        stream.close()
    net = net.cpu()
    net.load_state_dict(best_state)
    return FitResult(net, history, best_epoch, best_f1, stopped_early, first_epoch - 1, params,
                     pretrained, device, world, drawn, head_curve)
