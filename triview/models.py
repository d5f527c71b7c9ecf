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


class Normalize(nn.Module):
    """Maps float images in [0, 1] (N, 3, H, W) to the backbone's input normalisation."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BranchNet(nn.Module):
    """One view's classifier: normalisation + backbone; input float [0, 1], output logits."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))
