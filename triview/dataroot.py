"""Data-root confinement: where a path written inside the input may lead.

A CSV/Parquet table names its images by path. Those paths resolve only inside the
data root (the table's folder, or the ``s3://bucket/prefix/`` the table object sits
in) or inside a root the operator allowed explicitly (``allowed_roots``). Anything
else is ``outside_root``: absolute paths elsewhere, ``..`` that climbs out, ``~``,
URL-encoded ``%2e%2e``, Windows ``..\\``, ``file://`` and other URLs, other buckets or
prefixes, and symbolic links that lead out.

The decision is made from the text and from symbolic links *inside* the roots only
(plus the folders above a root, which the operator named): a path outside is never
opened, stat-ed or listed, so the answer is the same whether or not it exists.
"""
from __future__ import annotations

import os
import posixpath
import re
import stat
from collections import deque
from dataclasses import dataclass
from typing import Iterable, NamedTuple
from urllib.parse import unquote

from triview import storage

OUTSIDE_ROOT = "outside_root"
READ_ERROR = "read_error"
# scheme:/ (file:/x, file:///x, http://...); two letters at least: C:/ is a drive
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_LINKS = 40   # as the kernel's ELOOP limit


class Placement(NamedTuple):
    """Where one path of the input leads: a locator to read, or a reason not to."""
    locator: tuple = ()            # ("file", real path) | ("s3", uri)
    reason: str | None = None      # outside_root | missing_file | broken_symlink | read_error
    detail: str = ""


def split_root_list(roots: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``("a", "b", "c")`` (empty parts dropped)."""
    if roots is None:
        return ()
    if isinstance(roots, str):
        roots = [roots]
    return tuple(part.strip() for spec in roots for part in str(spec).split(",") if part.strip())


def _ancestors(path: str) -> set[str]:
    out = set()
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return out
        out.add(parent)
        path = parent


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class DataRoots:
    """The roots paths may resolve into, and where relative paths start.

    Build with :meth:`for_folder` or :meth:`for_s3_prefix`; ``allowed`` are further
    roots (local folders or ``s3://bucket/prefix``) the operator allowed.
    """
    base: tuple                          # ("file", real folder) | ("s3", bucket, prefix)
    folders: tuple[str, ...]             # real paths of the local roots
    walkable: frozenset[str]             # folders above a local root (as given and real)
    prefixes: tuple[tuple[str, str], ...]  # (bucket, prefix ending in "/" or "") of s3 roots

    @classmethod
    def for_folder(cls, folder: str | os.PathLike, allowed: Iterable[str] = ()) -> "DataRoots":
        given = os.path.abspath(folder)
        return cls._build(("file", os.path.realpath(given)), [given], allowed)

    @classmethod
    def for_s3_prefix(cls, uri: str, allowed: Iterable[str] = ()) -> "DataRoots":
        bucket, prefix = _s3_root(uri)
        return cls._build(("s3", bucket, prefix), [], [uri, *allowed])

    @classmethod
    def _build(cls, base: tuple, folders: list[str], allowed: Iterable[str]) -> "DataRoots":
        prefixes = []
        for root in allowed:
            if storage.is_s3(root):
                prefixes.append(_s3_root(root))
            else:
                folders.append(os.path.abspath(root))
        real = tuple(dict.fromkeys(os.path.realpath(f) for f in folders))
        walkable = frozenset(a for f in [*folders, *real] for a in _ancestors(f))
        return cls(base, real, walkable, tuple(dict.fromkeys(prefixes)))

    # -------------------------------------------------------------------------- entries

    def place(self, text: str) -> Placement:
        """Resolve one path as written in a table row (never touching anything outside)."""
        path = text.strip().replace("\\", "/")   # a table written on Windows: ..\ is ../
        if "\0" in path:  # no file system takes it (os.lstat would raise ValueError)
            return Placement((), READ_ERROR, "the path holds a NUL byte")
        scheme = _SCHEME.match(path)
        if scheme and scheme.group(1).lower() != "s3":
            return _outside(f"{scheme.group(1).lower()}: URLs are not read; write the path "
                            f"relative to the table")
        if _DRIVE.match(path):
            return _outside("Windows drive path")
        decoded = _percent_decoded(path)
        if decoded != path and (".." in decoded.split("/") or decoded.startswith(("/", "~"))
                                or _SCHEME.match(decoded) or _DRIVE.match(decoded)):
            return _outside("URL-encoded path that would leave the data root")
        if path.startswith("~"):
            return _outside("'~' (a home folder) is not expanded")
        if scheme:
            return self._place_s3(path)
        if self.base[0] == "s3" and not path.startswith("/"):
            _, bucket, prefix = self.base
            return self._place_s3(f"s3://{bucket}/{prefix}{path}")
        if not path.startswith("/") and self.base[0] == "file":
            start, parts = self.base[1], path.split("/")
        else:
            start, parts = "/", path.split("/")
        return self._place_file(start, parts)

    def place_link(self, folder_root: str, rel: str) -> Placement:
        """Resolve ``rel`` below the local ``folder_root`` (a symlink found in a folder walk)."""
        return self._place_file(os.path.realpath(folder_root), rel.split("/"))

    def _place_s3(self, uri: str) -> Placement:
        loc = storage.S3Uri.parse(uri)
        key = loc.key
        parts = key.split("/")
        if ".." in parts or "." in parts:   # S3 keys are literal; never send '..' to a server
            key = posixpath.normpath(key)
            if key.startswith("..") or key == ".":
                return _outside("'..' leaves the bucket")
        if not any(loc.bucket == b and key.startswith(p) for b, p in self.prefixes):
            return _outside(f"s3://{loc.bucket}/ is not below the data root's bucket and prefix")
        return Placement(("s3", f"s3://{loc.bucket}/{key}"))

    def _place_file(self, start: str, parts: list[str]) -> Placement:
        """Walk ``parts`` from the real folder ``start`` as the kernel would, resolving
        symbolic links one component at a time; a component is looked at (``lstat``,
        ``readlink``) only when it lies inside a root or above one."""
        current, pending, links = start, deque(parts), 0
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":   # exact: ``current`` holds no symbolic link
                current = os.path.dirname(current)
                continue
            candidate = os.path.join(current, part)
            if not self._inside(candidate) and candidate not in self.walkable:
                return _outside("path leads outside the data root")
            try:
                mode = os.lstat(candidate).st_mode
            except (FileNotFoundError, NotADirectoryError):
                rest = os.path.normpath(os.path.join(candidate, *pending))
                if not self._inside(rest):
                    return _outside("path leads outside the data root")
                return Placement(("file", rest), "missing_file", "not found")
            except OSError as exc:  # name too long, permission denied, I/O error ...
                return _refused(exc)
            if stat.S_ISLNK(mode):
                links += 1
                if links > _MAX_LINKS:
                    return Placement((), "broken_symlink", "too many levels of symbolic links")
                try:
                    target = os.readlink(candidate)
                except OSError as exc:
                    return _refused(exc)
                if target.startswith("/"):
                    current = "/"
                pending.extendleft(reversed(target.split("/")))
                continue
            current = candidate
        if not self._inside(current):
            return _outside("path leads outside the data root")
        return Placement(("file", current))

    def _inside(self, path: str) -> bool:
        return any(_beneath(path, root) for root in self.folders)


def _outside(detail: str) -> Placement:
    return Placement((), OUTSIDE_ROOT, detail)


def _refused(exc: OSError) -> Placement:
    """A path the file system will not look up (a row's problem, never the whole ingest's)."""
    return Placement((), READ_ERROR, f"{type(exc).__name__}: {exc.strerror or exc}")


def _percent_decoded(text: str) -> str:
    """``%2e%2e`` -> ``..``, repeatedly (``%252e`` is ``%2e`` encoded once more)."""
    for _ in range(4):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def _s3_root(uri: str) -> tuple[str, str]:
    loc = storage.S3Uri.parse(uri)
    prefix = posixpath.normpath(loc.key) if loc.key else ""
    if prefix in (".", "/") or prefix.startswith(".."):
        prefix = ""
    return loc.bucket, (prefix.rstrip("/") + "/") if prefix else ""
