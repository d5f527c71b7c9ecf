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
from triview.models import TTA_MODES
from triview.train.data import ViewData
from triview.train.head import PassFeatures
from triview.train.features import FeatureStore
from triview.train.loop import frozen_features


def augmented_pass_names(feature_passes: int) -> tuple[str, ...]:
    """``aug1 .. aug<P-1>``: the augmented passes beside the crop itself."""
    return tuple(f"aug{k}" for k in range(1, feature_passes))


def pass_names(tta: str, feature_passes: int) -> tuple[str, ...]:
    """Every pass the head phase needs: the test-time passes, then the augmented ones."""
    return TTA_MODES[tta] + augmented_pass_names(feature_passes)


#: crops per chunk of a pass written out as uint8 before its features are read or computed
CHUNK = 1024


def _uint8_pass(images: torch.Tensor, ids: list[str], name: str,
                augment: AugmentConfig | None) -> torch.Tensor | None:
    """The crops of pass ``name`` as uint8 NCHW where the pass is exact on pixels (the crop,
    its mirror, an augmented draw), so that a feature store can key them by their pixels;
    None for a pass computed on floats (``zoom``)."""
    if name == "identity":
        return images
    if name == "flip":
        return images.flip(-1)
    if name.startswith("aug"):
        hwc = augment_batch(images.permute(0, 2, 3, 1).numpy(), ids, augment, int(name[3:]))
        return torch.from_numpy(hwc).permute(0, 3, 1, 2)
    return None


@torch.no_grad()
def extract(net: torch.nn.Module, data: ViewData, passes: tuple[str, ...],
            augment: AugmentConfig | None = None,
            memory_format=torch.contiguous_format, log=None,
            store: FeatureStore | None = None) -> PassFeatures:
    """The head's inputs (the frozen backbone's pooled features) of every crop of ``data``
    under every pass; ``augment`` draws the ``aug<k>`` passes. With a ``store`` every pass
    is read from it where it holds it (keyed by the network and the pass's pixels; a pass
    computed on floats, ``zoom``, by the crop's pixels and the pass's name) and the rest
    computed and kept, so that trials of a study share them."""
    if any(p.startswith("aug") for p in passes) and augment is None:
        raise ValueError("augmented passes need an augment configuration")
    was_training = net.training
    net.eval()
    out = {}
    try:
        for name in passes:
            start = time.perf_counter()
            chunks = []
            for i in range(0, len(data.labels), CHUNK):
                images, ids = data.images[i:i + CHUNK], data.image_ids[i:i + CHUNK]
                pixels = _uint8_pass(images, ids, name, augment)
                if pixels is not None:
                    chunks.append(frozen_features(net, pixels, memory_format, store))
                else:  # computed on floats from the crop: keyed by its pixels and the pass
                    chunks.append(frozen_features(net, images, memory_format, store,
                                                  transform=name))
            out[name] = (torch.cat(chunks) if chunks else torch.zeros(0)).float().numpy()
            if log is not None:
                log(f"features, pass {name}: {len(data.labels)} crops in "
                    f"{time.perf_counter() - start:.1f} s")
    finally:
        net.train(was_training)
    return PassFeatures(np.asarray(data.image_ids), data.labels.numpy(), out)
