"""Head on cached features vs a forward pass through the frozen backbone every epoch.

Training only the new head of a frozen pretrained backbone needs the backbone's features
of every training crop. Computed once and cached (what ``head_epochs`` does), an epoch is
a few matrix products; recomputed every epoch (a plain linear probe), an epoch costs a
full forward pass of the backbone. Both are timed here in the same run, on the same crops:

    python bench/feature_cache.py [--backbone efficientnet_lite0] [--size 224] [--images 192]
        [--epochs 5] [--threads 2] [--json FILE]

Writes ``{"per_epoch_cached_s", "per_epoch_forward_s", "speedup", "extract_s",
"break_even_epochs", ...}``. Random images: speed does not depend on the pixels.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triview.models import BranchNet, create_backbone  # noqa: E402
from triview.train.config import TrainConfig  # noqa: E402
from triview.train.loop import head_inputs, head_module  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = TrainConfig(backbone=args.backbone, batch_size=args.batch_size)
    net = BranchNet(create_backbone(args.backbone, 2, args.size), "imagenet").eval()
    net = net.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (args.images,))
    head = head_module(net)
    criterion = torch.nn.CrossEntropyLoss()

    def head_epoch(features: torch.Tensor) -> None:
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
        for i in range(0, len(labels), config.batch_size):
            loss = criterion(head(features[i:i + config.batch_size]), labels[i:i + config.batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    start = time.perf_counter()
    cached = head_inputs(net, images, memory_format=torch.channels_last)
    extract = time.perf_counter() - start
    cached_epochs, forward_epochs = [], []
    for _ in range(args.epochs):  # alternate, so that drift in the machine's load hits both
        start = time.perf_counter()
        head_epoch(cached)
        cached_epochs.append(time.perf_counter() - start)
        start = time.perf_counter()
        head_epoch(head_inputs(net, images, memory_format=torch.channels_last))
        forward_epochs.append(time.perf_counter() - start)
    cached_s, forward_s = statistics.median(cached_epochs), statistics.median(forward_epochs)
    result = {"backbone": args.backbone, "image_size": args.size, "images": args.images,
              "threads": args.threads, "feature_dim": int(cached.shape[1]),
              "extract_s": round(extract, 3), "per_epoch_cached_s": round(cached_s, 5),
              "per_epoch_forward_s": round(forward_s, 3),
              "speedup": round(forward_s / cached_s, 1),
              "break_even_epochs": round(extract / max(forward_s - cached_s, 1e-9), 2)}
    print(f"{args.backbone} at {args.size} px, {args.images} crops, {args.threads} threads: "
          f"head epoch on cached features {cached_s * 1e3:.1f} ms, with a backbone forward pass "
          f"{forward_s:.2f} s -> speed-up {result['speedup']}x; one-off extraction {extract:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
