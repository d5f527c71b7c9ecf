"""Ingest at scale: 100k and 200k small JPEGs through ``triview.ingest``, against a
decode-only loop measured in the same run.

For each size N (default 100,000 and 200,000) it generates N distinct 64x64 JPEGs
in class folders (hard links share the files between sizes), then runs ingest in a
fresh process and records its wall time and the peak resident memory of that
process *plus its pool workers* (sampled from /proc every 0.1 s). The decode-only
baseline reads, hashes nothing and fully decodes the same files to RGB in one
process: the floor that ingest (read, SHA-256, sniff, decode, EXIF, normalise,
dHash, atomic write, bookkeeping, split, statistics) is compared with per core.

    python bench/ingest_scale.py --json bench/results_ingest_scale.json
    python bench/ingest_scale.py --sizes 2000 4000          # a quick check

Bars (issue 3): peak RSS <= 1.5 GB at 100k; time(200k) / time(100k) <= 2.1.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
N_CLASSES = 20


def _make_chunk(args: tuple[str, int, int, int]) -> int:
    folder, start, stop, side = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((side, side), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        path = Path(folder) / f"class_{i % N_CLASSES:02d}" / f"img {i:07d}.jpg"
        path.write_bytes(buf.getvalue())
    return stop - start


def generate(folder: Path, n: int, side: int, workers: int) -> None:
    for c in range(N_CLASSES):
        (folder / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    step = 5000
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_chunk, [(str(folder), s, min(n, s + step), side)
                                    for s in range(0, n, step)]))


def link_subset(src: Path, dst: Path, n: int) -> None:
    """The first n images of ``src`` as hard links (same bytes, no extra disk)."""
    for c in range(N_CLASSES):
        (dst / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rel = f"class_{i % N_CLASSES:02d}/img {i:07d}.jpg"
        os.link(src / rel, dst / rel)


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


_DRIVER = """
import json, sys, time
from triview.ingest import ingest
t = time.perf_counter()
r = ingest(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), progress=False, plot=True)
print(json.dumps({"seconds": time.perf_counter() - t, "used": len(r.manifest),
                  "quarantined": len(r.quarantine), "n_input": r.n_input}))
"""


def run_ingest(data: Path, out: Path, workers: int) -> dict:
    """Ingest in a fresh process; its own timer, and the tree's peak RSS sampled outside."""
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(data), str(out), str(workers)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    peak, peak_single = 0, 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / 2**20, 1)
    return result


def decode_only(folder: Path, limit: int) -> float:
    """Images/s of read + full decode to RGB, one process, on up to ``limit`` files."""
    paths = sorted(folder.rglob("*.jpg"))[:limit]
    t = time.perf_counter()
    for p in paths:
        with Image.open(io.BytesIO(p.read_bytes())) as img:
            img.load()
            img.convert("RGB")
    return len(paths) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 200_000])
    parser.add_argument("--side", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--decode-sample", type=int, default=20_000,
                        help="files timed by the decode-only loop (default 20000)")
    parser.add_argument("--tmp", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results_ingest_scale.json"))
    args = parser.parse_args(argv)
    sizes = sorted(args.sizes)

    tmp_dir = tempfile.TemporaryDirectory(prefix="triview-ingest-bench-", dir=args.tmp)
    try:
        tmp = Path(tmp_dir.name)
        t = time.perf_counter()
        generate(tmp / "all", sizes[-1], args.side, args.workers)
        gen_s = time.perf_counter() - t
        print(f"generated {sizes[-1]} JPEGs ({args.side}x{args.side}) in {gen_s:.1f} s", flush=True)
        decode_rate = decode_only(tmp / "all", args.decode_sample)
        print(f"decode-only: {decode_rate:.0f} images/s on one core", flush=True)
        runs = []
        for n in sizes:
            data = tmp / "all" if n == sizes[-1] else tmp / f"n{n}"
            if n != sizes[-1]:
                link_subset(tmp / "all", data, n)
            r = run_ingest(data, tmp / f"out{n}", args.workers)
            assert r["n_input"] == n == r["used"] + r["quarantined"], r
            r.update(n=n, images_per_s=round(n / r["seconds"], 1))
            runs.append(r)
            print(f"ingest {n}: {r['seconds']:.1f} s, {r['images_per_s']:.0f} images/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB (process + workers)", flush=True)
        write_report(runs, decode_rate, gen_s, sizes, args)   # before the slow clean-up
    finally:
        print("removing the generated files ...", flush=True)
        tmp_dir.cleanup()
    return 0


def write_report(runs: list[dict], decode_rate: float, gen_s: float, sizes: list[int],
                 args: argparse.Namespace) -> None:
    first, last = runs[0], runs[-1]
    rate = first["images_per_s"]
    result = {
        "images_per_s": rate,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "ratio_200k_100k": round(last["seconds"] / first["seconds"], 4),
        "decode_only_images_per_s": round(decode_rate, 1),
        "images_per_s_per_core": round(rate / args.workers, 1),
        "decode_only_images_per_s_per_core": round(decode_rate, 1),
        "ingest_per_core_vs_decode_only": round(rate / args.workers / decode_rate, 4),
        "workers": args.workers, "cores": os.cpu_count(),
        "sizes": sizes, "image_side_px": args.side, "generate_seconds": round(gen_s, 1),
        "runs": runs,
        "note": "ratio_200k_100k is time(largest size) / time(smallest size); images_per_s "
                "is the smallest size; peak_rss_mb sums the ingest process and its workers",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("images_per_s", "peak_rss_mb", "ratio_200k_100k",
                                             "decode_only_images_per_s")}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
