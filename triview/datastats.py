"""Dataset statistics of an ingested data set: a per-class table (``stats.csv``), a
summary (``stats.json``: formats, sizes, aspect ratios, duplicates, quarantine
reasons) and a plot (``stats.png``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from triview import manifest as mf
from triview.storage import atomic_path, atomic_write_text

STATS_COLUMNS = ("class", "images", "train", "val", "test", "mean_width", "mean_height",
                 "median_aspect", "mean_kib")


def _quantiles(values: pd.Series) -> dict:
    if not len(values):
        return {}
    q = values.quantile([0.0, 0.05, 0.5, 0.95, 1.0]).to_numpy()
    return dict(zip(("min", "p5", "median", "p95", "max"), (round(float(v), 4) for v in q)))


def class_table(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per class; multi-label rows count once for each of their labels."""
    exploded = table.assign(cls=table["labels"].map(mf.split_labels)).explode("cls")
    exploded["aspect"] = exploded["width"] / exploded["height"]
    rows = []
    for c in classes:
        part = exploded[exploded["cls"] == c]
        by_split = part["split"].value_counts()
        rows.append({"class": c, "images": len(part),
                     **{s: int(by_split.get(s, 0)) for s in mf.SPLITS},
                     "mean_width": round(float(part["width"].mean()), 1) if len(part) else 0.0,
                     "mean_height": round(float(part["height"].mean()), 1) if len(part) else 0.0,
                     "median_aspect": round(float(part["aspect"].median()), 4) if len(part) else 0.0,
                     "mean_kib": round(float(part["bytes"].mean()) / 1024, 2) if len(part) else 0.0})
    return pd.DataFrame(rows, columns=list(STATS_COLUMNS))


def split_balance(per_class: pd.DataFrame) -> dict:
    """How closely each split's class mix follows the whole data set's: per split, each
    class's share and the largest absolute difference from its overall share."""
    total = per_class["images"].sum()
    overall = per_class.set_index("class")["images"] / max(1, total)
    result = {}
    for s in mf.SPLITS:
        n = per_class[s].sum()
        share = per_class.set_index("class")[s] / n if n else overall * 0
        result[s] = {"images": int(n),
                     "class_share": {str(k): round(float(v), 4) for k, v in share.items()},
                     "max_share_difference": round(float((share - overall).abs().max()), 4)
                     if n and len(overall) else 0.0}
    return result


def write_statistics(table: pd.DataFrame, quarantine: pd.DataFrame, near: pd.DataFrame,
                     classes: list[str], out: str | Path, *, n_input: int, dataset_version: str,
                     plot: bool = True, split: dict | None = None) -> dict:
    """Write ``stats.csv``, ``stats.json`` and (``plot``) ``stats.png``; return the summary."""
    out = Path(out)
    per_class = class_table(table, classes)
    mf.write_table(per_class, out / mf.STATS_FILE, STATS_COLUMNS)
    aspect = table["width"] / table["height"]
    n_labels = table["labels"].map(lambda s: len(mf.split_labels(s)))
    images = per_class["images"]
    summary = {
        "dataset_version": dataset_version,
        "input_files": n_input, "used": len(table), "quarantined": len(quarantine),
        "classes": len(classes),
        "multi_label": bool((n_labels > 1).any()),
        "labels_per_image": round(float(n_labels.mean()), 4) if len(n_labels) else 0.0,
        "imbalance_ratio": round(float(images.max() / max(1, images.min())), 4) if len(images) else 0.0,
        "splits": {s: int((table["split"] == s).sum()) for s in mf.SPLITS},
        "formats": {k: int(v) for k, v in table["format"].value_counts().items()},
        "modes": {k: int(v) for k, v in table["mode"].value_counts().items()},
        "width": _quantiles(table["width"]), "height": _quantiles(table["height"]),
        "aspect_ratio": _quantiles(aspect), "file_bytes": _quantiles(table["bytes"]),
        "exact_duplicates": int((quarantine["reason"] == "exact_duplicate").sum()),
        "near_duplicate_pairs": len(near),
        "near_duplicate_pairs_across_splits": int((near["split_a"] != near["split_b"]).sum())
        if len(near) else 0,
        "quarantine_reasons": {k: int(v) for k, v in quarantine["reason"].value_counts().items()},
        "split": {**(split or {}), "class_balance": split_balance(per_class)},
    }
    atomic_write_text(out / mf.STATS_JSON_FILE, json.dumps(summary, indent=2))
    if plot and len(table):
        _plot(per_class, table, aspect, summary, out / mf.STATS_PLOT_FILE)
    return summary


def _plot(per_class: pd.DataFrame, table: pd.DataFrame, aspect: pd.Series, summary: dict,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    top = per_class.nlargest(40, "images")  # beyond 40 bars the labels are unreadable
    bottom = np.zeros(len(top))
    for split in mf.SPLITS:
        axes[0, 0].bar(top["class"], top[split], bottom=bottom, label=split)
        bottom += top[split].to_numpy()
    axes[0, 0].set_title(f"images per class ({len(per_class)} classes)")
    axes[0, 0].tick_params(axis="x", rotation=90, labelsize=7)
    axes[0, 0].legend()
    axes[0, 1].hist(np.clip(aspect, 0.1, 10), bins=40, log=True)
    axes[0, 1].set_title("aspect ratio (width / height)")
    axes[1, 0].hist(np.minimum(table["width"], table["height"]), bins=40, log=True)
    axes[1, 0].set_title("shorter side (px)")
    mix = {**{f"fmt:{k}": v for k, v in summary["formats"].items()},
           **{f"q:{k}": v for k, v in summary["quarantine_reasons"].items()}}
    axes[1, 1].barh(list(mix), list(mix.values()))
    axes[1, 1].set_title("formats used / quarantine reasons")
    axes[1, 1].tick_params(axis="y", labelsize=7)
    fig.suptitle(f"dataset {summary['dataset_version'][:12]}: {summary['used']} used, "
                 f"{summary['quarantined']} quarantined of {summary['input_files']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
