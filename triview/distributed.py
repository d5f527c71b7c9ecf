"""Data-parallel training of one branch with torch.distributed (DDP).

``train-branch`` runs as one process on a CPU or a single GPU. When a node shows it
more than one GPU (or ``ddp_procs`` asks for more processes), the stage re-launches
itself under ``torchrun`` (:func:`run_under_torchrun`; the entry point is the stage
layer, ``python -m triview.stages``) (``python -m torch.distributed.run --standalone``) with one
process per GPU; every process reads the world size, rank and local rank from the
environment torchrun sets, joins the process group (NCCL on GPUs, gloo on CPUs) and
trains its share of each epoch. Rank 0 alone writes files and pushes metrics.

Outside torchrun everything here degrades to world size 1 and no-ops, so the same
training code runs unchanged on a laptop.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn

RANK_DIR = "ddp"


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return True


def wrap(net: nn.Module, device: torch.device, compile_model: bool = False) -> nn.Module:
    """The module the training loop calls: ``net`` itself, or DDP around it in a process
    group (built again whenever the set of trainable parameters changes)."""
    model = net
    if rank_and_world()[1] > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def sum_across(value: float) -> float:
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def broadcast_buffers(net: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank. DDP sends them at the
    start of each forward, so after an epoch's last step every rank holds its own; this makes
    the ranks' models equal again before validation and checkpoints."""
    if rank_and_world()[1] == 1:
        return
    for buffer in net.buffers():
        dist.broadcast(buffer.data, src=0)


def parameter_digest(net: nn.Module) -> str:
    """SHA-256 prefix of every parameter's bytes: equal on all ranks after DDP training."""
    h = hashlib.sha256()
    for name, p in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_rank_report(out_dir: str | Path, report: dict) -> None:
    """``ddp/rank-<r>.json`` beside the branch (only in a multi-process run)."""
    if report["world_size"] == 1:
        return
    from triview.storage import atomic_write_text

    folder = Path(out_dir) / RANK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"rank-{report['rank']}.json", json.dumps(report, indent=2))


def processes_wanted(ddp_procs: int = 0) -> int:
    """How many processes should train the branch: ``ddp_procs`` when set, else one per
    visible GPU (1 on a CPU or single-GPU node)."""
    if ddp_procs > 0:
        return ddp_procs
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n if n > 1 else 1


def run_under_torchrun(module: str, kwargs: dict, nproc: int) -> None:
    """Run ``python -m <module> ARGS.json`` under torchrun with ``nproc`` processes on this
    node (``module`` reads its keyword arguments from the JSON file); raise on failure."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(kwargs, fh)
        args_file = fh.name
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", module, args_file]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} processes failed (exit {proc.returncode})")
    finally:
        os.unlink(args_file)


def destroy() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
