"""The model registry: exported ensembles by name and version, and a ``champion`` pointer.

Layout below a registry location (a local folder or ``s3://bucket/prefix``)::

    models/<name>/<version>/...        one exported model folder (model_card.json, ...)
    models/<name>/champion.json        {"version", "promoted", "metrics", "run_id"}
    models/<name>/history/<n>.json     every promotion, in order (n = 1, 2, ...): the
                                       pointer it wrote and the version it replaced

Versions are integers counted up from 1. A version is written completely before the
pointer names it, and the pointer itself is replaced in one step (``os.replace``
locally, a single PUT on S3), so a reader sees the old champion or the new one, never
a half-written one. All I/O goes through :mod:`triview.storage` (retried on S3).
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from triview import storage
from triview.artifacts import CARD_FILE

MODELS_DIR = "models"
CHAMPION_FILE = "champion.json"
HISTORY_DIR = "history"


class RegistryError(ValueError):
    """The registry cannot be read or written as asked."""


def check_location(location: str) -> str:
    if "://" in location and not storage.is_s3(location):
        raise RegistryError(f"unsupported registry location {location!r} (a folder or s3://)")
    if storage.is_s3(location):
        storage.S3Uri.parse(location)  # a bucket is required
    return location


class ModelRegistry:
    """Versions of one model name at a location, and which one is the champion."""

    def __init__(self, location: str, name: str = "triview"):
        if not name or "/" in name:
            raise RegistryError(f"bad model name {name!r}")
        self.location, self.name = check_location(location), name
        self.base = storage.join(location, MODELS_DIR, name)

    def versions(self) -> list[int]:
        return sorted(int(n) for n in storage.children(self.base) if n.isdigit())

    def champion(self) -> dict | None:
        """The champion pointer, or None when no model has been promoted yet."""
        data = storage.read_bytes_or_none(storage.join(self.base, CHAMPION_FILE))
        return json.loads(data) if data else None

    def uri(self, version: int | str) -> str:
        return storage.join(self.base, str(version))

    def fetch(self, version: int | str, dest: str | Path | None = None) -> Path:
        """A local folder with the files of ``version`` (downloaded when remote)."""
        try:
            return storage.local_tree(self.uri(version), dest)
        except storage.StorageError as exc:
            raise RegistryError(str(exc)) from exc

    def publish(self, model_dir: str | Path) -> int:
        """Copy an exported model folder into the next free version; return the version."""
        for _ in range(100):
            version = (self.versions() or [0])[-1] + 1
            if storage.reserve(self.uri(version)):
                storage.copy_tree(model_dir, self.uri(version))
                return version
        raise RegistryError(f"could not reserve a version below {self.base}")

    def promote(self, version: int, metrics: dict | None = None, run_id: str | None = None) -> dict:
        """Point ``champion`` at ``version`` (one atomic replace of the pointer)."""
        if version not in self.versions():
            raise RegistryError(f"version {version} of {self.name!r} is not in the registry")
        previous = self.champion()
        pointer = {"name": self.name, "version": int(version), "uri": self.uri(version),
                   "promoted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "metrics": metrics or {}, "run_id": run_id}
        storage.atomic_write_bytes(storage.join(self.base, CHAMPION_FILE),
                                   json.dumps(pointer, indent=2).encode())
        # the promotion log (one writer promotes at a time: the pipeline's export task)
        entry = {**pointer, "replaced": None if previous is None else int(previous["version"])}
        number = len(self.history()) + 1
        storage.atomic_write_bytes(storage.join(self.base, HISTORY_DIR, f"{number}.json"),
                                   json.dumps(entry, indent=2).encode())
        return pointer

    def history(self) -> list[dict]:
        """Every promotion so far, oldest first (each: the champion pointer it wrote and
        ``replaced``, the version it replaced)."""
        folder = storage.join(self.base, HISTORY_DIR)
        numbers = sorted(int(n.removesuffix(".json")) for n in storage.children(folder)
                         if n.removesuffix(".json").isdigit())
        return [json.loads(storage.read_bytes(storage.join(folder, f"{n}.json"))) for n in numbers]


def resolve_model(location: str, dest: str | Path | None = None) -> Path:
    """A local folder with an exported model from ``location``.

    ``location`` is an exported model folder (has ``model_card.json``), a registry
    model folder (``.../models/<name>``: its champion) or a version in it
    (``.../models/<name>/<version>``), locally or on ``s3://``, or the ``--out`` folder
    of a ``triview run`` (its ``run_summary.json`` names the model).
    """
    from triview.summary import model_of_run

    location = check_location(location.rstrip("/"))
    location = model_of_run(location) or location
    if storage.read_bytes_or_none(storage.join(location, CARD_FILE)) is not None:
        return storage.local_tree(location, dest)
    pointer = storage.read_bytes_or_none(storage.join(location, CHAMPION_FILE))
    if pointer is None:
        raise RegistryError(f"{location!r} is neither an exported model (no {CARD_FILE}), "
                            f"a registry model folder with a {CHAMPION_FILE}, nor a "
                            f"`triview run --out` folder (no run_summary.json)")
    version = json.loads(pointer)["version"]
    if storage.read_bytes_or_none(storage.join(location, str(version), CARD_FILE)) is None:
        raise RegistryError(f"champion version {version} of {location!r} has no {CARD_FILE}")
    return storage.local_tree(storage.join(location, str(version)), dest)


# ----------------------------------------------------------------------------- versions
# Model specs with a version, for `triview serve` and `triview deploy`.


def split_version(spec: str) -> tuple[str, str | None]:
    """``"LOCATION@champion"`` -> ``("LOCATION", "champion")``; no ``@`` -> version None."""
    if "://" not in spec and Path(spec).exists():  # a folder whose name has an '@'
        return spec.rstrip("/"), None
    location, sep, version = spec.rstrip("/").rpartition("@")
    if not sep or "/" in version:
        return spec.rstrip("/"), None
    if version != "champion" and not version.isdigit():
        raise RegistryError(f"bad version {version!r} in {spec!r}: '@champion' or '@<number>'")
    return location.rstrip("/"), version


def registry_for(location: str) -> ModelRegistry:
    """The registry model a location names: ``REGISTRY/models/<name>`` (the registry's own
    layout, as ``triview predict`` takes it) or ``REGISTRY/<name>``."""
    parent, _, name = location.rstrip("/").rpartition("/")
    if not parent or not name:
        raise RegistryError(f"{location!r} names no model: use REGISTRY/<name> or "
                            f"REGISTRY/{MODELS_DIR}/<name>")
    root, _, last = parent.rpartition("/")
    if last == MODELS_DIR and root:
        parent = root
    return ModelRegistry(parent, name)


def registry_version(spec: str) -> tuple[ModelRegistry, int]:
    """The registry and version ``REGISTRY/<name>@champion`` or ``@<version>`` points at."""
    location, version = split_version(spec)
    if version is None:
        raise RegistryError(f"{spec!r} has no '@champion' or '@<version>'")
    registry = registry_for(location)
    if version == "champion":
        pointer = registry.champion()
        if pointer is None:
            raise RegistryError(f"{registry.base} has no champion yet")
        return registry, int(pointer["version"])
    if int(version) not in registry.versions():
        raise RegistryError(f"version {version} of {registry.name!r} is not in "
                            f"{registry.base}")
    return registry, int(version)


def resolve_model_spec(spec: str, dest: str | Path | None = None) -> tuple[Path, str | None]:
    """A local folder with the model ``spec`` names, and its registry model name (or None).

    ``spec`` is what :func:`resolve_model` takes, or a registry model with a version:
    ``REGISTRY/<name>@champion``, ``REGISTRY/<name>@<version>`` (also with
    ``REGISTRY/models/<name>``).
    """
    location, version = split_version(spec)
    if version is not None:
        registry, number = registry_version(spec)
        return registry.fetch(number, dest), registry.name
    parts = location.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == MODELS_DIR:
        name = parts[-1]                       # .../models/<name>: its champion
    elif len(parts) >= 3 and parts[-3] == MODELS_DIR and parts[-1].isdigit():
        name = parts[-2]                       # .../models/<name>/<version>
    else:
        name = None
    return resolve_model(location, dest), name


def registry_of_spec(spec: str) -> tuple[ModelRegistry, int] | None:
    """The registry model a model spec comes from and the version it resolves to, or None
    when it names an exported folder outside a registry (what ``triview serve`` offers
    the other versions of)."""
    location, version = split_version(spec)
    if version is not None:
        return registry_version(spec)
    parts = location.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == MODELS_DIR:          # .../models/<name>: its champion
        registry = registry_for(location)
        pointer = registry.champion()
        return (registry, int(pointer["version"])) if pointer else None
    if len(parts) >= 3 and parts[-3] == MODELS_DIR and parts[-1].isdigit():
        return registry_for("/".join(parts[:-1])), int(parts[-1])   # .../models/<name>/<N>
    return None
