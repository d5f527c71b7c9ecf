"""Networks from the backbone registry (:mod:`triview.backbones`), heads, input
normalisation and pretrained weights; nothing is ever downloaded from a hub."""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from triview.backbones import get_backbone

MAX_PARAMS = 100_000_000


def build_network(name: str, image_size: int) -> nn.Module:
    """The registry's backbone ``name`` with its builder's own initialisation (no download)."""
    entry = get_backbone(name)
    if entry.builder == "timm":
        import timm

        return timm.create_model(entry.constructor, pretrained=False)
    constructor = getattr(tvm, entry.constructor)
    return constructor(weights=None, image_size=image_size) if entry.sized else constructor(weights=None)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: mean and std of the fixed normalisations (per_sample and unit have none)
NORMALIZATION_CONSTANTS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                           "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def _replace_last_linear(model: nn.Module, num_classes: int, hidden: int) -> None:
    """Swap the classifier (the model's last Linear) for a new head."""
    name, last = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name, last = n, m
    if last is None:
        raise ValueError("backbone has no Linear classifier to replace")
    if hidden > 0:
        head: nn.Module = nn.Sequential(nn.Linear(last.in_features, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))
    else:
        head = nn.Linear(last.in_features, num_classes)
    parent = model
    *path, leaf = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, head)
    model.triview_head = name  # the module we replaced: what a linear probe trains


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def create_backbone(name: str, num_classes: int, image_size: int = 224, hidden: int = 0,
                    allow_large: bool = False) -> nn.Module:
    """Build backbone ``name`` with a fresh ``num_classes`` head (optionally ``hidden`` ReLU units)."""
    model = build_network(name, image_size)
    _replace_last_linear(model, num_classes, hidden)
    n = count_parameters(model)["total"]
    if n > MAX_PARAMS and not allow_large:
        raise ValueError(f"{name} has {n / 1e6:.1f}M parameters (> 100M); pass allow_large to use it")
    return model


NORMALIZATIONS = ("imagenet", "inception", "per_sample", "unit")


def resolve_normalization(mode: str, backbone: str) -> str:
    """``auto`` is what the backbone's published weights expect; anything else stays."""
    return get_backbone(backbone).normalization if mode == "auto" else mode


class Normalize(nn.Module):
    """Maps float images in [0, 1] (N, 3, H, W) to the backbone's input normalisation:
    ``imagenet`` (mean/std of ImageNet), ``inception`` (to [-1, 1], as TensorFlow's
    EfficientNet-Lite was trained), ``per_sample`` (each image to zero mean and unit
    variance) or ``unit`` (kept in [0, 1], i.e. /255 of the raw bytes)."""

    def __init__(self, mode: str = "imagenet") -> None:
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {mode!r}; choose from {NORMALIZATIONS}")
        self.mode = mode
        mean, std = NORMALIZATION_CONSTANTS.get(mode, NORMALIZATION_CONSTANTS["imagenet"])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in NORMALIZATION_CONSTANTS:
            return (x - self.mean) / self.std
        if self.mode == "per_sample":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            return (x - mean) / std
        return x


def load_pretrained(backbone: nn.Module, source) -> dict[str, int]:
    """Load a state dict (or a ``.safetensors`` / ``.pt`` file, local or ``s3://``, read
    with ``weights_only=True``) into ``backbone``.

    Tensors whose shape does not fit (the classifier of another class count) are
    skipped; a state dict that matches less than half of the backbone is refused (wrong
    architecture). Never downloads from a model hub.
    """
    if not isinstance(source, dict):
        from triview.weights import load_state, resolve

        source = load_state(resolve("", str(source)), backbone)
    own = backbone.state_dict()
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in source.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < 0.5 * len(own):
        raise ValueError(f"only {len(usable)} of {len(own)} tensors fit this backbone; is it "
                         "the right architecture?")
    backbone.load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "skipped": len(state) - len(usable),
            "missing": len(own) - len(usable)}


def head_parameters(backbone: nn.Module) -> list[str]:
    """Names of the head's parameters (the last Linear, or the hidden head around it)."""
    prefix = getattr(backbone, "triview_head", None)
    if prefix is None:
        raise ValueError("backbone was not built by create_backbone (no known head)")
    return [n for n, _ in backbone.named_parameters() if n.startswith(prefix + ".")]


def set_backbone_frozen(backbone: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) everything but the head: the linear-probe mode."""
    head = set(head_parameters(backbone))
    for name, p in backbone.named_parameters():
        p.requires_grad = (name in head) or not frozen


class BranchNet(nn.Module):
    """One view's classifier: normalisation + backbone; input float [0, 1], output logits."""

    def __init__(self, backbone: nn.Module, normalization: str = "imagenet") -> None:
        super().__init__()
        self.normalize = Normalize(normalization)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


#: Test-time augmentation: the passes each mode averages (``tta`` parameter). ``flip``
#: mirrors the crop left-right; ``zoom`` takes its central ZOOM_SIDE of each side and
#: resizes it back (a second scale of the same view).
TTA_MODES = {"none": ("identity",), "flip": ("identity", "flip"),
             "flip_zoom": ("identity", "flip", "zoom")}
ZOOM_SIDE = 0.8


def tta_transform(x: torch.Tensor, name: str) -> torch.Tensor:
    """One test-time pass of a float NCHW batch (ops that TorchScript and ONNX export)."""
    if name == "identity":
        return x
    if name == "flip":
        return torch.flip(x, dims=[3])
    if name == "zoom":
        h, w = int(x.shape[2]), int(x.shape[3])
        ch, cw = int(round(h * ZOOM_SIDE)), int(round(w * ZOOM_SIDE))
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = x[:, :, top:top + ch, left:left + cw]
        return nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
    raise ValueError(f"unknown test-time pass {name!r}; passes: identity, flip, zoom")


class ServedBranch(nn.Module):
    """A trained branch as the ensemble runs it: its logits averaged over the test-time
    passes, divided by its temperature (softmax or sigmoid of this output is the branch's
    calibrated probability)."""

    def __init__(self, net: nn.Module, passes: tuple[str, ...] = ("identity",),
                 temperature: float = 1.0) -> None:
        super().__init__()
        for name in passes:
            tta_transform(torch.zeros(1, 3, 4, 4), name)  # an unknown pass fails here
        self.net = net
        self.passes = tuple(passes)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.net(tta_transform(x, self.passes[0]))
        for name in self.passes[1:]:
            total = total + self.net(tta_transform(x, name))
        return total / (len(self.passes) * self.temperature)
