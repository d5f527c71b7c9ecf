"""Optimiser, learning-rate schedule and precision, each chosen by name from a registry
(the names are the spec's allowed values: :mod:`triview.params`)."""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from triview.train.config import TrainConfig

#: devices whose tensors PyTorch's fused optimizer kernels take
FUSED_DEVICES = ("cpu", "cuda")


def kernel(params) -> dict:
    """The update kernel for ``params`` (tensors, or param groups): ``fused=True`` (one
    kernel over every tensor of a step) when every tensor is floating point on a CPU or
    CUDA device, else PyTorch's default (on CPU a loop over the tensors: a whole training
    step 1.10-1.14x slower at the digits preset, ``bench/optimizer_kernel.py``)."""
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(t.is_floating_point() and t.device.type in FUSED_DEVICES
                                  for t in tensors)
    return {"fused": True} if fused else {}


#: optimizer name -> factory(param groups, config, **update-kernel options)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda groups, c, **kw: torch.optim.AdamW(groups, lr=c.lr,
                                                       weight_decay=c.weight_decay, **kw),
    "adam": lambda groups, c, **kw: torch.optim.Adam(groups, lr=c.lr,
                                                     weight_decay=c.weight_decay, **kw),
    "sgd": lambda groups, c, **kw: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum,
                                                   nesterov=True, weight_decay=c.weight_decay,
                                                   **kw),
}


def _milestones(config: TrainConfig, steps_per_epoch: int, total: int) -> list[float]:
    """Optimiser steps at which step/multistep schedules drop (the last drop lands on lrf)."""
    given = [float(m) for m in config.milestones.split(",") if m.strip()]
    if config.scheduler == "step":
        every = min(given) if given else max(1.0, config.epochs / 3)
        marks = [every * k for k in range(1, int(config.epochs / every) + 1)]
    else:
        marks = sorted(given) or [0.5 * config.epochs, 0.75 * config.epochs]
    return [m * steps_per_epoch for m in marks if 0 < m < config.epochs] or [total]


#: scheduler name -> shape(t in [0, 1] of the post-warmup steps, step, context) in [lrf, 1]
SCHEDULES: dict[str, Callable[[float, int, dict], float]] = {
    "cosine": lambda t, step, c: c["lrf"] + (1 - c["lrf"]) * 0.5 * (1 + math.cos(math.pi * t)),
    "linear": lambda t, step, c: c["lrf"] + (1 - c["lrf"]) * (1 - t),
    "poly": lambda t, step, c: c["lrf"] + (1 - c["lrf"]) * (1 - t) ** c["power"],
    "constant": lambda t, step, c: 1.0,
    "step": lambda t, step, c: c["gamma"] ** sum(step >= m for m in c["marks"]),
    "multistep": lambda t, step, c: c["gamma"] ** sum(step >= m for m in c["marks"]),
}


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule as a function of the optimiser step: a multiplier of ``lr`` that
    warms up linearly from 0.1 and ends at ``lrf``."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    shape = SCHEDULES[config.scheduler]
    context = {"lrf": config.lrf, "power": config.poly_power}
    if config.scheduler in ("step", "multistep"):
        context["marks"] = _milestones(config, steps_per_epoch, total)
        context["gamma"] = config.lrf ** (1.0 / len(context["marks"]))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return shape(min(1.0, (step - warmup) / max(1, total - warmup)), step, context)

    return factor


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` (tensors, or param groups whose own
    ``lr`` overrides the config's), with the update :func:`kernel` they allow."""
    params = list(params)
    return OPTIMIZERS[config.optimizer](params, config, **kernel(params))


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision (CPU autocast is slower here)."""
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
