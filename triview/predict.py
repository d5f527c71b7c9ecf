"""Predict with an exported ensemble: each image goes through exactly the training path
(ingest's decoding and normalisation, then calibrate-and-crop with the model card's
geometry and lens) and then through the exported model (ONNX Runtime, else TorchScript).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from triview import crop
from triview import validate
from triview.runtime import load_runtime
from triview.registry import resolve_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class PredictError(ValueError):
    """An input that cannot be predicted (missing, not an image, undecodable ...)."""


@dataclass
class Prediction:
    path: str
    labels: list[tuple[str, float]] = field(default_factory=list)   # best first
    error: str | None = None
    views: dict[str, tuple[str, float]] | None = None   # each view's own top label

    def to_json(self) -> dict:
        out = {"path": self.path, "labels": labels_json(self.labels)}
        if self.views is not None:
            out["views"] = {v: labels_json([top])[0] for v, top in self.views.items()}
        if self.error:
            out["error"] = self.error
        return out


def labels_json(labels: list[tuple[str, float]]) -> list[dict]:
    """``[{"label", "score"}]`` as ``triview predict --format json`` prints them (and the
    KServe predictor answers them)."""
    return [{"label": k, "score": round(s, 6)} for k, s in labels]


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given; folders replaced by the image files below them (sorted)."""
    out = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += [str(p) for p in sorted(path.rglob("*"))
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            out.append(item)
    return out


class Predictor:
    """An exported ensemble with its preprocessing, ready for image files."""

    def __init__(self, model: str, threads: int = 0) -> None:
        self.folder = resolve_model(model)
        self.run, self.card = load_runtime(self.folder, threads)
        lens = dict(self.card.get("lens") or {})
        if lens.get("image_size"):
            lens["image_size"] = tuple(lens["image_size"])
        self.geometry = crop.CropGeometry(**self.card["crop_geometry"])
        # the same per-process cropper calibrate-and-crop uses (one sampler per image size)
        self.cropper = crop._Cropper(crop.LensModel(**lens), self.geometry)
        self.classes = list(self.card["classes"])
        self.multilabel = self.card.get("task", "multiclass") == "multilabel"

    def views(self, path: str | Path) -> dict[str, np.ndarray]:
        """The RGB views of one image file, produced as in training (see :meth:`views_of_bytes`)."""
        path = Path(path)
        if not path.is_file():
            raise PredictError("no such file")
        return self.views_of_bytes(path.read_bytes())

    def views_of_bytes(self, data: bytes, max_pixels: int = validate.MAX_PIXELS) -> dict[str, np.ndarray]:
        """The RGB views of one image file's bytes, produced as in training, decoding the
        file once: ingest's validation (which keeps the original bytes when OpenCV decodes
        them as PIL does, else stores the normalised 8-bit RGB image) gives the pixels
        calibrate-and-crop would decode from what ingest stored (a JPEG at the same DCT
        scale), and the views are cut from them. Raises :class:`PredictError` for what
        ingest would quarantine (a file declaring more than ``max_pixels`` is refused
        from its header, before any decoding)."""
        return self.views_and_size(data, max_pixels)[0]

    def views_and_size(self, data: bytes, max_pixels: int = validate.MAX_PIXELS
                       ) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        """:meth:`views_of_bytes` and the photo's (width, height) at full resolution, EXIF
        orientation applied: the frame the views were cut from."""
        decoded = validate.decode(
            data, min_size=1, max_pixels=max_pixels,
            jpeg_reduction=lambda w, h: crop.choose_reduction(w, h, self.geometry))
        if decoded.reason is not None:
            raise PredictError(decoded.reason.replace("_", " ")
                               + (f" ({decoded.detail})" if decoded.detail else ""))
        rgb = np.asarray(decoded.image)
        decoded.image = None  # the array is the one copy of the pixels from here on
        try:
            views = self.cropper.views_of_image(rgb, decoded.source_size)
        except ValueError as exc:
            raise PredictError(str(exc)) from exc
        # a JPEG decoded at a DCT scale is never rotated: its declared size is the frame
        size = decoded.source_size if decoded.reduction > 1 else (rgb.shape[1], rgb.shape[0])
        return views, size

    def _inputs(self, views: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        return [np.stack([b[v] for b in views]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
                for v in self.card["views"]]

    def probabilities(self, views: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The model's output (N x C) for the views of N images."""
        return self.run(self._inputs(views))

    def view_probabilities(self, views: list[dict[str, np.ndarray]]
                           ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """The model's output (N x C) and each view's own probabilities ``{view: N x C}``
        (None when the export has no per-view outputs)."""
        probs, per_view = self.run.with_views(self._inputs(views))
        if per_view is None:
            return probs, None
        return probs, dict(zip(self.card["views"], per_view))

    def top(self, prob: np.ndarray) -> tuple[str, float]:
        """The best class and its score (the first in :meth:`labels` order)."""
        best = int(np.argsort(-prob, kind="stable")[0])
        return self.classes[best], float(prob[best])

    def default_threshold(self):
        """0.5, or for multi-label models the per-label thresholds tuned on validation."""
        tuned = self.card.get("thresholds") if self.multilabel else None
        return np.asarray(tuned, dtype=np.float64) if tuned else 0.5

    def predict(self, paths: list[str], threshold: float | None = None,
                batch_size: int = 64, views: bool = False) -> list[Prediction]:
        """Labels with scores for every path (best first); failures carry an error instead.

        Multi-class: the best class always, and any other class scoring >= threshold
        (default 0.5). Multi-label: every label scoring >= its threshold; by default the
        per-label thresholds tuned on validation (the model card's), else 0.5. With
        ``views``, each prediction also names every view's own top label and score.
        """
        if threshold is None:
            threshold = self.default_threshold()
        results = [Prediction(str(p)) for p in paths]
        for start in range(0, len(paths), batch_size):
            batch, index = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    batch.append(self.views(paths[i]))
                    index.append(i)
                except (PredictError, OSError, ValueError) as exc:
                    results[i].error = str(exc)
            if not batch:
                continue
            if views:
                probs, per_view = self.view_probabilities(batch)
                if per_view is None:
                    raise PredictError(f"the model in {self.folder} has no per-view outputs: "
                                       f"its voter reads one view only, or it was exported "
                                       f"before them (export it again to see each view)")
            else:
                probs, per_view = self.probabilities(batch), None
            for j, (i, prob) in enumerate(zip(index, probs)):
                results[i].labels = self.labels(prob, threshold)
                if per_view is not None:
                    results[i].views = {v: self.top(p[j]) for v, p in per_view.items()}
        return results

    def labels(self, prob: np.ndarray, threshold=None) -> list[tuple[str, float]]:
        """``(label, score)`` pairs, best first, under ``threshold`` (default: the model's)."""
        if threshold is None:
            threshold = self.default_threshold()
        order = np.argsort(-prob, kind="stable")
        cut = np.broadcast_to(np.asarray(threshold, dtype=np.float64), prob.shape)
        keep = [k for k in order if prob[k] >= cut[k]]
        if not self.multilabel and order[0] not in keep:
            keep = [order[0]] + keep
        return [(self.classes[k], float(prob[k])) for k in keep]

    def counts(self, results: list[Prediction]) -> Counter:
        """Images per class: the best class (multi-class) or every label (multi-label)."""
        counts: Counter = Counter()
        for r in results:
            if r.error is None and r.labels:
                counts.update([k for k, _ in r.labels] if self.multilabel else [r.labels[0][0]])
        return counts


def format_table(predictor: Predictor, results: list[Prediction]) -> str:
    from tabulate import tabulate

    shown_views = any(r.views for r in results)
    rows = [[r.path, "ERROR: " + r.error if r.error else
             ", ".join(f"{k} ({s:.3f})" for k, s in r.labels) or "(none)"]
            + ([", ".join(f"{v}: {k} ({s:.3f})" for v, (k, s) in (r.views or {}).items())]
               if shown_views else []) for r in results]
    counts = predictor.counts(results)
    ok = sum(r.error is None for r in results)
    per_class = [[c, counts.get(c, 0), f"{counts.get(c, 0) / ok:.1%}" if ok else "-"]
                 for c in predictor.classes]
    failed = len(results) - ok
    return "\n".join([
        tabulate(rows, headers=["image", "labels (score)"]
                 + (["each view's top label"] if shown_views else [])), "",
        tabulate(per_class, headers=["class", "images", "share"]), "",
        f"{ok} images predicted" + (f", {failed} failed" if failed else ""),
    ])
