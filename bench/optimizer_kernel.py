"""Optimizer update kernel: PyTorch's fused AdamW (``fused=True``, what
``triview.train.optim`` now picks on CPU and CUDA) against its default on CPU (a Python
loop over the parameter tensors), measured in the same run.

Same model (the digits preset's backbone at its size, channels_last), same
initial weights, same batches of random crops, same loss; each round times ``--steps``
whole training steps (forward, backward, optimiser step) of both sides, in alternating
order so that machine noise hits both alike.

    ratio = median default-kernel step time / median fused step time

It also reports how far the two sides' weights are apart after the timed steps (the
kernels round differently; the difference is a float32 rounding drift, not a different
algorithm) and the loss of each at the end.

    python bench/optimizer_kernel.py --json optimizer_kernel.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triview.models import create_backbone  # noqa: E402
from triview.params import load_preset  # noqa: E402
from triview.train.config import TrainConfig  # noqa: E402
from triview.train.optim import make_optimizer  # noqa: E402


def _side(model: nn.Module, fused: bool, config: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if fused:
        return make_optimizer(config, params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _steps(model, optimizer, batches, criterion) -> tuple[float, float]:
    start = time.perf_counter()
    loss = None
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = load_preset("digits")
    ap.add_argument("--backbone", default=preset["backbone"])
    ap.add_argument("--image-size", type=int, default=preset["image_size"])
    ap.add_argument("--batch", type=int, default=preset["batch_size"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = TrainConfig(backbone=args.backbone, optimizer="adamw", lr=preset["lr"])
    base = create_backbone(args.backbone, 10, args.image_size).to(memory_format=torch.channels_last)
    sides = {}
    for name, fused in (("default", False), ("fused", True)):
        model = copy.deepcopy(base).train()
        sides[name] = (model, _side(model, fused, config))
    assert "fused" not in sides["default"][1].defaults or not sides["default"][1].defaults["fused"]
    assert sides["fused"][1].defaults.get("fused") is True
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(args.batch, 3, args.image_size, args.image_size, generator=gen)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (args.batch,), generator=gen)) for _ in range(args.steps)]
    criterion = nn.CrossEntropyLoss()
    for name, (model, opt) in sides.items():  # warm-up, not timed
        _steps(model, opt, batches[:3], criterion)
    times = {name: [] for name in sides}
    losses = {}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            seconds, losses[name] = _steps(*sides[name], batches, criterion)
            times[name].append(seconds / args.steps)
    drift = max(float((a - b).detach().abs().max()) for a, b in
                zip(sides["default"][0].parameters(), sides["fused"][0].parameters()))
    result = {
        "backbone": args.backbone, "image_size": args.image_size, "batch": args.batch,
        "steps_per_round": args.steps, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "default_ms_per_step": round(1000 * statistics.median(times["default"]), 2),
        "fused_ms_per_step": round(1000 * statistics.median(times["fused"]), 2),
        "default_images_per_s": round(args.batch / statistics.median(times["default"]), 1),
        "fused_images_per_s": round(args.batch / statistics.median(times["fused"]), 1),
        "final_loss": {k: round(v, 4) for k, v in losses.items()},
        "max_weight_difference": drift,
    }
    result["default_over_fused"] = round(result["default_ms_per_step"] / result["fused_ms_per_step"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
