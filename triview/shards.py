"""Data contract: crop shards (WebDataset tar files with an index).

calibrate-and-crop and augment write their crops into a few large tar files per view
instead of one file per crop, so that an artifact holds about N / (samples per shard)
objects however many photos it has (on a cluster, each file is one MinIO object that
KFP's launcher uploads and the next task downloads).

The format is WebDataset's: a plain POSIX (ustar) tar whose members are named
``<key>.<extension>``; here one member per crop, ``<image_id>.png`` (augmented copies
``<image_id>_<copy>.png``), in the order they were written. Any tar tool, ``webdataset``
or ``torchdata`` reads a shard sequentially, from a folder or straight from S3.

A folder with shards also holds :data:`INDEX_FILE`::

    {"format": "webdataset", "version": 1,
     "shards": {"crops/whole/000000.tar": {"samples": 380, "bytes": 12288000,
                                          "members": {"<key>.png": [offset, size], ...}},
                ...}}

so that one crop is read with one seek (random access for the stages that need it). A
table row points at a crop as ``<shard path>#<member name>`` (:func:`member_ref`); a row
without ``#`` names a plain file in the folder (folders written by hand, older runs).

Guarantees: a shard and the index are written atomically (a temporary file renamed into
place); a shard closes before it passes :data:`SHARD_BYTES`; a reference that names a
shard outside its folder, a shard missing from the index or a member missing from its
shard is an error, never a read of another file.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from array import array
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from triview.storage import atomic_path, atomic_write_text

INDEX_FILE = "shards.json"
FORMAT = "webdataset"
VERSION = 1
SHARD_BYTES = 256 * 1024 * 1024  # a shard closes before it would pass this size
SEPARATOR = "#"
_BLOCK = 512
_BUFFER = 1 << 20  # a shard is written in writes of about this size, not one per member
_ZEROS = bytes(_BLOCK)
_JOIN_BELOW = 16 * 1024


def _closed_size(offset: int, size: int) -> int:
    """The size a shard at ``offset`` would have once closed with one more member of
    ``size`` bytes: a header block, the data padded to blocks, two end blocks, all padded
    to tar's record size."""
    end = offset + _BLOCK + -(-size // _BLOCK) * _BLOCK + 2 * _BLOCK
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def member_ref(shard: str, member: str) -> str:
    """The table's reference to ``member`` of ``shard`` (a path relative to the folder)."""
    return f"{shard}{SEPARATOR}{member}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """(shard path, member name) of a reference; (path, None) for a plain file."""
    if SEPARATOR in ref:
        shard, member = ref.split(SEPARATOR, 1)
        return shard, member
    return ref, None


def _safe_relative(rel: str, what: str) -> PurePosixPath:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel:
        raise ValueError(f"{what} {rel!r} is not a relative path inside its folder")
    return path


def _tarfile_header(member: str, size: int) -> bytes:
    info = tarfile.TarInfo(member)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = _tarfile_header("x", 0)  # the fields every member shares, as this tarfile writes them
_MODE_TO_SIZE, _MTIME, _TYPE_TO_END = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]
_TEMPLATE_SUM = sum(_MODE_TO_SIZE) + sum(_MTIME) + 8 * ord(" ") + sum(_TYPE_TO_END)


def _header(member: str, size: int) -> bytes:
    """The ustar header block tarfile writes for a regular file ``member`` of ``size``
    bytes (mode 0644, owner 0, mtime 0): tarfile's own block with the name, the size and
    the checksum put in. tarfile's path copies and re-parses a TarInfo per member, which
    costs more than the crop it stores."""
    name = member.encode("utf-8", "surrogateescape")
    if len(name) > 100 or size >= 8 ** 11:
        return _tarfile_header(member, size)
    digits = b"%011o\0" % size
    checksum = b"%06o\0 " % (_TEMPLATE_SUM + sum(name) + sum(digits))  # the sum with its field blank
    return b"".join((name.ljust(100, b"\0"), _MODE_TO_SIZE, digits, _MTIME, checksum, _TYPE_TO_END))


class TarAppender:
    """Write a ustar tar (WebDataset's shard format) member by member to a binary file:
    the bytes ``tarfile`` writes for the same members, without keeping a TarInfo per
    member. :meth:`add` returns the offset of the member's data."""

    def __init__(self, file) -> None:
        self.file, self.offset = file, 0

    def add(self, member: str, data: bytes | memoryview) -> int:
        size = len(data)
        header, pad = _header(member, size), -size % _BLOCK
        if size < _JOIN_BELOW:  # small: one write (the call costs more than the copy)
            self.file.write(b"".join((header, data, _ZEROS[:pad])))
        else:  # large: written as it is, not copied into a joined block first
            self.file.write(header)
            self.file.write(data)
            self.file.write(_ZEROS[:pad])
        start = self.offset + len(header)
        self.offset = start + size + pad
        return start

    def close(self) -> None:
        """The two end blocks, padded to tar's record size (as ``tarfile`` ends a file)."""
        if self.file.closed:
            return
        end = self.offset + 2 * _BLOCK
        self.file.write(b"\0" * (-(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE - self.offset))
        self.file.close()


class Members(Mapping):
    """One shard's members as the index has them (name -> [offset, size]), in writing
    order, held compactly while a shard is written: the names and one array of offsets and
    sizes (a dict of lists would cost about ten times as much per crop)."""

    __slots__ = ("names", "spans", "_position")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.spans = array("q")
        self._position: dict[str, int] | None = None

    def append(self, name: str, offset: int, size: int) -> None:
        self.names.append(name)
        self.spans.extend((offset, size))
        self._position = None

    def __getitem__(self, name: str) -> list[int]:
        if self._position is None:
            self._position = {n: i for i, n in enumerate(self.names)}
        i = self._position[name]
        return [self.spans[2 * i], self.spans[2 * i + 1]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def items(self):
        for i, name in enumerate(self.names):
            yield name, [self.spans[2 * i], self.spans[2 * i + 1]]


class ShardWriter:
    """Append members to ``<folder>/<prefix>/NNNNNN.tar``, starting a new shard before one
    would pass ``max_bytes``. :meth:`add` returns the member's reference; :meth:`close`
    finishes the open shard and returns the index entries of every shard written."""

    def __init__(self, folder: str | os.PathLike, prefix: str, max_bytes: int = SHARD_BYTES) -> None:
        _safe_relative(prefix, "shard prefix")
        self.folder, self.prefix, self.max_bytes = Path(folder), prefix.strip("/"), max_bytes
        self.entries: dict[str, dict] = {}
        self._seen: set[str] = set()
        self._tar: TarAppender | None = None
        self._ctx = None
        self._name = ""
        self._count = 0

    def _open(self) -> None:
        self._name = f"{self.prefix}/{self._count:06d}.tar"
        self._count += 1
        self._ctx = atomic_path(self.folder / self._name)
        tmp = self._ctx.__enter__()
        self._tar = TarAppender(open(tmp, "wb", buffering=_BUFFER))
        self._entry = self.entries[self._name] = {"samples": 0, "bytes": 0, "members": Members()}

    def _finish(self, error: BaseException | None = None) -> None:
        if self._tar is None:
            return
        tar, ctx, self._tar, self._ctx = self._tar, self._ctx, None, None
        tar.close()
        if error is None:
            ctx.__exit__(None, None, None)
            self.entries[self._name]["bytes"] = (self.folder / self._name).stat().st_size
        else:
            self.entries.pop(self._name, None)
            ctx.__exit__(type(error), error, error.__traceback__)

    def add(self, member: str, data: bytes) -> str:
        if "/" in member or SEPARATOR in member or member.startswith("."):
            raise ValueError(f"shard member name {member!r}: no '/', '#' or leading '.'")
        if member in self._seen:
            raise ValueError(f"{member!r} written twice to {self.prefix}/")
        if self._tar is not None and self._entry["samples"] and \
                _closed_size(self._tar.offset, len(data)) > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._open()
        entry = self._entry
        entry["members"].append(member, self._tar.add(member, data), len(data))
        entry["samples"] += 1
        self._seen.add(member)
        return member_ref(self._name, member)

    def close(self) -> dict[str, dict]:
        self._finish()
        return self.entries

    def abort(self, error: BaseException) -> None:
        self._finish(error)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            self.close()
        else:
            self.abort(error)


def remove_members(folder: str | os.PathLike, entries: dict[str, dict],
                   drop: dict[str, set[str]]) -> None:
    """Rewrite each shard named in ``drop`` without those members, atomically, and update
    its entry in ``entries`` (a shard left empty is deleted). References to the members
    kept stay valid: a reference names a member, not an offset."""
    folder = Path(folder)
    for name, members in drop.items():
        entry = entries[name]
        kept = sorted(((m, *where) for m, where in entry["members"].items() if m not in members),
                      key=lambda item: item[1])
        if not kept:
            (folder / name).unlink()
            del entries[name]
            continue
        placed = {}
        with open(folder / name, "rb") as src, atomic_path(folder / name) as tmp:
            tar = TarAppender(open(tmp, "wb"))
            for member, offset, size in kept:
                src.seek(offset)
                placed[member] = [tar.add(member, src.read(size)), size]
            tar.close()
        entries[name] = {"samples": len(placed), "bytes": (folder / name).stat().st_size,
                         "members": placed}


def write_index(folder: str | os.PathLike, shards: dict[str, dict]) -> None:
    """Write the folder's index of ``shards`` (shard path -> entry), atomically. It is
    written as it is read, member by member (the bytes ``json.dumps`` would give, without
    building the whole text)."""
    with atomic_path(Path(folder) / INDEX_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f'{{"format":{json.dumps(FORMAT)},"version":{VERSION},"shards":{{')
        for i, (name, entry) in enumerate(sorted(shards.items())):
            f.write(("," if i else "") + json.dumps(name) + ":{")
            for j, (key, value) in enumerate(entry.items()):
                f.write(("," if j else "") + json.dumps(key) + ":")
                if key != "members":
                    f.write(json.dumps(value, separators=(",", ":")))
                    continue
                f.write("{")
                for k, (member, (offset, size)) in enumerate(value.items()):
                    f.write(f'{"," if k else ""}{json.dumps(member)}:[{offset},{size}]')
                f.write("}")
            f.write("}")
        f.write("}}")


def parse_index(data: bytes, where: str) -> dict[str, dict]:
    """The shards an index file's bytes list (shard path -> entry), checked: the format and
    version, and every shard path relative and inside the folder."""
    index = json.loads(data)
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{where}: not a version-{VERSION} {FORMAT} shard index")
    shards = index["shards"]
    for name in shards:
        _safe_relative(name, f"{where}: shard")
    return shards


def read_index(folder: str | os.PathLike) -> dict[str, dict]:
    """The shards of a folder (shard path -> entry); {} when it has no index."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return {}
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        if key in _INDEXES:
            return _INDEXES[key]
    shards = parse_index(path.read_bytes(), str(path))
    with _LOCK:
        if len(_INDEXES) > 16:
            _INDEXES.clear()
        _INDEXES[key] = shards
    return shards


_INDEXES: dict[tuple, dict] = {}
_LOCK = threading.Lock()


def locate(folder: str | os.PathLike, ref: str,
           index: dict[str, dict] | None = None) -> tuple[str, int, int]:
    """Where the bytes a table reference names lie in ``folder``: (path relative to the
    folder, offset, size), size -1 for a whole plain file. ``index``: the folder's
    :func:`read_index`, when the caller already holds it. Checks what :func:`read_member`
    checks, without opening the shard."""
    rel, member = split_ref(ref)
    _safe_relative(rel, "crop reference")
    if member is None:
        return rel, 0, -1
    shards = read_index(folder) if index is None else index
    if rel not in shards:
        raise ValueError(f"{folder}: shard {rel!r} is not in {INDEX_FILE}")
    if member not in shards[rel]["members"]:
        raise ValueError(f"{folder}: {member!r} is not a member of shard {rel!r}")
    offset, size = shards[rel]["members"][member]
    return rel, int(offset), int(size)


def read_located(path: str | os.PathLike, offset: int, size: int, what: str = "") -> bytes:
    """The bytes :func:`locate` found: one seek and one read (the whole file for size -1)."""
    with open(path, "rb") as f:
        if size < 0:
            return f.read()
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"shard {path} is truncated" + (f" at {what!r}" if what else ""))
    return data


def read_member(folder: str | os.PathLike, ref: str, index: dict[str, dict] | None = None) -> bytes:
    """The bytes a table reference names in ``folder``: a shard member through the index
    (one seek), or a plain file. Nothing outside ``folder`` is opened."""
    rel, offset, size = locate(folder, ref, index)
    return read_located(Path(folder) / rel, offset, size, split_ref(ref)[1] or "")


class ShardReader:
    """Read members of one folder's shards by their table references, as
    :func:`read_member` does (the same checks), with each shard opened once: for a stage
    that reads every photo of a folder in turn."""

    def __init__(self, folder: str | os.PathLike, index: dict[str, dict] | None = None) -> None:
        self.folder = Path(folder)
        self.index = read_index(folder) if index is None else index
        self._fds: dict[str, int] = {}

    def read(self, ref: str) -> bytes:
        rel, member = split_ref(ref)
        fd = self._fds.get(rel)
        if fd is None or member is None:
            rel, offset, size = locate(self.folder, ref, self.index)
            if size < 0:
                return read_located(self.folder / rel, 0, -1)
            fd = self._fds[rel] = os.open(self.folder / rel, os.O_RDONLY)
        else:
            where = self.index[rel]["members"].get(member)
            if where is None:
                raise ValueError(f"{self.folder}: {member!r} is not a member of shard {rel!r}")
            offset, size = where
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"shard {self.folder / rel} is truncated at {member!r}")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Stored:
    """One stored file of a folder by its table reference (a shard member or a plain
    file), readable like a path: ``read_bytes()``."""

    __slots__ = ("folder", "ref")

    def __init__(self, folder: str | os.PathLike, ref: str) -> None:
        self.folder, self.ref = folder, ref

    def read_bytes(self) -> bytes:
        return read_member(self.folder, self.ref)

    def __str__(self) -> str:
        return f"{self.folder}/{self.ref}"

    __repr__ = __str__


def copy_shards(src: str | os.PathLike, out: str | os.PathLike, rename: dict[str, str]) -> dict[str, dict]:
    """Copy shards of folder ``src`` to folder ``out`` under new names (old -> new path);
    returns their index entries under the new names."""
    import shutil

    shards = read_index(src)
    copied = {}
    for old, new in rename.items():
        if old not in shards:
            raise ValueError(f"{src}: shard {old!r} is not in {INDEX_FILE}")
        _safe_relative(new, "shard")
        with atomic_path(Path(out) / new) as tmp:
            shutil.copyfile(Path(src) / old, tmp)
        copied[new] = shards[old]
    return copied


def objects(folder: str | os.PathLike) -> int:
    """Files below ``folder`` (what KFP's launcher would upload as objects)."""
    return sum(1 for p in Path(folder).rglob("*") if p.is_file())
