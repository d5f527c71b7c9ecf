"""The passes of a view's crops through the frozen backbone for the head phase: the crop
itself (``identity``), the test-time passes of the ``tta`` mode (``flip``, ``zoom``: the
same torch ops the exported model runs, :func:`triview.models.tta_transform`) and
``feature_passes - 1`` augmented draws (``aug1``, ``aug2``, ...: the augment stage's
configuration, seeded by image id and pass, so that every seed of a run sees the same
draws). Each pass is one :class:`triview.train.head.PassFeatures` column."""
from __future__ import annotations

import time

import numpy as np
import torch

from triview.augment import AugmentConfig, augment_batch
from triview.models import TTA_MODES, tta_transform
from triview.train.data import ViewData, as_float
from triview.train.head import PassFeatures
from triview.train.loop import head_module


def augmented_pass_names(feature_passes: int) -> tuple[str, ...]:
    """``aug1 .. aug<P-1>``: the augmented passes beside the crop itself."""
    return tuple(f"aug{k}" for k in range(1, feature_passes))


def pass_names(tta: str, feature_passes: int) -> tuple[str, ...]:
    """Every pass the head phase needs: the test-time passes, then the augmented ones."""
    return TTA_MODES[tta] + augmented_pass_names(feature_passes)


def _batch(images: torch.Tensor, ids: list[str], name: str, augment: AugmentConfig | None,
           memory_format) -> torch.Tensor:
    if name.startswith("aug"):
        hwc = augment_batch(images.permute(0, 2, 3, 1).numpy(), ids, augment, int(name[3:]))
        images = torch.from_numpy(hwc).permute(0, 3, 1, 2)
        return as_float(images).contiguous(memory_format=memory_format)
    return tta_transform(as_float(images), name).contiguous(memory_format=memory_format)


@torch.no_grad()
def extract(net: torch.nn.Module, data: ViewData, passes: tuple[str, ...],
            augment: AugmentConfig | None = None, batch_size: int = 64,
            memory_format=torch.contiguous_format, log=None) -> PassFeatures:
    """The head's inputs (the frozen backbone's pooled features) of every crop of ``data``
    under every pass; ``augment`` draws the ``aug<k>`` passes."""
    if any(p.startswith("aug") for p in passes) and augment is None:
        raise ValueError("augmented passes need an augment configuration")
    device = next(net.parameters()).device
    captured: list[torch.Tensor] = []
    hook = head_module(net).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().float().cpu()))
    was_training = net.training
    net.eval()
    out = {}
    try:
        for name in passes:
            start = time.perf_counter()
            captured.clear()
            for i in range(0, len(data.labels), batch_size):
                ids = data.image_ids[i:i + batch_size]
                net(_batch(data.images[i:i + batch_size], ids, name, augment, memory_format).to(device))
            out[name] = torch.cat(captured).numpy()
            if log is not None:
                log(f"features, pass {name}: {len(data.labels)} crops in "
                    f"{time.perf_counter() - start:.1f} s")
    finally:
        hook.remove()
        net.train(was_training)
    return PassFeatures(np.asarray(data.image_ids), data.labels.numpy(), out)
