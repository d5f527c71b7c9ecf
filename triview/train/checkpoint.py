"""Checkpoints on the storage layer: ``last.pt`` (model, optimiser, scheduler, scaler, RNG
states, history) and ``best.pt`` (the best weights so far) in a local folder or an
``s3://`` prefix, each written in one atomic step (temp file + rename, or one PUT)."""
from __future__ import annotations

import io
import warnings

import torch

from triview import storage
from triview.artifacts import CHECKPOINT_BEST, CHECKPOINT_LAST


def save_state(obj, location: str) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    storage.atomic_write_bytes(location, buffer.getvalue())


def load_state(location: str):
    return torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu",
                      weights_only=True)


def save_best(state: dict, folder: str) -> None:
    save_state(state, storage.join(folder, CHECKPOINT_BEST))


def load_best(folder: str) -> dict:
    return load_state(storage.join(folder, CHECKPOINT_BEST))


def save_last(state: dict, folder: str) -> None:
    """Write ``last.pt``; call it after :func:`save_best`, so that a ``last.pt`` on disk
    always has its ``best.pt`` beside it."""
    save_state(state, storage.join(folder, CHECKPOINT_LAST))


def load_checkpoint(folder: str, key: str | None = None) -> dict | None:
    """The last checkpoint in ``folder`` (a local folder or an s3:// prefix), or None when
    there is none (or it belongs to a different configuration, with a warning)."""
    path = storage.join(folder, CHECKPOINT_LAST)
    if not storage.exists(path):
        return None
    state = load_state(path)
    if key is not None and state.get("key") != key:
        warnings.warn(f"checkpoint {path} was written by a different configuration; "
                      "training starts from scratch", RuntimeWarning, stacklevel=2)
        return None
    return state
