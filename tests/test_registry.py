"""The model registry: versions, the champion pointer (replaced atomically), and the
same operations on S3 (a real S3 API served by moto, spoken to with minio)."""
import json
import os
import socket

import pytest

from triview import registry as rg
from triview.registry import ModelRegistry, RegistryError, resolve_model


def _model(folder, name="m"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_card.json").write_text(json.dumps({"name": name}))
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    return folder


def test_versions_count_up_and_the_champion_is_what_was_promoted(tmp_path):
    reg = ModelRegistry(str(tmp_path / "reg"), "digits")
    assert reg.champion() is None and reg.versions() == []
    v1 = reg.publish(_model(tmp_path / "a"))
    v2 = reg.publish(_model(tmp_path / "b"))
    assert (v1, v2) == (1, 2) and reg.versions() == [1, 2]
    assert (tmp_path / "reg" / "models" / "digits" / "2" / "sub" / "weights.bin").is_file()
    pointer = reg.promote(1, metrics={"macro_f1": 0.9}, run_id="run-1")
    assert reg.champion()["version"] == 1 and pointer["metrics"] == {"macro_f1": 0.9}
    assert resolve_model(str(tmp_path / "reg" / "models" / "digits")) == \
        tmp_path / "reg" / "models" / "digits" / "1"
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.promote(7)


def test_the_champion_pointer_is_replaced_in_one_atomic_step(tmp_path, monkeypatch):
    reg = ModelRegistry(str(tmp_path), "m")
    reg.publish(_model(tmp_path / "x"))
    reg.publish(_model(tmp_path / "y"))
    reg.promote(1)
    replaced = []
    real = os.replace

    def spy(src, dst):
        # the new pointer is complete before it takes the old one's place
        replaced.append((src, dst, json.loads(open(src).read())["version"]))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    reg.promote(2)
    (src, dst, version), (_, logged, _) = replaced
    assert str(dst).endswith("models/m/champion.json") and version == 2
    assert os.path.dirname(src) == os.path.dirname(dst)   # same filesystem: rename is atomic
    assert str(logged).endswith("models/m/history/2.json")  # then the promotion log
    assert sorted(p.name for p in (tmp_path / "models" / "m").iterdir()) == [
        "1", "2", "champion.json", "history"]
    assert [(h["version"], h["replaced"]) for h in reg.history()] == [(1, None), (2, 1)]
    assert reg.versions() == [1, 2]


def test_a_taken_version_is_not_overwritten(tmp_path):
    reg = ModelRegistry(str(tmp_path), "m")
    (tmp_path / "models" / "m" / "1").mkdir(parents=True)  # another writer reserved 1
    assert reg.publish(_model(tmp_path / "a")) == 2


def test_bad_locations_are_clear_errors(tmp_path):
    with pytest.raises(RegistryError, match="unsupported"):
        ModelRegistry("gs://bucket/x")
    with pytest.raises(RegistryError, match="neither an exported model"):
        resolve_model(str(tmp_path))


@pytest.fixture()
def s3(monkeypatch):
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        from triview.storage import S3Store

        S3Store().client.make_bucket("models-bucket")
        yield "s3://models-bucket/artifacts"
    finally:
        server.stop()


def test_the_registry_works_the_same_on_s3(s3, tmp_path):
    reg = ModelRegistry(s3, "digits")
    assert reg.champion() is None
    assert reg.publish(_model(tmp_path / "a", "first")) == 1
    assert reg.publish(_model(tmp_path / "b", "second")) == 2
    reg.promote(2, metrics={"macro_f1": 0.5})
    pointer = reg.champion()
    assert pointer["version"] == 2 and pointer["uri"] == "s3://models-bucket/artifacts/models/digits/2"
    local = resolve_model(f"{s3}/models/digits", dest=tmp_path / "dl")
    assert json.loads((local / "model_card.json").read_text())["name"] == "second"
    assert (local / "sub" / "weights.bin").read_bytes() == b"\x00" * 10
    direct = resolve_model(f"{s3}/models/digits/1", dest=tmp_path / "dl1")
    assert json.loads((direct / "model_card.json").read_text())["name"] == "first"
