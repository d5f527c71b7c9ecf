"""Frozen features kept across trainings: what a branch's head sees for one crop through one
frozen network, addressed by the content of both, so any training that meets the same
network and the same crop again (another trial of a search, a fold model, the branch's own
validation and test predictions) reads it instead of running the backbone again.

The key of a network is a digest of every tensor of its state except the head's, its input
normalisation, memory format, device type, torch's version and :data:`FEATURE_VERSION`
(raised when the feature code changes); the key of a crop is a digest of its pixels.
Weights, crops, image size, normalisation and library therefore all take part, and nothing
that changes the features can hit a stale entry. A shard that cannot be read or is damaged
is skipped (its crops are computed again), and a store that fails (a storage error on
listing or writing) is turned off for the rest of the process with one warning: the run
never fails because of its cache. Entries live under ``root/<network>/`` as
``.npz`` shards (crop digests and float32 features), each written atomically (a local
rename or one S3 PUT), so several processes may fill one store. ``root`` is a folder or an
``s3://`` prefix: a tuning study keeps its store in a folder, the pipeline's ``cache_root``
keeps one across scheduled runs (``<cache_root>/features``).
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from triview import storage
from triview.train.shardimages import take

log = logging.getLogger(__name__)

#: Raise when the code that turns a crop into features changes what it computes.
FEATURE_VERSION = 1

#: Stores opened in this process, by folder: every branch of every trial of a search shares one.
_OPEN: dict[str, "FeatureStore"] = {}


def network_digest(net: nn.Module, memory_format=torch.contiguous_format) -> str:
    """A digest of ``net`` (a BranchNet) minus its head: equal digests give equal features."""
    head = f"backbone.{net.backbone.triview_head}."
    digest = hashlib.blake2b(digest_size=16)
    device = next(net.parameters()).device.type
    digest.update(f"{FEATURE_VERSION}|torch {torch.__version__}|{type(net.backbone).__module__}."
                  f"{type(net.backbone).__name__}|{net.normalize.mode}|{memory_format}|{device}".encode())
    for name, tensor in sorted(net.state_dict().items()):
        if name.startswith(head):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def crop_digests(images: torch.Tensor, transform: str = "") -> list[str]:
    """One digest per crop of a uint8 (N, 3, H, W) tensor (its shape included); with a
    ``transform`` name, of that deterministic transform of the crop (``zoom``) instead."""
    prefix = f"{transform}|" if transform else ""
    shape = (prefix + "x".join(map(str, images.shape[1:]))).encode()
    out = []
    for i in range(0, len(images), 512):  # a chunk at a time: crops in shards are read so
        flat = images[i:i + 512].contiguous().numpy().reshape(-1, int(np.prod(images.shape[1:])))
        out.extend(hashlib.blake2b(shape + row.tobytes(), digest_size=16).hexdigest() for row in flat)
    return out


def _read_shard(location: str) -> dict[str, np.ndarray] | None:
    """A shard's {crop digest: features}, or None (with a warning) when it cannot be read or
    is damaged: a member failing its CRC, keys and features that do not pair up."""
    try:
        data = storage.read_bytes_or_none(location)
        if data is None:
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            keys, feats = npz["keys"], npz["features"]
            if keys.ndim != 1 or feats.ndim != 2 or len(keys) != len(feats):
                raise ValueError(f"keys {keys.shape} and features {feats.shape} do not pair up")
            return dict(zip(keys.tolist(), feats))
    except Exception as exc:  # noqa: BLE001  (damaged: not used; its crops are computed again)
        log.warning("feature store: skipping %s (%s)", location, exc)
        return None


class FeatureStore:
    """Content-addressed frozen features under ``root`` (see the module docstring).
    ``threads``: intra-op threads for computing missing features (None: as set)."""

    def __init__(self, root: str | Path, threads: int | None = None) -> None:
        self.root = str(root)
        self.threads = threads
        self._tables: dict[str, dict[str, np.ndarray]] = {}
        self.computed = 0  # crops whose features this process computed ...
        self.reused = 0    # ... and read from the store
        self.off = False   # set by the first storage error: the store is not used again

    def _give_up(self, what: str, where: str, exc: Exception) -> None:
        self.off = True
        log.warning("feature store: cannot %s %s (%s); the store is off for the rest of this "
                    "process, features are computed", what, where, exc)

    @classmethod
    def open(cls, root: str | Path, threads: int | None = None) -> "FeatureStore":
        """The store of ``root``, shared by every caller in this process (``threads``, when
        given, becomes its setting)."""
        key = str(root) if storage.is_s3(root) else str(Path(root).resolve())
        if key not in _OPEN:
            _OPEN[key] = cls(key)
        if threads is not None:
            _OPEN[key].threads = threads
        return _OPEN[key]

    def _table(self, net_key: str) -> dict[str, np.ndarray]:
        table = self._tables.get(net_key)
        if table is None:
            table = {}
            folder = storage.join(self.root, net_key)
            names = []
            if not self.off:
                try:
                    names = storage.children(folder)
                except Exception as exc:  # noqa: BLE001  (the run never fails because of its cache)
                    self._give_up("list", folder, exc)
            for name in names:
                if name.startswith(".") or not name.endswith(".npz"):  # one still being written
                    continue
                shard = _read_shard(storage.join(folder, name))
                if shard is not None:
                    table.update(shard)
            self._tables[net_key] = table
        return table

    def holds(self, net: nn.Module, memory_format=torch.contiguous_format) -> bool:
        """Whether the store has features of ``net`` (of any crop)."""
        return bool(self._table(network_digest(net, memory_format)))

    def features(self, net: nn.Module, images: torch.Tensor, compute,
                 memory_format=torch.contiguous_format, transform: str = "") -> torch.Tensor:
        """The head inputs of ``images`` through ``net``: stored ones are read, the rest
        are computed by ``compute(net, images)`` (only for the crops missing) and stored.
        ``transform``: the name of the deterministic float transform ``compute`` applies to
        each crop first (a test-time pass such as ``zoom``); it is part of every key."""
        net_key = network_digest(net, memory_format)
        keys = crop_digests(images, transform)
        table = self._table(net_key)
        missing = sorted({k: i for i, k in enumerate(keys) if k not in table}.values())
        if missing:
            fresh = compute(net, take(images, torch.tensor(missing))).float().cpu().numpy()
            new_keys = np.array([keys[i] for i in missing])
            name = hashlib.blake2b("".join(new_keys).encode(), digest_size=12).hexdigest()
            buf = io.BytesIO()
            np.savez(buf, keys=new_keys, features=fresh)
            where = storage.join(self.root, net_key, f"{name}.npz")
            if not self.off:
                try:
                    storage.atomic_write_bytes(where, buf.getvalue())
                except Exception as exc:  # noqa: BLE001  (kept in this process; the run goes on)
                    self._give_up("write", where, exc)
            table.update(zip(new_keys.tolist(), fresh))
        self.computed += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.from_numpy(np.stack([table[k] for k in keys]))
