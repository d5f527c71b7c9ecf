from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_branch(
    views: Input[Dataset],
    augmented: Input[Dataset],
    balance: Input[Dataset],
    view_index: int,
    model: Output[Model],
    metrics: Output[Metrics],
    backbone: str = "shufflenet_v2_x1_0",
    epochs: int = 8,
    batch_size: int = 32,
    lr: float = 0.003,
    lrf: float = 0.05,
    hidden: int = 0,
    label_smoothing: float = 0.1,
    weight_decay: float = 0.0001,
    seed: int = 0,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    scheduler: str = "cosine",
    warmup_epochs: float = 0.0,
    milestones: str = "",
    poly_power: float = 0.9,
    patience: int = 0,
    clip_grad_norm: float = 0.0,
    accumulate: int = 1,
    amp: str = "auto",
    compile: bool = False,
    deterministic: bool = False,
    normalization: str = "imagenet",
    weights: str = "",
    finetune: str = "full",
    unfreeze_epoch: int = 0,
    checkpoint_root: str = "",
    task: str = "auto",
    voter_folds: int = 0,
    ddp_procs: int = 0,
    run_id: str = "",
    repeat: bool = False,
):
    """Train one view's backbone; keep the best epoch by validation macro-F1.

    Args:
        views: Cropped views dataset (train/val/test crops).
        augmented: Augmented training crops, added to the training split.
        balance: Class weights for the cross-entropy loss.
        view_index: Which view (0, 1, 2 in the layout's order, e.g. left/center/right).
        model: Output folder: weights, ``model.json``, ``history.csv`` and the branch's
            validation and test probabilities (``predictions.npz``).
        metrics: Best-epoch validation metrics.
        backbone: Backbone name from the registry (e.g. resnet18, densenet121, vit_b_16).
        epochs: Training epochs.
        batch_size: Images per optimisation step.
        lr: Initial learning rate.
        lrf: Final learning rate as a fraction of ``lr``, whatever the schedule.
        hidden: Units of an extra ReLU layer in the head (0: a single linear layer).
        label_smoothing: Label smoothing of the cross-entropy loss.
        weight_decay: Weight decay (decoupled for AdamW).
        seed: Seed for initialisation and shuffling.
        optimizer: adamw, adam or sgd (Nesterov momentum).
        momentum: SGD momentum.
        scheduler: cosine, linear, poly, step, multistep or constant (lr -> lr * lrf).
        warmup_epochs: Linear warmup from lr/10, in (fractional) epochs.
        milestones: step: "N" (every N epochs); multistep: "e1,e2,..." epochs.
        poly_power: Exponent of the poly schedule.
        patience: Stop after this many epochs without a better val macro-F1 (0: never).
        clip_grad_norm: Maximum global gradient norm (0: no clipping).
        accumulate: Optimiser step every N batches.
        amp: auto, off, bf16 or fp16 (mixed precision on GPU; CPU runs full precision).
        compile: torch.compile the model.
        deterministic: Deterministic algorithms only (reproducible on GPU, slower).
        normalization: imagenet (mean/std), per_sample (standardise each image) or unit (/255).
        weights: Pretrained backbone state dict: a local file or s3:// URI, .safetensors
            preferred (.pt/.pth loaded with weights_only); never a hub download.
        finetune: full (train everything) or linear_probe (train only the new head).
        unfreeze_epoch: With linear_probe, fine-tune everything from this epoch (0: never).
        checkpoint_root: Durable location for per-epoch checkpoints, as
            ``<checkpoint_root>/<run_id>/<view>`` (a repeat:
            ``<checkpoint_root>/<run_id>/seed-<seed>/<view>``): an ``s3://bucket/prefix`` (MinIO) or a
            mounted volume; a retried task resumes from there. Empty: inside the model
            output (enough for kfp.local).
        task: auto (multilabel when some image has several labels), multiclass (softmax
            cross-entropy) or multilabel (sigmoid BCE with per-label pos_weight and
            per-label thresholds tuned on validation).
        voter_folds: >1: also train that many fold models and write out-of-fold
            probabilities of the training images for the voter (costs K x the training).
        ddp_procs: DistributedDataParallel processes under torchrun (0: one per visible
            GPU when the node shows more than one).
        run_id: The pipeline run's id (the pipeline passes KFP's job-id placeholder).
        repeat: This task is a repeat of the run with another seed (``repeats > 1``): its
            checkpoints, record and metrics are kept apart under ``seed-<seed>``.
    """
    import json

    from triview.stages import train_branch_stage

    with open(f"{views.path}/geometry.json") as fh:
        view = json.load(fh)["views"][view_index]
    run_folder = f"{run_id}/seed-{seed}" if repeat else run_id
    checkpoint_dir = f"{checkpoint_root.rstrip('/')}/{run_folder}/{view}" if checkpoint_root else ""
    rec = train_branch_stage(views.path, augmented.path, balance.path, view, model.path,
                             repeat=repeat,
                             backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr,
                             lrf=lrf, hidden=hidden, label_smoothing=label_smoothing,
                             weight_decay=weight_decay, seed=seed, optimizer=optimizer,
                             momentum=momentum, scheduler=scheduler, warmup_epochs=warmup_epochs,
                             milestones=milestones, poly_power=poly_power, patience=patience,
                             clip_grad_norm=clip_grad_norm, accumulate=accumulate, amp=amp,
                             compile=compile, deterministic=deterministic,
                             normalization=normalization, weights=weights, finetune=finetune,
                             unfreeze_epoch=unfreeze_epoch, checkpoint_dir=checkpoint_dir,
                             task=task, voter_folds=voter_folds, ddp_procs=ddp_procs)
    model.metadata.update({"view": view, "backbone": backbone, "best_epoch": rec["best_epoch"],
                           "task": rec["task"], "world_size": rec["world_size"],
                           "parameters": rec["parameters"]["total"],
                           "resumed_from_epoch": rec["resumed_from_epoch"],
                           "device": rec["device"], "epochs_run": rec["epochs_run"]})
    metrics.log_metric("val_macro_f1", rec["val_macro_f1"])
    metrics.log_metric("val_accuracy", rec["val_accuracy"])
    metrics.log_metric("best_epoch", rec["best_epoch"])
    metrics.log_metric("seconds_per_epoch", rec["seconds_per_epoch"])
