"""Timing figures of a trained ensemble: parameters and seconds per epoch per branch
(from training) and inference latency on this device (measured here)."""
from __future__ import annotations

import statistics
import time

import numpy as np
import pandas as pd
import torch
from torch import nn


@torch.no_grad()
def latency_ms(module: nn.Module, inputs: tuple[torch.Tensor, ...], runs: int = 20,
               warmup: int = 2, budget_s: float = 1.0) -> float:
    """Median wall time of one forward pass, in milliseconds (at most ``runs`` passes,
    fewer when they take longer than ``budget_s`` together; at least 3)."""
    module.eval()
    for _ in range(warmup):
        module(*inputs)
    times: list[float] = []
    while len(times) < runs and (len(times) < 3 or sum(times) < budget_s):
        start = time.perf_counter()
        module(*inputs)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _weights_text(pretrained: dict | None) -> str:
    """Where a branch's starting weights came from, in one cell."""
    if not pretrained or not pretrained.get("sha256"):
        return "none (random initialisation)"
    return (f"{pretrained.get('source')}: {pretrained.get('file')} "
            f"(sha256 {pretrained['sha256'][:16]})")


def timing_batch(image_size: int) -> int:
    """The batch the batched latency is measured at: 64 crops at 32 px, fewer as crops
    grow (the same pixels per batch, at least 8), so that the measurement does not
    cost more than the evaluation it reports on (64 crops x 3 views at 224 px took 35 s
    of a 55 s evaluate stage on 2 cores)."""
    return int(max(8, min(64, 64 * 32 * 32 // (image_size * image_size))))


def ensemble_timing(branches: dict[str, nn.Module], ensemble: nn.Module, metas: dict[str, dict],
                    histories: dict[str, pd.DataFrame], image_size: int, device: str,
                    batch: int | None = None) -> dict:
    """Parameters, seconds per epoch and inference milliseconds per sample (eager
    PyTorch on CPU: batch 1 on one thread, and batched on all, at ``batch`` crops:
    :func:`timing_batch` by default) for every branch and the whole ensemble."""
    batch = batch or timing_batch(image_size)
    one = torch.rand(1, 3, image_size, image_size)
    many = torch.rand(batch, 3, image_size, image_size)
    threads = torch.get_num_threads()
    rows = {}
    for view, model in branches.items():
        h = histories.get(view)
        rows[view] = {
            "backbone": metas[view]["config"]["backbone"],
            "parameters": int(metas[view]["parameters"]["total"]),
            "epochs": int(len(h)) if h is not None else None,
            "best_epoch": metas[view].get("best_epoch"),
            "seconds_per_epoch": float(np.mean(h["seconds"])) if h is not None and "seconds" in h else None,
            "train_images_per_s": (float(np.mean(h["images_per_s"]))
                                   if h is not None and "images_per_s" in h else None),
            "pretrained_weights": _weights_text(metas[view].get("pretrained")),
        }
    n_views = len(branches)
    # Batch 1 on one thread: at this size a parallel region costs more than it saves,
    # and on a shared machine every op would wait for a second core.
    torch.set_num_threads(1)
    try:
        for view, model in branches.items():
            rows[view]["inference_ms_per_sample"] = latency_ms(model, (one,))
        single = latency_ms(ensemble, (one,) * n_views)
    finally:
        torch.set_num_threads(threads)
    return {
        "device": device,
        "threads": {"batch_1": 1, "batched": threads},
        "batch": batch,
        "branches": rows,
        "ensemble_parameters": int(sum(r["parameters"] for r in rows.values())),
        "ensemble_ms_per_sample": single,
        "ensemble_batched_ms_per_sample": latency_ms(ensemble, (many,) * n_views, runs=3,
                                                     warmup=1) / batch,
    }
