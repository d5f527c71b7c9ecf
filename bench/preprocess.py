"""Preprocessing benchmark: triview's calibrate-and-crop against the decode floor and
against two naive ``cv2.undistort`` recipes, on the same real photos in one run.

(a) floor   = the least work that produces the same output: decode the input JPEG at the
              same reduced (DCT) scale triview decodes it at, then encode the very crops
              triview produced for that image (PNG); no undistortion, cropping or resizing
(b) naive   = full decode + cv2.undistort (maps rebuilt every call: what users write) +
              crop + area resize + encode
(b') cached naive = the same with the undistortion maps built once (cv2.remap)
(c) triview = calibrate-and-crop's own path (reduced JPEG decode where it loses nothing,
              fused undistort+crop+resize remap tables built once) + encode

Each at 640x480 and 1920x1080, for each output size (32 px, the digits demo's, and 224 px,
the photo default), in one process and over both cores. The photos are
OpenCV's sample photographs (Debian opencv-doc) resized to each size; the lens is the
one calibrated from OpenCV's left01..14 chessboards. Also measures the training input
pipeline: how long a training step waits for its batch, at the digits preset (shufflenet,
32 px, batch 32) and at the photo defaults (EfficientNet-Lite0, 224 px, batch 32), with
and without online augmentation (``loader`` in the JSON).

    python bench/preprocess.py --json preprocess.json          # 32 and 224 px
    python bench/preprocess.py --image-size 224 --json out.json  # one output size
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triview.crop import (CropGeometry, LensModel, _Cropper, _image_size,  # noqa: E402
                          choose_reduction, decode_bgr_bytes, view_boxes)

# OpenCV's left01..14 chessboards calibrated by `triview calibrate` (rms 0.196).
K_640 = [[532.789, 0.0, 342.481], [0.0, 532.914, 233.913], [0.0, 0.0, 1.0]]
DIST = [-0.2811, 0.02726, 0.00122, -0.00013, 0.15851]
SAMPLE_DIRS = ["/usr/share/doc/opencv-doc/examples/data"]


def source_photos() -> list[np.ndarray]:
    paths = []
    for d in SAMPLE_DIRS:
        paths += [p for p in sorted(glob.glob(f"{d}/*.jpg")) if "left" not in Path(p).name]
    photos = [cv2.imread(p, cv2.IMREAD_COLOR) for p in paths]
    photos = [p for p in photos if p is not None and min(p.shape[:2]) >= 200]
    if not photos:  # no opencv-doc: smooth random textures stand in
        rng = np.random.default_rng(0)
        photos = [cv2.GaussianBlur(rng.integers(0, 255, (480, 640, 3), np.uint8), (0, 0), 4)
                  for _ in range(8)]
    return photos


def write_inputs(folder: Path, size: tuple[int, int], n: int) -> list[str]:
    photos = source_photos()
    paths = []
    for i in range(n):
        img = cv2.resize(photos[i % len(photos)], size, interpolation=cv2.INTER_AREA)
        if i >= len(photos):  # vary the bytes so no two inputs are identical
            img = np.roll(img, i * 7, axis=1)
        p = folder / f"img{i:04d}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(p))
    return paths


_STATE: dict = {}


def _init(lens: LensModel, geometry: CropGeometry, size: tuple[int, int],
          crops: dict[str, list[np.ndarray]]) -> None:
    cv2.setNumThreads(1)
    K, dist = lens.camera_matrix(*size), np.asarray(lens.dist)
    maps = cv2.initUndistortRectifyMap(K, dist, None, K, size, cv2.CV_16SC2)
    _STATE.update(cropper=_Cropper(lens, geometry), lens=lens, geometry=geometry, size=size,
                  K=K, dist=dist, maps=maps, crops=crops)


def _encode(crops) -> int:
    return sum(len(cv2.imencode(".png", c)[1]) for c in crops)


def floor_one(path: str) -> int:
    """Decode at triview's reduced scale, encode triview's crops of this image."""
    data = Path(path).read_bytes()
    w, h = _image_size(data)
    decode_bgr_bytes(data, choose_reduction(w, h, _STATE["geometry"]))
    return _encode(_STATE["crops"][path])


def _crop_resize(und: np.ndarray) -> list[np.ndarray]:
    h, w = und.shape[:2]
    s = _STATE["geometry"].image_size
    return [cv2.resize(und[y0:y1, x0:x1], (s, s), interpolation=cv2.INTER_AREA)
            for x0, y0, x1, y1 in view_boxes(w, h, _STATE["geometry"]).values()]


def naive_one(path: str) -> int:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    return _encode(_crop_resize(cv2.undistort(image, _STATE["K"], _STATE["dist"])))


def cached_naive_one(path: str) -> int:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    return _encode(_crop_resize(cv2.remap(image, *_STATE["maps"], cv2.INTER_LINEAR)))


def triview_one(path: str) -> int:
    return _encode(list(_STATE["cropper"].views(Path(path)).values()))


def triview_crops(paths: list[str], lens: LensModel, geometry: CropGeometry) -> dict:
    """triview's output crops of every path: what the floor encodes."""
    cropper = _Cropper(lens, geometry)
    return {p: list(cropper.views(Path(p)).values()) for p in paths}


def timed(fn, paths, workers: int, lens, geometry, size, crops) -> float:
    """Seconds per image for ``fn`` over ``paths`` (best of 2 passes, warm)."""
    best = float("inf")
    if workers == 1:
        _init(lens, geometry, size, crops)
        fn(paths[0])
        for _ in range(2):
            start = time.perf_counter()
            for p in paths:
                fn(p)
            best = min(best, time.perf_counter() - start)
    else:
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(workers, initializer=_init, initargs=(lens, geometry, size, crops)) as pool:
            pool.map(fn, paths[:workers * 2])
            for _ in range(2):
                start = time.perf_counter()
                pool.map(fn, paths, chunksize=8)
                best = min(best, time.perf_counter() - start)
    return best / len(paths)


#: the training settings the loader is measured at: the digits preset (`make run`) and the
#: spec's defaults, which serve photos (a fine-tuning epoch at the photo input size)
LOADER_SETTINGS = {
    "digits_preset": {"backbone": "shufflenet_v2_x1_0", "image_size": 32, "batch_size": 32},
    "photo_defaults": {"backbone": "efficientnet_lite0", "image_size": 224, "batch_size": 32},
}


def loader_share(backbone: str, image_size: int, batch_size: int, steps: int = 10,
                 online: bool = False) -> dict:
    """Training input pipeline at one training setting: the share of each optimisation
    step spent waiting for the batch. Offline: materialised crops in memory; online: the
    same plus a fresh rotation + noise draw per sample."""
    import torch

    from triview.augment import AugmentConfig
    from triview.models import BranchNet, create_backbone
    from triview.train import TrainConfig, ViewData, batches

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = TrainConfig()
    model = BranchNet(create_backbone(backbone, 10, image_size)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    n = (steps + 2) * batch_size
    data = torch.randint(0, 255, (n, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    view = ViewData(data, labels, [str(i) for i in range(n)])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    wait = step = 0.0
    it = batches(view, order, batch_size, torch.channels_last,
                 AugmentConfig(mode="online") if online else None, epoch=1)
    for i in range(steps + 2):  # the first two steps warm up
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= 2:
            wait += t1 - t0
            step += t2 - t0
    return {"loader_wait_share": wait / step, "train_images_per_s": steps * batch_size / step,
            "loader_images_per_s": steps * batch_size / wait}


RATIOS = ("ratio_vs_floor", "speedup_vs_naive", "speedup_vs_cached_naive")
BASELINES = (("floor", floor_one), ("naive", naive_one), ("cached_naive", cached_naive_one),
             ("triview", triview_one))


def measure(paths: list[str], lens: LensModel, geometry: CropGeometry, size: tuple[int, int],
            key: str) -> dict:
    """One resolution at one output size, in one process and over two."""
    crops = triview_crops(paths, lens, geometry)
    entry: dict = {"resolution": f"{size[0]}x{size[1]}", "image_size": geometry.image_size,
                   "decode_reduction": choose_reduction(*size, geometry)}
    for workers in (1, 2):
        t = {name: timed(fn, paths, workers, lens, geometry, size, crops) for name, fn in BASELINES}
        r = {"ms_per_image": {k: round(v * 1e3, 3) for k, v in t.items()},
             "images_per_s": round(1.0 / t["triview"], 1),
             "ratio_vs_floor": round(t["triview"] / t["floor"], 3),
             "speedup_vs_naive": round(t["naive"] / t["triview"], 3),
             "speedup_vs_cached_naive": round(t["cached_naive"] / t["triview"], 3)}
        entry[f"{workers}_process" + ("es" if workers > 1 else "")] = r
        ms = r["ms_per_image"]
        print(f"{key} {workers} proc: floor {ms['floor']:.2f} ms, naive {ms['naive']:.2f} ms, "
              f"cached naive {ms['cached_naive']:.2f} ms, triview {ms['triview']:.2f} ms -> "
              f"(c)/(a) {r['ratio_vs_floor']:.2f}, (b)/(c) {r['speedup_vs_naive']:.2f}, "
              f"(b')/(c) {r['speedup_vs_cached_naive']:.2f}", flush=True)
    runs = [v for v in entry.values() if isinstance(v, dict)]
    entry["ratio_vs_floor"] = max(v["ratio_vs_floor"] for v in runs)
    entry["speedup_vs_naive"] = min(v["speedup_vs_naive"] for v in runs)
    entry["speedup_vs_cached_naive"] = min(v["speedup_vs_cached_naive"] for v in runs)
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--n", type=int, default=120, help="images per size")
    ap.add_argument("--image-size", type=int, nargs="+", default=[32, 224],
                    help="output crop sizes (one entry per resolution and size)")
    ap.add_argument("--no-loader", action="store_true", help="skip the training-loader figures")
    args = ap.parse_args()
    lens = LensModel(K=K_640, dist=DIST, image_size=(640, 480))
    results: dict = {"image_sizes": args.image_size, "cores": os.cpu_count(), "entries": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in ((640, 480), (1920, 1080)):
            folder = Path(tmp) / f"{size[0]}x{size[1]}"
            folder.mkdir()
            paths = write_inputs(folder, size, args.n if size[0] < 1000 else args.n // 2)
            for image_size in args.image_size:
                key = f"{size[0]}x{size[1]}@{image_size}px"
                results["entries"][key] = measure(paths, lens, CropGeometry(image_size=image_size),
                                                  size, key)
    entries = results["entries"].values()
    results["ratio_vs_floor"] = max(e["ratio_vs_floor"] for e in entries)
    results["speedup_vs_naive"] = min(e["speedup_vs_naive"] for e in entries)
    results["speedup_vs_cached_naive"] = min(e["speedup_vs_cached_naive"] for e in entries)
    if not args.no_loader:
        results["loader"] = {}
        for name, setting in LOADER_SETTINGS.items():
            loader = loader_share(**setting)
            online = loader_share(**setting, online=True)
            results["loader"][name] = {**setting, **loader, "online_augment": online}
            print(f"training loader, {name} ({setting['backbone']}, {setting['image_size']} px, "
                  f"batch {setting['batch_size']}): waits {loader['loader_wait_share']:.2%} of each "
                  f"step ({loader['loader_images_per_s']:.0f} img/s delivered vs "
                  f"{loader['train_images_per_s']:.0f} img/s trained); with online augmentation "
                  f"{online['loader_wait_share']:.2%} ({online['loader_images_per_s']:.0f} img/s "
                  "delivered)", flush=True)
    print(f"worst (c)/(a) = {results['ratio_vs_floor']:.2f} (bar <= 1.3); "
          f"worst (b)/(c) = {results['speedup_vs_naive']:.2f}; "
          f"worst (b')/(c) = {results['speedup_vs_cached_naive']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
