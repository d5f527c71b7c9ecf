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
    batch_size: int = 128,
    lr: float = 0.003,
    lrf: float = 0.05,
    hidden: int = 0,
    label_smoothing: float = 0.1,
    weight_decay: float = 0.0001,
    seed: int = 0,
    checkpoint_root: str = "",
    run_id: str = "",
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
        lr: Initial learning rate (AdamW).
        lrf: Final learning rate as a fraction of ``lr`` (cosine decay).
        hidden: Units of an extra ReLU layer in the head (0: a single linear layer).
        label_smoothing: Label smoothing of the cross-entropy loss.
        weight_decay: Decoupled weight decay (AdamW).
        seed: Seed for initialisation and shuffling.
        checkpoint_root: Durable folder for per-epoch checkpoints, as
            ``<checkpoint_root>/<run_id>/<view>`` (e.g. a mounted volume); a retried task
            resumes from there. Empty: inside the model output (enough for kfp.local).
        run_id: The pipeline run's id (the pipeline passes KFP's job-id placeholder).
    """
    import json

    from triview.stages import train_branch_stage

    with open(f"{views.path}/geometry.json") as fh:
        view = json.load(fh)["views"][view_index]
    checkpoint_dir = f"{checkpoint_root.rstrip('/')}/{run_id}/{view}" if checkpoint_root else ""
    rec = train_branch_stage(views.path, augmented.path, balance.path, view, model.path,
                             backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr,
                             lrf=lrf, hidden=hidden, label_smoothing=label_smoothing,
                             weight_decay=weight_decay, seed=seed, checkpoint_dir=checkpoint_dir)
    model.metadata.update({"view": view, "backbone": backbone, "best_epoch": rec["best_epoch"],
                           "parameters": rec["parameters"]["total"],
                           "resumed_from_epoch": rec["resumed_from_epoch"]})
    metrics.log_metric("val_macro_f1", rec["val_macro_f1"])
    metrics.log_metric("val_accuracy", rec["val_accuracy"])
    metrics.log_metric("best_epoch", rec["best_epoch"])
    metrics.log_metric("seconds_per_epoch", rec["seconds_per_epoch"])
