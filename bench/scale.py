"""The whole DAG on N and on 8N distinct photos: time, peak memory per stage, objects per
artifact, and a scheduled re-run's crop stage on the grown set with the cache.

    python bench/scale.py --n 2000 --json bench/results_scale.json --stream-json bench/results_stream.json
    python bench/scale.py --n 250 --json /tmp/scale.json           # a quick look
    python bench/scale.py --n 2000 --only-incremental --repeat 5 --json bench/results_scale.json
    python bench/scale.py --n 2000 --only-incremental --source photos --json bench/results_scale.json

Photos: scikit-learn's digits under a random lens-like warp (rotation, scale, shear,
shift), a random colour tint and background, and sensor noise, written as JPEG into class
folders; every photo is a new image (its own draw), so ingest keeps them all.

Each size runs ``triview run --preset digits`` (kfp.local, one process per task) in a
fresh folder. Every task's ``stage.json`` records its wall time, the peak resident memory
of its process (or of the largest child it waited for: pool workers, torchrun ranks) and
the files its artifact folder holds (what KFP's launcher uploads as objects).

Then the incremental check: calibrate-and-crop on the 8N set with an empty cache (it fills
the cache), and on the 8N set plus 5 % new photos with that cache. The digits preset
fine-tunes its branches, so it has no frozen-feature pass; bench/incremental.py measures
the feature pass's reuse on photos with the photo defaults. ``--source photos`` measures the
same re-run on photo-sized photos (real photos of ../shared/data/hymenoptera under the same
kind of random transforms, cropped with the photo defaults) as ``incremental_photos``.

JSON: ``n``, ``factor``, per-size stage seconds / peak RSS / output files, ``time_ratio``
(DAG wall time 8N / N), ``rss_ratio`` per stage and ``rss_ratio_max``, ``objects`` per
artifact (largest at 8N) and ``objects_max`` with its bar ``N / 500 + 20``,
``stream_vs_memory`` (from ``--stream-json``, bench/stream.py's result, when given: that
bench trains one branch both ways on the same crops; null without it) and
``incremental_share``.
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


PHOTOS = REPO.parent / "shared" / "data" / "hymenoptera"


def _make_photo(folder: str, i: int, sources: list[Path]) -> None:
    """Photo ``i``: one of ``sources`` (real photos, at their own size) under a random
    rotation, scale, shear and shift, a colour cast and sensor noise."""
    rng = np.random.default_rng(1_000_003 * i + 29)
    src = sources[int(rng.integers(len(sources)))]
    img = cv2.imread(str(src), cv2.IMREAD_COLOR).astype(np.float32)
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-12, 12), rng.uniform(1.0, 1.2))
    m[0, 1] += rng.uniform(-0.08, 0.08)
    m[:, 2] += rng.uniform(-0.05, 0.05, 2) * (w, h)
    img = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    img = img * rng.uniform(0.8, 1.2, 3)[None, None] + rng.normal(0, 4, img.shape)
    path = Path(folder) / src.parent.name / f"photo_{i:07d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8),
                [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))])


def _make_chunk(args: tuple[str, int, int, int, str]) -> int:
    from sklearn.datasets import load_digits

    folder, start, stop, side, source = args
    if source == "photos":
        sources = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        for i in range(start, stop):
            _make_photo(folder, i, sources)
        return stop - start
    digits = load_digits()
    for i in range(start, stop):
        rng = np.random.default_rng(1_000_003 * i + 17)
        k = int(rng.integers(len(digits.images)))
        ink = np.clip(digits.images[k] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        gray = cv2.resize(ink, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255
        angle, scale = rng.uniform(-12, 12), rng.uniform(0.85, 1.1)
        m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, scale)
        m[0, 1] += rng.uniform(-0.1, 0.1)
        m[:, 2] += rng.uniform(-0.06, 0.06, 2) * side
        gray = cv2.warpAffine(gray, m, (side, side), borderMode=cv2.BORDER_CONSTANT)
        paper, ink_colour = rng.uniform(0.55, 1.0, 3), rng.uniform(0.0, 0.35, 3)
        rgb = paper[None, None] * (1 - gray[..., None]) + ink_colour[None, None] * gray[..., None]
        rgb += rng.normal(0, 0.03, rgb.shape)
        img = np.clip(rgb * 255, 0, 255).astype(np.uint8)
        path = Path(folder) / str(int(digits.target[k])) / f"photo_{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))])
    return stop - start


def generate(folder: Path, start: int, stop: int, side: int = 64, source: str = "digits") -> None:
    step = 1000
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_make_chunk, [(str(folder), s, min(stop, s + step), side, source)
                                    for s in range(start, stop, step)]))


def link_photos(src: Path, dst: Path, stop: int, start: int = 0) -> None:
    """Hard links to photos ``start..stop-1`` of ``src`` in ``dst``."""
    for path in src.rglob("photo_*.jpg"):
        if start <= int(path.stem.split("_")[1]) < stop:
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def run_dag(data: Path, out: Path) -> dict:
    """``triview run --preset digits`` on ``data``; the wall time and each task's record."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "triview", "run", "--data", str(data), "--out", str(out),
                    "--preset", "digits"], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    stages, objects = {}, {}
    for record_path in sorted((out / "pipeline_root").rglob("stage.json")):
        rec = json.loads(record_path.read_text())
        artifact = record_path.parent
        stages[rec["stage"]] = {"seconds": rec["seconds"],
                                "peak_rss_mb": round(rec["peak_rss_bytes"] / 2**20, 1),
                                "output_files": rec["output_files"]}
    for task in (out / "pipeline_root").glob("*/*"):
        for artifact in task.iterdir():
            if artifact.is_dir():
                objects[f"{task.name}/{artifact.name}"] = sum(1 for p in artifact.rglob("*") if p.is_file())
    return {"wall_s": round(wall, 1), "stages": stages, "objects": objects}


def crop_once(data: Path, work: Path, cache: str) -> float:
    """Ingest ``data``, then calibrate-and-crop it with ``cache``, in a process of its own
    as in the DAG (one process per task; its pool's server is its own); the crop stage's
    seconds as its ``stage.json`` records them."""
    from triview.stages import ingest_stage

    ingest_stage(str(data), work / "ingest", plot=False, **INGEST)
    code = ("import json, sys; from triview.stages import calibrate_and_crop_stage; "
            "calibrate_and_crop_stage(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, str(work / "ingest"), str(work / "views"),
                    json.dumps({**CROP, "cache_root": cache})], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads((work / "views" / "stage.json").read_text())["seconds"]


def cached_rerun(root: Path) -> tuple[float, float]:
    """calibrate-and-crop on the 8N set with an empty cache, then on the grown set with that
    cache: both runs' seconds."""
    for old in ("cache", "crop-first", "crop-again"):
        shutil.rmtree(root / old, ignore_errors=True)
    first = crop_once(root / "big", root / "crop-first", str(root / "cache"))
    return first, crop_once(root / "grown", root / "crop-again", str(root / "cache"))


CROP, INGEST = {}, {}  # the digits preset's parameters of those stages, filled in main()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="photos of the small run (the bar: >= 2000)")
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--new", type=float, default=0.05, help="share of new photos in the re-run")
    ap.add_argument("--out", default="/tmp/triview-scale")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--json")
    ap.add_argument("--stream-json", help="bench/stream.py's result, for stream_vs_memory")
    ap.add_argument("--only-incremental", action="store_true",
                    help="measure only the cached re-run, and update its keys in --json (the "
                         "file of an earlier full run), with the commit it was measured on")
    ap.add_argument("--source", choices=("digits", "photos"), default="digits",
                    help="with --only-incremental: 'photos' generates the photos from "
                         "../shared/data/hymenoptera (photo-sized, cropped with the photo "
                         "defaults) and writes the key incremental_photos")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --only-incremental: measure the pair this many times (each from an "
                         "empty cache); incremental_share is the median")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat is at least 1")
    if args.source == "photos" and not args.only_incremental:
        ap.error("--source photos is for --only-incremental (the whole DAG runs on digits)")
    if args.source == "photos" and not PHOTOS.is_dir():
        ap.error(f"{PHOTOS} is not here")

    from triview.params import defaults, load_preset, pick

    values = {**defaults(), **(load_preset("digits") if args.source == "digits" else {})}
    CROP.update(pick("calibrate-and-crop", values))
    INGEST.update(pick("ingest", values))
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    big, n_new = args.n * args.factor, int(round(args.n * args.factor * args.new))
    start = time.perf_counter()
    generate(root / "all", 0, big + n_new, source=args.source)
    print(f"generated {big + n_new} photos in {time.perf_counter() - start:.0f} s", flush=True)
    link_photos(root / "all", root / "small", args.n)
    link_photos(root / "all", root / "big", big)
    link_photos(root / "all", root / "grown", big + n_new)

    if args.only_incremental:
        pairs = [cached_rerun(root) for _ in range(args.repeat)]
        firsts, agains = zip(*pairs)
        shares = sorted(round(again / first, 3) for first, again in pairs)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        figures = {"photos_first": big, "photos_grown": big + n_new,
                   "crop_first_s": [round(f, 2) for f in firsts], "crop_grown_s": [round(a, 2) for a in agains],
                   "shares": shares, "measured_on": commit}
        share = statistics.median(shares)
        if args.source == "digits":
            update = {"incremental": figures, "incremental_share": share}
        else:  # a second figure beside the digits one, on photo-sized photos
            update = {"incremental_photos": {**figures, "source": str(PHOTOS.relative_to(REPO.parent)),
                                             "image_size": CROP["image_size"], "layout": CROP["layout"],
                                             "incremental_share": share}}
        print(json.dumps(update, indent=2))
        if args.json:
            result = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
            Path(args.json).write_text(json.dumps({**result, **update}, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        return 0

    runs = {}
    for name, n in (("small", args.n), ("big", big)):
        runs[name] = {"photos": n, **run_dag(root / name, root / f"run-{name}")}
        print(f"{name}: {n} photos, DAG {runs[name]['wall_s']} s", flush=True)
        if not args.keep:
            shutil.rmtree(root / f"run-{name}" / "pipeline_root", ignore_errors=True)

    first, again = cached_rerun(root)
    small, large = runs["small"]["stages"], runs["big"]["stages"]
    rss_ratio = {s: round(large[s]["peak_rss_mb"] / small[s]["peak_rss_mb"], 3) for s in small if s in large}
    objects = runs["big"]["objects"]
    result = {
        "n": args.n, "factor": args.factor, "runs": runs,
        "time_ratio": round(runs["big"]["wall_s"] / runs["small"]["wall_s"], 3),
        "rss_ratio": rss_ratio, "rss_ratio_max": max(rss_ratio.values()),
        "objects": objects, "objects_max": max(objects.values()),
        "objects_bar": args.n // 500 + 20,
        "objects_max_without_ingest": max(v for k, v in objects.items() if not k.startswith("ingest/")),
        "stream_vs_memory": (json.loads(Path(args.stream_json).read_text())["stream_vs_memory"]
                             if args.stream_json else None),
        "stream_vs_memory_from": args.stream_json,
        "incremental": {"photos_first": big, "photos_grown": big + n_new,
                        "crop_first_s": round(first, 2), "crop_grown_s": round(again, 2)},
        "incremental_share": round(again / first, 3),
        "note": "digits preset (fine-tuned branches, no frozen-feature pass; loader=auto holds "
                "the 32 px crops of a split in memory, far below its 2 GiB threshold); "
                "incremental_share: calibrate-and-crop alone, the crop cache in packs",
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
