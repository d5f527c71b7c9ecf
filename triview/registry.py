"""The model registry: exported ensembles by name and version, and a ``champion`` pointer.

Layout below a registry location (a local folder or ``s3://bucket/prefix``)::

    models/<name>/<version>/...        one exported model folder (model_card.json, ...)
    models/<name>/champion.json        {"version", "promoted", "metrics", "run_id"}

Versions are integers counted up from 1. A version is written completely before the
pointer names it, and the pointer itself is replaced in one step (``os.replace``
locally, a single PUT on S3), so a reader sees the old champion or the new one, never
a half-written one.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from triview.storage import atomic_write_bytes

MODELS_DIR = "models"
CHAMPION_FILE = "champion.json"


class RegistryError(ValueError):
    """The registry cannot be read or written as asked."""


class ObjectStore(Protocol):
    """The few operations the registry needs from a backend; keys are '/'-separated."""

    def uri(self, key: str) -> str: ...
    def read_bytes(self, key: str) -> bytes | None: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def children(self, prefix: str) -> list[str]: ...
    def upload_dir(self, local: Path, prefix: str) -> None: ...
    def download_dir(self, prefix: str, local: Path) -> Path: ...
    def reserve(self, prefix: str) -> bool: ...


class LocalStore:
    """A registry in a local (or mounted) folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def uri(self, key: str) -> str:
        return str(self.root / key)

    def read_bytes(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.root / key, data)  # temp file + os.replace

    def children(self, prefix: str) -> list[str]:
        path = self.root / prefix
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def reserve(self, prefix: str) -> bool:
        """Create ``prefix`` as a new folder; False when it exists (another writer has it)."""
        (self.root / prefix).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.root / prefix)
        except FileExistsError:
            return False
        return True

    def upload_dir(self, local: Path, prefix: str) -> None:
        shutil.copytree(local, self.root / prefix, dirs_exist_ok=True)

    def download_dir(self, prefix: str, local: Path) -> Path:
        path = self.root / prefix
        if not path.is_dir():
            raise RegistryError(f"{path} does not exist")
        return path  # already local: no copy


class S3Store:
    """A registry in an S3 bucket (MinIO or AWS) through the ``minio`` client.

    Endpoint, TLS, region and credentials come from the environment as
    :mod:`triview.storage` reads them (``S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` or the mounted MinIO Secret).
    """

    def __init__(self, bucket: str, prefix: str = "", client=None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client or _minio_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_bytes(self, key: str) -> bytes | None:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                return None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def write_bytes(self, key: str, data: bytes) -> None:
        import io

        # one PUT: S3 makes the object visible whole or not at all
        self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))

    def children(self, prefix: str) -> list[str]:
        base = self._key(prefix).rstrip("/") + "/"
        names = {o.object_name[len(base):].strip("/").split("/")[0]
                 for o in self.client.list_objects(self.bucket, prefix=base)}
        return sorted(n for n in names if n)

    def reserve(self, prefix: str) -> bool:
        # S3 has no exclusive create; a marker claims the version (best effort)
        marker = f"{prefix}/.reserved"
        if self.children(prefix):
            return False
        self.write_bytes(marker, b"")
        return True

    def upload_dir(self, local: Path, prefix: str) -> None:
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            self.client.fput_object(self.bucket, self._key(f"{prefix}/{rel}"), str(path))

    def download_dir(self, prefix: str, local: Path) -> Path:
        base = self._key(prefix).rstrip("/") + "/"
        found = False
        for obj in self.client.list_objects(self.bucket, prefix=base, recursive=True):
            rel = obj.object_name[len(base):]
            if not rel or rel.endswith("/"):
                continue
            found = True
            self.client.fget_object(self.bucket, obj.object_name, str(Path(local) / rel))
        if not found:
            raise RegistryError(f"{self.uri(prefix)} holds no files")
        return Path(local)


def _minio_client():
    # the project's one S3 configuration (endpoint, TLS, region, credentials from the
    # environment or the mounted MinIO Secret), as ingest and the artifact store use it
    from triview.storage import s3_client

    return s3_client()


def open_store(location: str) -> ObjectStore:
    """A store for ``location``: ``s3://bucket[/prefix]`` or a local folder."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        if not bucket:
            raise RegistryError(f"no bucket in {location!r}")
        return S3Store(bucket, prefix)
    if "://" in location:
        raise RegistryError(f"unsupported registry location {location!r} (a folder or s3://)")
    return LocalStore(location)


class ModelRegistry:
    """Versions of one model name in a store, and which one is the champion."""

    def __init__(self, location: str, name: str = "triview", store: ObjectStore | None = None):
        if not name or "/" in name:
            raise RegistryError(f"bad model name {name!r}")
        self.location, self.name = location, name
        self.store = store or open_store(location)
        self.base = f"{MODELS_DIR}/{name}"

    def versions(self) -> list[int]:
        return sorted(int(n) for n in self.store.children(self.base) if n.isdigit())

    def champion(self) -> dict | None:
        """The champion pointer, or None when no model has been promoted yet."""
        data = self.store.read_bytes(f"{self.base}/{CHAMPION_FILE}")
        return json.loads(data) if data else None

    def fetch(self, version: int | str, dest: str | Path | None = None) -> Path:
        """A local folder with the files of ``version`` (downloaded when the store is remote)."""
        dest = Path(dest) if dest else Path(tempfile.mkdtemp(prefix=f"triview-{self.name}-v{version}-"))
        return self.store.download_dir(f"{self.base}/{version}", dest)

    def publish(self, model_dir: str | Path) -> int:
        """Copy an exported model folder into the next free version; return the version."""
        for _ in range(100):
            version = (self.versions() or [0])[-1] + 1
            if self.store.reserve(f"{self.base}/{version}"):
                self.store.upload_dir(Path(model_dir), f"{self.base}/{version}")
                return version
        raise RegistryError(f"could not reserve a version below {self.store.uri(self.base)}")

    def promote(self, version: int, metrics: dict | None = None, run_id: str | None = None) -> dict:
        """Point ``champion`` at ``version`` (one atomic replace of the pointer)."""
        if version not in self.versions():
            raise RegistryError(f"version {version} of {self.name!r} is not in the registry")
        pointer = {"name": self.name, "version": int(version),
                   "uri": self.store.uri(f"{self.base}/{version}"),
                   "promoted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "metrics": metrics or {}, "run_id": run_id}
        self.store.write_bytes(f"{self.base}/{CHAMPION_FILE}",
                               json.dumps(pointer, indent=2).encode())
        return pointer


def resolve_model(location: str, dest: str | Path | None = None) -> Path:
    """A local folder with an exported model from ``location``.

    ``location`` is an exported model folder (has ``model_card.json``), a registry
    model folder (``.../models/<name>``: its champion) or a version in it
    (``.../models/<name>/<version>``), locally or on ``s3://``.
    """
    from triview.export import CARD_FILE

    location = location.rstrip("/")
    store = open_store(location)
    if store.read_bytes(CARD_FILE) is not None:
        if isinstance(store, LocalStore):
            return store.root
        return store.download_dir("", Path(dest or tempfile.mkdtemp(prefix="triview-model-")))
    pointer = store.read_bytes(CHAMPION_FILE)
    if pointer is None:
        raise RegistryError(f"{location!r} is neither an exported model (no {CARD_FILE}) "
                            f"nor a registry model folder with a {CHAMPION_FILE}")
    version = json.loads(pointer)["version"]
    if store.read_bytes(f"{version}/{CARD_FILE}") is None:
        raise RegistryError(f"champion version {version} of {location!r} has no {CARD_FILE}")
    if isinstance(store, LocalStore):
        return store.root / str(version)
    return store.download_dir(str(version), Path(dest or tempfile.mkdtemp(prefix="triview-model-")))
