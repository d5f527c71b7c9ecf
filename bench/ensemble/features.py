"""Frozen-backbone features per (dataset, backbone, view, split, pass), cached on disk.

    python features.py DATASET BACKBONE PASS[,PASS...] [--splits train,val,test] [--mid]

Passes: clean, flip, zoom (central 0.8 of the side, resized back), up (the crop at 1.15x
the size), aug<k> (the photo default augmentation, draw k: random resized crop 0.6..1,
hflip 0.5, rotation +-10).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from triview import manifest as mf
from triview import weights as pw
from triview.augment import AugmentConfig, augment_batch
from triview.models import BranchNet, create_backbone, load_pretrained, resolve_normalization
from triview.train.data import load_view

#: where the crops, features and per-view caches live (scratch, not the repository)
ROOT = Path(os.environ.get("TRIVIEW_ENSEMBLE_BENCH", "/tmp/ensemble"))


def transform(images: np.ndarray, ids: list[str], name: str) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC under pass ``name``."""
    if name == "clean":
        return images
    if name == "flip":
        return images[:, :, ::-1].copy()
    if name == "zoom":
        n, h, w, _ = images.shape
        ch, cw = int(round(h * 0.8)), int(round(w * 0.8))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return np.stack([cv2.resize(im[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
                         for im in images])
    if name == "up":
        n, h, w, _ = images.shape
        s = int(round(h * 1.15))
        return np.stack([cv2.resize(im, (s, s), interpolation=cv2.INTER_LINEAR) for im in images])
    if name.startswith("aug"):
        cfg = AugmentConfig(mode="online")  # the photo defaults
        return augment_batch(images, ids, cfg, int(name[3:]))
    raise ValueError(name)


def build(backbone: str, n_classes: int, size: int):
    net = create_backbone(backbone, n_classes, size)
    found = pw.resolve(backbone, "imagenet")
    load_pretrained(net, pw.load_state(found, net))
    return BranchNet(net, resolve_normalization("auto", backbone)).eval().to(memory_format=torch.channels_last)


@torch.no_grad()
def extract(net, images: np.ndarray, mid: bool, batch: int = 32):
    feats, mids = [], []
    head = net.backbone.get_submodule(net.backbone.triview_head)
    h1 = head.register_forward_hook(lambda m, i, o: feats.append(i[0].float().clone()))
    h2 = None
    if mid:
        h2 = net.backbone.blocks[-1].register_forward_hook(
            lambda m, i, o: mids.append(i[0].half().clone()))
    try:
        for k in range(0, len(images), batch):
            x = torch.from_numpy(images[k:k + batch]).permute(0, 3, 1, 2).float().div_(255)
            net(x.contiguous(memory_format=torch.channels_last))
    finally:
        h1.remove()
        if h2:
            h2.remove()
    return torch.cat(feats).numpy(), (torch.cat(mids).numpy() if mid else None)


def path_of(dataset, backbone, view, split, name):
    return ROOT / "feat" / dataset / backbone / view / split / f"{name}.npz"


def load(dataset, backbone, view, split, name):
    with np.load(path_of(dataset, backbone, view, split, name)) as z:
        return {k: z[k] for k in z.files}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("backbone")
    ap.add_argument("passes")
    ap.add_argument("--splits", default="train,val,test")
    ap.add_argument("--views", default="")
    ap.add_argument("--mid", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    vdir = ROOT / a.dataset / "views"
    table = mf.read_views(vdir)
    classes = mf.read_classes(vdir)
    views = a.views.split(",") if a.views else list(dict.fromkeys(table["view"]))
    net = None
    for view in views:
        for split in a.splits.split(","):
            data = None
            for name in a.passes.split(","):
                out = path_of(a.dataset, a.backbone, view, split, name)
                if out.exists():
                    continue
                if data is None:
                    data = load_view([(vdir, table)], view, split, classes)
                if net is None:
                    net = build(a.backbone, len(classes), data.images.shape[-1])
                hwc = data.images.permute(0, 2, 3, 1).numpy()
                t = time.perf_counter()
                x, m = extract(net, transform(hwc, data.image_ids, name), a.mid)
                out.parent.mkdir(parents=True, exist_ok=True)
                arrays = dict(x=x, y=data.labels.numpy(), ids=np.array(data.image_ids))
                if m is not None:
                    arrays["mid"] = m
                np.savez(out, **arrays)
                print(f"{a.dataset} {a.backbone} {view} {split} {name}: {len(x)} in "
                      f"{time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
