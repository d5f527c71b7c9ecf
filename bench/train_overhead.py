"""Training-step overhead: triview's epoch loop against a plain hand-written PyTorch loop.

Same model (the default backbone with the same initial weights, channels_last), same
batches (uint8 crops of scikit-learn's digits converted to float per batch), same loss,
optimiser and schedule, one process, measured in the same run and interleaved
(plain, triview, plain, triview, ...) so that machine noise hits both alike.

    triview = triview.train.train_one_epoch over triview.train.batches (autocast and
              grad-scaler plumbing, accumulation bookkeeping, no host sync per batch)
    plain   = for x, y in batches: loss = ce(model(x), y); opt.zero_grad(); loss.backward();
              opt.step(); sched.step()

overhead = median triview epoch time / median plain epoch time - 1

The whole epoch (``whole_epoch`` in the JSON) is timed as well: triview's ``fit`` (the
digits preset's training: training step, BatchNorm recalibration over the training images,
validation macro-F1, best- and last-checkpoint writes every epoch; no head phase, as the
preset's ``head_folds: 0``) against a plain loop
that trains and runs the same validation (predict the validation crops, macro-F1, keep the
best weights in memory) and nothing else. Rounds alternate the order of the two sides.

    whole_epoch.overhead = median fit seconds per epoch / median plain seconds per epoch - 1

    python bench/train_overhead.py --json train_overhead.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triview.models import BranchNet, create_backbone  # noqa: E402
from triview.train import TrainConfig, ViewData, batches, train_one_epoch  # noqa: E402
from triview.train.optim import lr_factor, make_optimizer  # noqa: E402


def digits_views(image_size: int, n: int) -> ViewData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = [cv2.resize((im * 16).clip(0, 255).astype(np.uint8), (image_size, image_size),
                       interpolation=cv2.INTER_LINEAR) for im in digits.images]
    arr = np.stack([np.repeat(im[:, :, None], 3, axis=2) for im in imgs])
    reps = -(-n // len(arr))
    arr = np.concatenate([arr] * reps)[:n]
    labels = np.concatenate([digits.target] * reps)[:n]
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return ViewData(images, torch.from_numpy(labels).long(), [str(i) for i in range(n)])


def plain_epoch(model, data: ViewData, order, batch_size, criterion, optimizer, scheduler):
    model.train()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x = data.images[idx].float().div_(255.0).contiguous(memory_format=torch.channels_last)
        y = data.labels[idx]
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def plain_validation(model, val: ViewData, batch_size: int) -> float:
    """What a hand-written loop does after each epoch: predict the validation crops, macro-F1."""
    from sklearn.metrics import f1_score

    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(val.labels), batch_size):
            x = val.images[i:i + batch_size].float().div_(255.0).contiguous(
                memory_format=torch.channels_last)
            preds.append(model(x).argmax(1))
    return float(f1_score(val.labels.numpy(), torch.cat(preds).numpy(), average="macro"))


def whole_epochs(args, data: ViewData, val: ViewData) -> dict:
    """Seconds per whole epoch: triview's ``fit`` against a plain train + validate loop."""
    import tempfile

    from triview.train.loop import fit

    epochs, rounds = args.whole_epochs, args.whole_rounds
    config = TrainConfig(backbone=args.backbone, batch_size=args.batch_size, epochs=epochs,
                         weights="none", head_epochs=0, head_folds=0, freeze_bn=False,
                         normalization="imagenet",
                         backbone_lr_scale=1.0, precise_bn=args.precise_bn)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    classes = [str(c) for c in range(10)]
    times = {"plain": [], "triview": []}
    for rnd in range(rounds + 1):  # round 0 warms up both sides
        for name in ("plain", "triview") if rnd % 2 == 0 else ("triview", "plain"):
            start = time.perf_counter()
            if name == "triview":
                with tempfile.TemporaryDirectory() as ckpt:
                    fit(config, data, val, classes, "multiclass", criterion, "bench", ckpt,
                        log=lambda *a: None, push=False)
            else:
                torch.manual_seed(config.seed)
                model = BranchNet(create_backbone(args.backbone, 10, args.image_size)).to(
                    memory_format=torch.channels_last)
                optimizer = make_optimizer(config, model.parameters())
                steps = -(-len(data.labels) // args.batch_size)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
                generator = torch.Generator().manual_seed(config.seed)
                best, best_state = -1.0, None
                for _ in range(epochs):
                    order = torch.randperm(len(data.labels), generator=generator)
                    plain_epoch(model, data, order, args.batch_size, criterion, optimizer, scheduler)
                    f1 = plain_validation(model, val, 256)
                    if f1 > best:
                        best, best_state = f1, copy.deepcopy(model.state_dict())
            if rnd:
                times[name].append((time.perf_counter() - start) / epochs)
    plain, tri = statistics.median(times["plain"]), statistics.median(times["triview"])
    return {"overhead": round(tri / plain - 1, 4), "plain_s_per_epoch": round(plain, 3),
            "triview_s_per_epoch": round(tri, 3),
            "plain_s": [round(t, 3) for t in times["plain"]],
            "triview_s": [round(t, 3) for t in times["triview"]],
            "epochs_per_round": epochs, "rounds": rounds, "val_images": len(val.labels),
            "includes": "train step, BatchNorm recalibration, validation macro-F1, best+last "
                        "checkpoint writes (triview); train step, validation macro-F1, best "
                        "weights in memory (plain)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="shufflenet_v2_x1_0")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=1792)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per side")
    ap.add_argument("--whole-epochs", type=int, default=2, help="epochs per whole-epoch round")
    ap.add_argument("--whole-rounds", type=int, default=3, help="timed whole-epoch rounds per side")
    ap.add_argument("--val-images", type=int, default=360)
    ap.add_argument("--precise-bn", type=int, default=None,
                    help="images of the BatchNorm recalibration after each epoch (default: the "
                    "digits preset's)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.precise_bn is None:
        from triview.params import defaults, load_preset
        args.precise_bn = int(load_preset("digits").get("precise_bn", defaults()["precise_bn"]))

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = digits_views(args.image_size, args.images)
    config = TrainConfig(backbone=args.backbone, batch_size=args.batch_size, epochs=args.repeats + 1)
    base = BranchNet(create_backbone(args.backbone, 10, args.image_size)).to(
        memory_format=torch.channels_last)
    device = torch.device("cpu")
    sides = {}
    for name in ("plain", "triview"):
        model = copy.deepcopy(base)
        optimizer = make_optimizer(config, model.parameters())
        steps = -(-len(data.labels) // args.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        sides[name] = (model, optimizer, scheduler, scaler)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(0)
    times = {"plain": [], "triview": []}
    for rep in range(args.repeats + 1):  # the first round warms up both sides
        order = torch.randperm(len(data.labels), generator=generator)
        for name in ("plain", "triview") if rep % 2 == 0 else ("triview", "plain"):
            model, optimizer, scheduler, scaler = sides[name]
            start = time.perf_counter()
            if name == "plain":
                plain_epoch(model, data, order, args.batch_size, criterion, optimizer, scheduler)
            else:
                train_one_epoch(model, batches(data, order, args.batch_size, torch.channels_last),
                                criterion, optimizer, scheduler, scaler, config, device, None)
            if rep:
                times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    tri = statistics.median(times["triview"])
    result = {
        "overhead": round(tri / plain - 1, 4),
        "plain_ms_per_step": round(1000 * plain / -(-args.images // args.batch_size), 2),
        "triview_ms_per_step": round(1000 * tri / -(-args.images // args.batch_size), 2),
        "plain_images_per_s": round(args.images / plain, 1),
        "triview_images_per_s": round(args.images / tri, 1),
        "plain_epoch_s": [round(t, 3) for t in times["plain"]],
        "triview_epoch_s": [round(t, 3) for t in times["triview"]],
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "images": args.images, "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    print(f"plain   {result['plain_ms_per_step']:8.2f} ms/step  {result['plain_images_per_s']:8.1f} img/s")
    print(f"triview {result['triview_ms_per_step']:8.2f} ms/step  {result['triview_images_per_s']:8.1f} img/s")
    print(f"overhead {result['overhead'] * 100:+.2f}%  (triview / plain - 1, medians of {args.repeats})")
    if args.whole_rounds:
        val = digits_views(args.image_size, args.val_images)
        whole = result["whole_epoch"] = whole_epochs(args, data, val)
        print(f"whole epoch: plain {whole['plain_s_per_epoch']:.2f} s, triview fit "
              f"{whole['triview_s_per_epoch']:.2f} s, overhead {whole['overhead'] * 100:+.2f}% "
              f"(BatchNorm recalibration, validation, checkpoints; medians of {args.whole_rounds})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
