"""The output contract of the model stages: what a branch, a voter, an evaluation and an
export folder hold, named here and nowhere else, with the readers and writers of the
small files (the image and view manifests are :mod:`triview.manifest`'s).

A branch folder (train-branch)::

    model.pt  model.json  predictions.npz  history.csv  history.png  checkpoints/
    head_history.csv   (with a head phase: one row per head epoch)

``model.json`` names the view, classes, image size, task and training config;
``predictions.npz`` holds ``{val,test}_{prob,ids,labels}`` (and ``thresholds`` for
multi-label, ``oof_*`` with out-of-fold voter inputs). A voter folder: ``voter.json``
(``{method, params, views, task, name, ...}``) and ``candidates.csv``. An evaluation
folder: ``eval.json``, ``blessing.json``, ``report.md``, ``report.html`` (and the data
profile of :mod:`triview.drift`). An export folder: the ensemble as TorchScript and ONNX,
``weights.safetensors``, ``voter.json``, ``model_card.json``, ``model_card.md``,
``seen_images.txt`` and ``seen_sources.json`` (the images it trained and validated on, and
their source groups) and the data profile.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from triview.storage import atomic_path, atomic_write_text

# branch
MODEL_FILE = "model.pt"
MODEL_META_FILE = "model.json"
PREDICTIONS_FILE = "predictions.npz"
HISTORY_FILE = "history.csv"
HISTORY_PLOT = "history.png"
HEAD_HISTORY_FILE = "head_history.csv"   # one row per head-phase epoch (when head_epochs > 0)
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"
# voter
VOTER_FILE = "voter.json"
CANDIDATES_FILE = "candidates.csv"
# evaluation
EVAL_FILE = "eval.json"
BLESSING_FILE = "blessing.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
# export
ENSEMBLE_FILE = "ensemble.torchscript.pt"
ONNX_FILE = "ensemble.onnx"
INT8_FILE = "ensemble.int8.onnx"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model_card.json"
CARD_MD = "model_card.md"
#: the ids of the images the model trained and validated on, one per line (the card names
#: the file, its count and SHA-256); the gate scores a champion only on images not in it
SEEN_FILE = "seen_images.txt"
#: the source groups (ingest's ``source_id``) of those images, a sorted JSON list (the card
#: names it with its SHA-256): the gate also excludes re-encoded copies of a seen photo
SEEN_SOURCES_FILE = "seen_sources.json"

Folder = str | Path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable))


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def read_branch_meta(folder: Folder) -> dict:
    return _read_json(Path(folder) / MODEL_META_FILE)


def write_branch_meta(folder: Folder, meta: dict) -> None:
    _write_json(Path(folder) / MODEL_META_FILE, meta)


def branches_by_view(branch_dirs: list[Folder]) -> dict[str, Path]:
    """Each trained branch folder by its view name (from its ``model.json``)."""
    return {read_branch_meta(d)["view"]: Path(d) for d in branch_dirs}


def load_predictions(folder: Folder) -> dict:
    import numpy as np

    with np.load(Path(folder) / PREDICTIONS_FILE) as data:
        return {k: data[k] for k in data.files}


def write_predictions(folder: Folder, arrays: dict) -> None:
    import numpy as np

    with atomic_path(Path(folder) / PREDICTIONS_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_voter(folder: Folder) -> dict:
    return _read_json(Path(folder) / VOTER_FILE)


def write_voter(folder: Folder, voter: dict) -> None:
    _write_json(Path(folder) / VOTER_FILE, voter)


def read_eval(folder: Folder) -> dict:
    return _read_json(Path(folder) / EVAL_FILE)


def write_eval(folder: Folder, result: dict) -> None:
    _write_json(Path(folder) / EVAL_FILE, result)


def read_blessing(location: Folder) -> dict | None:
    """The gate's verdict from ``blessing.json`` or a folder holding it (None: no verdict)."""
    path = Path(location)
    path = path if path.is_file() else path / BLESSING_FILE
    return _read_json(path) if path.is_file() else None


def write_blessing(folder: Folder, blessing: dict) -> Path:
    path = Path(folder) / BLESSING_FILE
    _write_json(path, blessing)
    return path


def read_card(folder: Folder) -> dict:
    return _read_json(Path(folder) / CARD_FILE)


def write_card(folder: Folder, card: dict) -> None:
    _write_json(Path(folder) / CARD_FILE, card)


@dataclass(frozen=True)
class Seen:
    """What a model trained and validated on: content-hash ids and, where recorded,
    source groups (None for a model exported before they were recorded)."""
    ids: frozenset[str]
    sources: frozenset[str] | None = None


def write_seen_images(folder: Folder, ids: list[str], sources: list[str]) -> dict:
    """Write ``seen_images.txt`` and ``seen_sources.json``; return the card's record of
    them (the gate trusts the files only when their SHA-256 matches this record)."""
    import hashlib

    text = "".join(f"{i}\n" for i in ids)
    groups = json.dumps(sorted(sources), indent=0)
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(folder) / SEEN_FILE, text)
    atomic_write_text(Path(folder) / SEEN_SOURCES_FILE, groups)
    return {"file": SEEN_FILE, "count": len(ids),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "key": "image_id: the first 16 hex digits of the original file's SHA-256, of every "
                   "train and val image",
            "sources": {"file": SEEN_SOURCES_FILE, "count": len(sources),
                        "sha256": hashlib.sha256(groups.encode()).hexdigest(),
                        "key": "source_id: ingest's source group (path without suffix and "
                               "Roboflow's .rf.<hash>) of every train and val image"}}


class SeenRecordError(ValueError):
    """A model folder's record of what it saw is absent or does not match its card."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason   # champion_record_missing | champion_record_mismatch


def read_seen_images(folder: Folder, record: dict | None) -> Seen:
    """What a model folder saw, checked against its card's ``record`` (``data.seen_images``):
    a missing record or file raises :class:`SeenRecordError` (``champion_record_missing``),
    a file whose SHA-256 differs from the record (truncated, emptied, edited) raises it with
    ``champion_record_mismatch``. Never an empty set in place of a record."""
    import hashlib

    def checked(entry: dict, what: str) -> bytes:
        path = Path(folder) / str(entry.get("file") or "")
        if not entry.get("file") or not path.is_file():
            raise SeenRecordError("champion_record_missing", f"the champion has no {what} file "
                                  f"{entry.get('file')!r}")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.get("sha256"):
            raise SeenRecordError("champion_record_mismatch", f"{path.name} has SHA-256 "
                                  f"{digest[:16]}..., its model card records "
                                  f"{str(entry.get('sha256'))[:16]}...")
        return data

    if not record:
        raise SeenRecordError("champion_record_missing",
                              "the champion's model card records no seen images")
    ids = frozenset(line.strip() for line in checked(record, "seen-images").decode().splitlines()
                    if line.strip())
    sources = None
    if record.get("sources"):
        try:
            sources = frozenset(map(str, json.loads(checked(record["sources"], "seen-sources"))))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise SeenRecordError("champion_record_mismatch",
                                  f"seen sources unreadable ({exc})") from None
    return Seen(ids, sources)
