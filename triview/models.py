"""Backbones by name, from one registry over torchvision (no hub downloads)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm

MAX_PARAMS = 100_000_000

# name -> factory(image_size) returning an un-initialised-weights torchvision model.
BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": lambda size: tvm.resnet18(weights=None),
    "resnet34": lambda size: tvm.resnet34(weights=None),
    "resnet50": lambda size: tvm.resnet50(weights=None),
    "densenet121": lambda size: tvm.densenet121(weights=None),
    "efficientnet_v2_s": lambda size: tvm.efficientnet_v2_s(weights=None),
    "shufflenet_v2_x0_5": lambda size: tvm.shufflenet_v2_x0_5(weights=None),
    "shufflenet_v2_x1_0": lambda size: tvm.shufflenet_v2_x1_0(weights=None),
    "regnet_y_400mf": lambda size: tvm.regnet_y_400mf(weights=None),
    "mobilenet_v3_small": lambda size: tvm.mobilenet_v3_small(weights=None),
    "mobilenet_v3_large": lambda size: tvm.mobilenet_v3_large(weights=None),
    "convnext_tiny": lambda size: tvm.convnext_tiny(weights=None),
    "vit_b_16": lambda size: tvm.vit_b_16(weights=None, image_size=size),
    "vit_b_32": lambda size: tvm.vit_b_32(weights=None, image_size=size),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    model = BACKBONES[name](image_size)
    _replace_last_linear(model, num_classes, hidden)
    n = count_parameters(model)["total"]
    if n > MAX_PARAMS and not allow_large:
        raise ValueError(f"{name} has {n / 1e6:.1f}M parameters (> 100M); pass allow_large to use it")
    return model


NORMALIZATIONS = ("imagenet", "per_sample", "unit")


class Normalize(nn.Module):
    """Maps float images in [0, 1] (N, 3, H, W) to the backbone's input normalisation:
    ``imagenet`` (mean/std of ImageNet), ``per_sample`` (each image to zero mean and unit
    variance) or ``unit`` (kept in [0, 1], i.e. /255 of the raw bytes)."""

    def __init__(self, mode: str = "imagenet", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {mode!r}; choose from {NORMALIZATIONS}")
        self.mode = mode
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "imagenet":
            return (x - self.mean) / self.std
        if self.mode == "per_sample":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            return (x - mean) / std
        return x


def load_pretrained(backbone: nn.Module, location: str) -> dict[str, int]:
    """Load a torchvision-style state dict (``.safetensors`` preferred; ``.pt``/``.pth``
    with ``weights_only=True``) from a local file or an ``s3://`` URI into ``backbone``.

    Tensors whose shape does not fit (the classifier of another class count) are
    skipped; a file that matches less than half of the backbone is refused (wrong
    architecture). Never downloads from a model hub.
    """
    import io

    from triview.storage import read_bytes

    data = read_bytes(location)
    if str(location).endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    own = backbone.state_dict()
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < 0.5 * len(own):
        raise ValueError(f"{location}: only {len(usable)} of {len(own)} tensors fit this "
                         "backbone; is it the right architecture?")
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
