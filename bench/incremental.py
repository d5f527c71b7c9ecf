"""A scheduled run on grown data with the cache (``cache_root``) vs the first run, and vs
the same grown run without a cache: calibrate-and-crop and the frozen-feature pass.

    python bench/incremental.py --data ../shared/data/hymenoptera [--new 0.05]
        [--out /tmp/incremental] [--json FILE]

The photo set is split by a hash of each file's path into last week's photos and ``--new``
of them that arrive this week. Three runs of the first stages, each with the defaults
(ingest, calibrate-and-crop, balance, augment, one branch's head-only training):

1. *first*: last week's photos, an empty cache (it fills the cache);
2. *grown*: all photos, the cache from run 1;
3. *cold*: all photos, no cache (the same work as 2 without reuse).

Prints and writes ``{"photos_first", "photos_grown", "crop_s", "feature_s" (per run),
"incremental_share" (run 2 / run 1, crop and features together), "vs_cold" (run 2 / run 3),
"cache_hits", "features_reused", "same_predictions"}``. Crops and test probabilities of
runs 2 and 3 must be equal (checked).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def split_photos(data: Path, root: Path, new: float) -> tuple[Path, Path, int]:
    """Copy ``data`` into ``root/first`` (without the new photos) and ``root/grown`` (all)."""
    n_new = 0
    for src in sorted(p for p in data.rglob("*") if p.suffix.lower() in SUFFIXES):
        rel = src.relative_to(data)
        h = int(hashlib.sha256(str(rel).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        targets = ["grown"] + ([] if h < new else ["first"])
        n_new += h < new
        for t in targets:
            out = root / t / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
    return root / "first", root / "grown", n_new


def one_run(data: Path, out: Path, cache: str, view: str) -> dict:
    import pandas as pd

    from triview.artifacts import HISTORY_FILE, load_predictions
    from triview.stages import (augment_stage, balance_stage, calibrate_and_crop_stage,
                                ingest_stage, train_branch_stage)

    from triview.train import features

    features._OPEN.clear()  # each run as a new process: the store is read from its folder
    cached = {"cache_root": cache} if cache else {}
    ingest_stage(str(data), out / "ingest", plot=False)
    start = time.perf_counter()
    crop = calibrate_and_crop_stage(out / "ingest", out / "views", **cached)
    crop_s = time.perf_counter() - start
    balance_stage(out / "views", out / "balance")
    augment_stage(out / "views", out / "augment")
    rec = train_branch_stage(out / "views", out / "augment", out / "balance", view,
                             out / "branch", **cached)
    history = pd.read_csv(out / "branch" / HISTORY_FILE)
    return {"photos": crop["items_in"], "crop_s": round(crop_s, 2),
            "feature_s": round(float(history["feature_seconds"].iloc[0]), 2),
            "cache": crop.get("cache"), "features": rec.get("feature_cache"),
            "test_prob": load_predictions(out / "branch")["test_prob"]}


def same_crops(a: Path, b: Path) -> bool:
    """Whether two calibrate-and-crop outputs hold the same crops: the same rows of
    ``views.csv`` (image, view, split, label) and, row by row, the same PNG bytes (read
    from each output's shards)."""
    from triview import manifest as mf
    from triview.shards import read_index, read_member

    rows_a, rows_b = (list(mf.iter_table(Path(f) / mf.VIEWS_FILE, mf.VIEW_COLUMNS)) for f in (a, b))
    keys = ("image_id", "view", "split", "label", "labels")
    if not rows_a or [[r[k] for k in keys] for r in rows_a] != [[r[k] for k in keys] for r in rows_b]:
        return False
    index_a, index_b = read_index(a), read_index(b)
    return all(read_member(a, ra["path"], index_a) == read_member(b, rb["path"], index_b)
               for ra, rb in zip(rows_a, rows_b))


def main() -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--new", type=float, default=0.05)
    parser.add_argument("--view", default="whole")
    parser.add_argument("--out", type=Path, default=Path("/tmp/triview-incremental"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    first_data, grown_data, n_new = split_photos(args.data, args.out / "data", args.new)
    cache = str(args.out / "cache")
    first = one_run(first_data, args.out / "first", cache, args.view)
    grown = one_run(grown_data, args.out / "grown", cache, args.view)
    cold = one_run(grown_data, args.out / "cold", "", args.view)
    same = bool(np.allclose(grown["test_prob"], cold["test_prob"], atol=1e-5))
    crops_equal = same_crops(args.out / "grown/views", args.out / "cold/views")

    def cost(r):
        return r["crop_s"] + r["feature_s"]

    result = {"data": str(args.data), "view": args.view, "new_photos": n_new,
              "photos_first": first["photos"], "photos_grown": grown["photos"],
              "crop_s": {k: r["crop_s"] for k, r in (("first", first), ("grown", grown), ("cold", cold))},
              "feature_s": {k: r["feature_s"] for k, r in (("first", first), ("grown", grown), ("cold", cold))},
              "incremental_share": round(cost(grown) / cost(first), 3),
              "crop_share": round(grown["crop_s"] / first["crop_s"], 3),
              "feature_share": round(grown["feature_s"] / first["feature_s"], 3),
              "vs_cold": round(cost(grown) / cost(cold), 3),
              "cache_hits": grown["cache"]["hits"], "cropped": grown["cache"]["computed"],
              "features_reused": grown["features"]["reused"],
              "features_computed": grown["features"]["computed"],
              "same_predictions": same, "same_crops": crops_equal}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same and crops_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
