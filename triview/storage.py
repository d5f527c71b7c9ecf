"""Artifact I/O for local paths and ``s3://bucket/key`` URIs.

Promises: a reader never sees a half-written artifact. Locally a file is written
to a temporary name beside its target and renamed onto it; remotely an object is
one PUT, or a multipart upload that is completed only once every part is in (and
aborted otherwise). Remote calls are retried with exponential backoff on
connection errors and 5xx answers; after the last attempt a :class:`StorageError`
says what failed.

S3 settings come from the environment only (never from code or arguments):

- ``S3_ENDPOINT`` (or ``MINIO_ENDPOINT``, ``AWS_ENDPOINT_URL``): ``host:port`` or a
  URL; an ``http://`` URL turns TLS off. Default ``s3.amazonaws.com``.
- ``S3_SECURE`` (``true``/``false``) overrides the scheme; ``S3_VERIFY_TLS=false``
  skips certificate checks; ``SSL_CERT_FILE`` names a CA bundle.
- ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``, ``S3_REGION``).
- credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or
  ``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY``), else the files ``accesskey`` and
  ``secretkey`` of a mounted Kubernetes Secret in ``S3_SECRET_DIR``
  (default ``/var/run/secrets/triview-minio``).
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

if TYPE_CHECKING:
    from minio import Minio

T = TypeVar("T")

S3_SCHEME = "s3://"
DEFAULT_SECRET_DIR = "/var/run/secrets/triview-minio"
#: Objects at least this large are sent as a multipart upload of parts this size.
MULTIPART_PART_SIZE = 8 * 1024 * 1024
# S3 error codes that mean "try again" (the rest, e.g. NoSuchKey, are final).
_RETRIABLE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "RequestTimeTooSkewed", "OperationAborted"}


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # (read once: os.umask can only be read by setting it)


class StorageError(OSError):
    """A storage operation failed for good (after retries, or with a final error)."""


# ----------------------------------------------------------------------------- local


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix,
                               dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from other readers
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a local path or an ``s3://`` URI, all or nothing."""
    if is_s3(path):
        put_bytes(str(path), data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a local file or an ``s3://`` object."""
    if is_s3(path):
        return get_bytes(str(path))
    return Path(path).read_bytes()


# ----------------------------------------------------------------------------- URIs


def is_s3(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str   # object key, or a prefix ("" for the whole bucket)

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not is_s3(uri):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, key = uri[len(S3_SCHEME):].partition("/")
        if not bucket:
            raise ValueError(f"s3 URI without a bucket: {uri!r}")
        return cls(bucket, key)

    def join(self, rel: str) -> "S3Uri":
        base = self.key.rstrip("/")
        return S3Uri(self.bucket, f"{base}/{rel}" if base else rel)

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"


# ----------------------------------------------------------------------------- S3 client


@dataclass(frozen=True)
class S3Config:
    endpoint: str = "s3.amazonaws.com"
    secure: bool = True
    verify_tls: bool = True
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    attempts: int = 5            # tries per operation
    backoff_s: float = 0.2       # first retry delay; doubles each time
    max_backoff_s: float = 10.0
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "S3Config":
        env = os.environ if env is None else env
        raw = env.get("S3_ENDPOINT") or env.get("MINIO_ENDPOINT") or env.get("AWS_ENDPOINT_URL") \
            or "s3.amazonaws.com"
        secure = not raw.startswith("http://")
        endpoint = raw.split("://", 1)[-1].rstrip("/")
        if "S3_SECURE" in env:
            secure = _truthy(env["S3_SECURE"])
        access = env.get("AWS_ACCESS_KEY_ID") or env.get("MINIO_ACCESS_KEY")
        secret = env.get("AWS_SECRET_ACCESS_KEY") or env.get("MINIO_SECRET_KEY")
        if not (access and secret):
            folder = Path(env.get("S3_SECRET_DIR", DEFAULT_SECRET_DIR))
            if (folder / "accesskey").is_file() and (folder / "secretkey").is_file():
                access = (folder / "accesskey").read_text().strip()
                secret = (folder / "secretkey").read_text().strip()
        return cls(endpoint=endpoint, secure=secure,
                   verify_tls=_truthy(env.get("S3_VERIFY_TLS", "true")),
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
                   or env.get("S3_REGION") or None,
                   access_key=access, secret_key=secret,
                   session_token=env.get("AWS_SESSION_TOKEN") or None,
                   attempts=int(env.get("S3_ATTEMPTS", cls.attempts)),
                   backoff_s=float(env.get("S3_BACKOFF_S", cls.backoff_s)))

    def __repr__(self) -> str:  # never print credentials
        return (f"S3Config(endpoint={self.endpoint!r}, secure={self.secure}, "
                f"region={self.region!r}, credentials={'set' if self.access_key else 'none'})")


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def s3_client(config: S3Config | None = None) -> "Minio":
    """A MinIO client whose HTTP layer does not retry: :func:`with_retries` does."""
    import urllib3
    from minio import Minio

    config = config or S3Config.from_env()
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=config.timeout_s, read=config.timeout_s),
        maxsize=10, retries=False,
        cert_reqs="CERT_REQUIRED" if config.verify_tls else "CERT_NONE",
        ca_certs=os.environ.get("SSL_CERT_FILE") or _certifi_bundle())
    return Minio(config.endpoint, access_key=config.access_key, secret_key=config.secret_key,
                 session_token=config.session_token, secure=config.secure,
                 region=config.region, http_client=http)


def _certifi_bundle() -> str | None:
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def is_retriable(exc: BaseException) -> bool:
    """Connection trouble and 5xx answers are worth another try; 4xx answers are not."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):
        return (exc._code or 0) >= 500  # minio keeps the HTTP status there
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        return exc.code in _RETRIABLE_CODES or status >= 500
    return False


def with_retries(op: Callable[[], T], what: str, config: S3Config | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``op``; on a retriable error wait ``backoff * 2**k`` (with jitter) and retry."""
    config = config or S3Config.from_env()
    for attempt in range(1, config.attempts + 1):
        try:
            return op()
        except Exception as exc:
            if not is_retriable(exc):
                raise StorageError(f"{what}: {_describe(exc)}") from exc
            if attempt == config.attempts:
                raise StorageError(f"{what}: gave up after {attempt} attempts: "
                                   f"{_describe(exc)}") from exc
            delay = min(config.max_backoff_s, config.backoff_s * 2 ** (attempt - 1))
            sleep(delay * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__}{f' {code}' if code else ''}: {str(exc)[:300]}"


class S3Store:
    """Retried, all-or-nothing object operations on one endpoint."""

    def __init__(self, config: S3Config | None = None) -> None:
        self.config = config or S3Config.from_env()
        self.client = s3_client(self.config)

    def _retry(self, op: Callable[[], T], what: str) -> T:
        return with_retries(op, what, self.config)

    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        loc = S3Uri.parse(uri)
        # A fresh stream per attempt: a failed attempt may have consumed part of it.
        self._retry(lambda: self.client.put_object(
            loc.bucket, loc.key, io.BytesIO(data), len(data), content_type=content_type,
            part_size=MULTIPART_PART_SIZE), f"upload {uri}")

    def upload_file(self, path: str | os.PathLike, uri: str) -> None:
        loc = S3Uri.parse(uri)
        self._retry(lambda: self.client.fput_object(loc.bucket, loc.key, str(path),
                                                    part_size=MULTIPART_PART_SIZE),
                    f"upload {path} to {uri}")

    def _get(self, uri: str, what: str, **span) -> bytes:
        loc = S3Uri.parse(uri)

        def fetch() -> bytes:
            response = self.client.get_object(loc.bucket, loc.key, **span)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        return self._retry(fetch, what)

    def get_bytes(self, uri: str) -> bytes:
        return self._get(uri, f"download {uri}")

    def get_range(self, uri: str, offset: int, length: int) -> bytes:
        """``length`` bytes of an object from ``offset`` (one ranged GET)."""
        return self._get(uri, f"download bytes {offset}+{length} of {uri}", offset=offset, length=length)

    def download_file(self, uri: str, path: str | os.PathLike) -> None:
        """Download to a local path atomically (a temp file renamed on success)."""
        data = self.get_bytes(uri)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)

    def exists(self, uri: str) -> bool:
        from minio.error import S3Error

        loc = S3Uri.parse(uri)

        def stat() -> bool:
            try:
                self.client.stat_object(loc.bucket, loc.key)
                return True
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"):
                    return False
                raise
        return self._retry(stat, f"stat {uri}")

    def list(self, uri: str) -> list[tuple[str, int]]:
        """``(key, size)`` of every object below a prefix, sorted by key."""
        loc = S3Uri.parse(uri)
        prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"

        def listing() -> list[tuple[str, int]]:
            return sorted((o.object_name, int(o.size or 0)) for o in self.client.list_objects(
                loc.bucket, prefix=prefix, recursive=True) if not o.is_dir)
        return self._retry(listing, f"list {uri}")

    def get_bytes_or_none(self, uri: str) -> bytes | None:
        """The object's bytes, or None when there is no such object (or bucket)."""
        from minio.error import S3Error

        try:
            return self.get_bytes(uri)
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, S3Error) and cause.code in ("NoSuchKey", "NoSuchBucket"):
                return None
            raise

    def children(self, uri: str) -> list[str]:
        """Names of the objects and "folders" directly below a prefix, sorted."""
        loc = S3Uri.parse(uri)
        prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"

        def listing() -> list[str]:
            names = {o.object_name[len(prefix):].strip("/").split("/")[0]
                     for o in self.client.list_objects(loc.bucket, prefix=prefix)}
            return sorted(n for n in names if n)
        return self._retry(listing, f"list {uri}")

    def download_tree(self, uri: str, folder: str | os.PathLike) -> int:
        """Download every object below the prefix ``uri`` into ``folder`` (each file
        atomically); returns how many."""
        loc = S3Uri.parse(uri)
        prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
        count = 0
        for key, _ in self.list(uri):
            rel = key[len(prefix):]
            if rel:
                self.download_file(f"{S3_SCHEME}{loc.bucket}/{key}", Path(folder) / rel)
                count += 1
        return count

    def upload_tree(self, folder: str | os.PathLike, uri: str, last: tuple[str, ...] = ()) -> int:
        """Upload every file below ``folder`` under the prefix ``uri``; the files named in
        ``last`` (relative paths, e.g. the manifest) go up after all the others, so a
        reader that waits for them finds everything they list."""
        folder = Path(folder)
        base = S3Uri.parse(uri)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        rels = [p.relative_to(folder).as_posix() for p in files]
        order = [r for r in rels if r not in last] + [r for r in last if r in rels]
        for rel in order:
            self.upload_file(folder / rel, str(base.join(rel)))
        return len(order)


_STORES: dict[S3Config, S3Store] = {}


def default_store() -> S3Store:
    """The store for the current environment (one client per configuration and process)."""
    config = S3Config.from_env()
    if config not in _STORES:
        _STORES[config] = S3Store(config)
    return _STORES[config]


def put_bytes(uri: str, data: bytes) -> None:
    default_store().put_bytes(uri, data)


def get_bytes(uri: str) -> bytes:
    return default_store().get_bytes(uri)


# ----------------------------------------------------------------------------- locations
# A location is a local path or an s3:// URI; these are the operations the model registry,
# checkpoints and artifacts share, retried on S3 as above.


def join(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...`` for a local folder or an ``s3://`` prefix."""
    return "/".join([str(root).rstrip("/")] + [p.strip("/") for p in parts if p])


def exists(location: str | os.PathLike) -> bool:
    if is_s3(location):
        return default_store().exists(str(location))
    return Path(location).is_file()


def read_bytes_or_none(location: str | os.PathLike) -> bytes | None:
    """The bytes of a file or object, or None when it does not exist."""
    if is_s3(location):
        return default_store().get_bytes_or_none(str(location))
    path = Path(location)
    return path.read_bytes() if path.is_file() else None


def children(location: str | os.PathLike) -> list[str]:
    """Names directly below a folder or prefix, sorted ([] when there is none)."""
    if is_s3(location):
        return default_store().children(str(location))
    path = Path(location)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def reserve(location: str | os.PathLike) -> bool:
    """Claim a new folder/prefix: False when it exists already (another writer has it).
    Locally an exclusive ``mkdir``; S3 has no exclusive create, so a marker object claims
    an empty prefix (best effort)."""
    if is_s3(location):
        if children(location):
            return False
        put_bytes(join(location, ".reserved"), b"")
        return True
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(location)
    except FileExistsError:
        return False
    return True


def copy_tree(folder: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy every file below a local ``folder`` to ``location`` (a folder or a prefix)."""
    if is_s3(location):
        default_store().upload_tree(folder, str(location))
        return
    import shutil

    shutil.copytree(folder, location, dirs_exist_ok=True)


def local_tree(location: str | os.PathLike, scratch: str | os.PathLike | None = None) -> Path:
    """A local folder with the files of ``location``: the folder itself, or a download of
    the prefix into ``scratch`` (a new temporary folder when not given)."""
    if not is_s3(location):
        path = Path(location)
        if not path.is_dir():
            raise StorageError(f"{path} is not a folder")
        return path
    dest = Path(scratch or tempfile.mkdtemp(prefix="triview-"))
    if default_store().download_tree(str(location), dest) == 0:
        raise StorageError(f"{location} holds no files")
    return dest
