"""Grad-CAM for one branch through pytorch-grad-cam (``grad-cam`` on PyPI).

The only image maths here is choosing the layer and overlaying the heat map
(``show_cam_on_image``); the class activation maps come from the library.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: Feature maps smaller than this (per side) give a single-colour map: use an earlier layer.
MIN_CAM_SIDE = 4


def target_layer(model: nn.Module, image_size: int) -> nn.Module | None:
    """The last of the outermost blocks whose output is a feature map of at least
    MIN_CAM_SIDE² cells (a whole stage, not a layer inside it); None for models
    without a convolutional feature map."""
    seen: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = []
    for name, module in model.named_modules():
        if not name or name in ("normalize", "backbone"):
            continue

        def record(mod, _inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                seen.append((name, mod, tuple(out.shape)))

        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    large = [(name.count("."), m) for name, m, shape in seen if min(shape[2:]) >= MIN_CAM_SIDE]
    if large:
        depth = min(d for d, _ in large)
        return [m for d, m in large if d == depth][-1]
    return seen[-1][1] if seen else None


def gradcam_overlays(model: nn.Module, images: torch.Tensor, targets: list[int]
                     ) -> list[np.ndarray] | None:
    """Heat-map overlays (RGB uint8, H×W×3) of ``targets`` for uint8 NCHW ``images``;
    None when the model has no convolutional feature map."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(images) == 0:
        return []
    model = model.eval()
    layer = target_layer(model, int(images.shape[-1]))
    if layer is None:
        return None
    x = images.float().div(255.0)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    rgb = x.permute(0, 2, 3, 1).numpy()
    return [show_cam_on_image(img, m, use_rgb=True) for img, m in zip(rgb, maps)]


def gradcam_gallery(models: dict[str, nn.Module], test_probs: dict[str, np.ndarray],
                    labels: np.ndarray, ids: np.ndarray, classes: list[str],
                    read_crop, per_kind: int = 4) -> dict[str, list[dict]]:
    """Per view, Grad-CAM of the branch's predicted class on up to ``per_kind`` correctly
    and ``per_kind`` wrongly predicted test images (the most confident of each).

    ``test_probs[view]`` and ``labels``/``ids`` are aligned on image id (as
    ``voter.aligned`` gives them); ``read_crop(image_id, view)`` returns the RGB crop.
    """
    gallery: dict[str, list[dict]] = {}
    multilabel = labels.ndim == 2
    for view, model in models.items():
        prob = test_probs[view]
        pred = prob.argmax(1)
        correct = (labels[np.arange(len(pred)), pred] == 1) if multilabel else pred == labels
        confidence = prob.max(1)
        chosen: list[int] = []
        for mask in (correct, ~correct):
            idx = np.flatnonzero(mask)
            chosen += idx[np.argsort(-confidence[idx], kind="stable")][:per_kind].tolist()
        if not chosen:
            continue
        crops = np.stack([read_crop(str(ids[i]), view) for i in chosen])
        overlays = gradcam_overlays(model, torch.from_numpy(crops).permute(0, 3, 1, 2),
                                    [int(pred[i]) for i in chosen])
        if overlays is None:
            continue
        gallery[view] = [{
            "image_id": str(ids[i]), "image": crop, "overlay": overlay,
            "true": (", ".join(classes[k] for k in np.flatnonzero(labels[i])) if multilabel
                     else classes[int(labels[i])]),
            "pred": classes[int(pred[i])], "score": float(confidence[i]), "correct": bool(correct[i]),
        } for i, crop, overlay in zip(chosen, crops, overlays)]
    return gallery
