"""Streaming against in-memory training: one branch of the digits preset fine-tuned on the
same crops with ``loader=memory`` and ``loader=stream``, throughput and peak memory.

    python bench/stream.py --n 4000 --json bench/results_stream.json
    python bench/stream.py --n 500 --epochs 1 --rounds 1          # a quick look

Photos: bench/scale.py's generated digits (each a new image). ingest, calibrate-and-crop,
balance and augment run once (the digits preset); then each round trains the ``center``
branch once per loader, each in a fresh process, alternating which goes first. A run
reports the fine-tuning epochs' images per second (the branch's history, which times the
epoch loop: batches, steps and BatchNorm recalibration), and the process's peak resident
memory (VmHWM). ``--sizes`` also trains each loader on a quarter of the training crops,
so that the peak memory can be compared across sizes.

JSON: per loader, every run's ``images_per_s`` (median over its epochs), ``peak_rss_mb``
and ``crops``; ``stream_vs_memory`` = median stream throughput / median in-memory
throughput over the rounds (the bar: >= 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_once(work: Path, loader: str, epochs: int, workers: int, share: float, out: Path) -> dict:
    """In this process: one branch on the prepared folders; its throughput and peak memory."""
    import pandas as pd

    from triview import manifest as mf
    from triview.params import defaults, load_preset, pick
    from triview.stages import train_branch_stage

    views = work / "views"
    if share < 1:  # a smaller training set: the first share of the training rows
        table = mf.read_views(views)
        train = table[table["split"] == "train"]
        keep = set(train["image_id"].unique()[: int(train["image_id"].nunique() * share)])
        small = work / f"views-{share}"
        if not small.exists():
            shutil.copytree(views, small)
            mf.write_views(table[(table["split"] != "train") | table["image_id"].isin(keep)], small)
        views = small
    values = {**defaults(), **load_preset("digits")}
    params = {**pick("train-branch", values), "epochs": epochs, "loader": loader,
              "loader_workers": workers, "seed": 0}
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    rec = train_branch_stage(views, None if share < 1 else work / "augmented", work / "balanced",
                             "center", out, **params)
    wall = time.perf_counter() - start
    history = pd.read_csv(out / "history.csv")
    fine = history[history["phase"] == "finetune"]
    crops = len(mf.read_views(views).query("view == 'center' and split == 'train'"))
    return {"loader": loader, "workers": workers, "share": share, "crops": crops,
            "images_per_s": float(statistics.median(fine["images_per_s"])),
            "epoch_images_per_s": fine["images_per_s"].tolist(), "wall_s": round(wall, 2),
            "val_macro_f1": rec["val_macro_f1"], "peak_rss_mb": round(_peak_rss_mb(), 1)}


def prepare(n: int, root: Path) -> Path:
    from scale import generate

    from triview.params import defaults, load_preset, pick
    from triview.stages import augment_stage, balance_stage, calibrate_and_crop_stage, ingest_stage

    values = {**defaults(), **load_preset("digits")}
    generate(root / "photos", 0, n)
    work = root / "work"
    ingest_stage(str(root / "photos"), work / "ingest", plot=False, **pick("ingest", values))
    calibrate_and_crop_stage(work / "ingest", work / "views", **pick("calibrate-and-crop", values))
    balance_stage(work / "views", work / "balanced", **pick("balance", values))
    augment_stage(work / "views", work / "augmented", **pick("augment", values))
    return work


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="photos to generate")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="loader_workers of the stream runs")
    ap.add_argument("--sizes", action="store_true", help="also train on a quarter of the crops")
    ap.add_argument("--out", default="/tmp/triview-stream")
    ap.add_argument("--json")
    ap.add_argument("--one", nargs=5, metavar=("WORK", "LOADER", "EPOCHS", "WORKERS", "SHARE"),
                    help=argparse.SUPPRESS)  # a single training run, in a fresh process
    args = ap.parse_args(argv)
    if args.one:
        work, loader, epochs, workers, share = args.one
        result = train_once(Path(work), loader, int(epochs), int(workers), float(share),
                            Path(work) / f"branch-{loader}-{share}")
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    work = prepare(args.n, root)
    print(f"prepared {args.n} photos in {time.perf_counter() - start:.0f} s", flush=True)

    def run(loader: str, share: float = 1.0) -> dict:
        workers = args.workers if loader == "stream" else 0
        done = subprocess.run([sys.executable, __file__, "--one", str(work), loader, str(args.epochs),
                               str(workers), str(share)], cwd=REPO, check=True, text=True,
                              capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
        print(json.dumps(result), flush=True)
        return result

    runs: dict[str, list[dict]] = {"memory": [], "stream": []}
    for r in range(args.rounds):
        for loader in (("memory", "stream") if r % 2 == 0 else ("stream", "memory")):
            runs[loader].append(run(loader))
    sizes = {}
    if args.sizes:
        sizes = {loader: [run(loader, 0.25), runs[loader][-1]] for loader in ("memory", "stream")}
    speed = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    result = {"n": args.n, "epochs": args.epochs, "rounds": args.rounds, "workers": args.workers,
              "runs": runs, "sizes": sizes,
              "images_per_s": {k: round(v, 1) for k, v in speed.items()},
              "stream_vs_memory": round(speed["stream"] / speed["memory"], 3),
              "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()},
              "cpus": os.cpu_count()}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
