"""Storage layer: local atomic writes, and S3 against a real server (moto_server) with
injected faults: retries to success, or a clear failure with nothing partial visible."""
from __future__ import annotations

import os

import pytest
from s3_server import BUCKET, FaultProxy, fault_proxy, moto_server, s3_endpoint  # noqa: F401

from triview import storage
from triview.storage import S3Config, S3Store, S3Uri, StorageError


def test_local_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "a" / "artifact.bin"
    storage.atomic_write_bytes(target, b"first")
    with pytest.raises(RuntimeError):
        with storage.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"first"
    assert os.listdir(target.parent) == ["artifact.bin"]


def test_config_comes_from_the_environment_or_a_mounted_secret(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "accesskey").write_text("AK\n")
    (secret / "secretkey").write_text("SK\n")
    cfg = S3Config.from_env({"S3_ENDPOINT": "http://minio.kubeflow:9000", "S3_SECRET_DIR": str(secret),
                             "AWS_REGION": "eu-west-1"})
    assert (cfg.endpoint, cfg.secure, cfg.region) == ("minio.kubeflow:9000", False, "eu-west-1")
    assert (cfg.access_key, cfg.secret_key) == ("AK", "SK")
    assert "SK" not in repr(cfg) and "AK" not in repr(cfg)
    env = S3Config.from_env({"MINIO_ENDPOINT": "minio:9000", "MINIO_ACCESS_KEY": "a",
                             "MINIO_SECRET_KEY": "b", "S3_SECURE": "false"})
    assert (env.endpoint, env.secure, env.access_key) == ("minio:9000", False, "a")
    assert S3Config.from_env({}).secure and S3Config.from_env({}).access_key is None
    assert S3Uri.parse("s3://bucket/some/prefix").join("x.jpg") == S3Uri("bucket", "some/prefix/x.jpg")
    with pytest.raises(ValueError):
        S3Uri.parse("s3:///key")


def test_round_trip_on_a_real_s3_server(s3_endpoint, tmp_path):
    store = S3Store()
    uri = f"s3://{BUCKET}/runs/1/manifest.csv"
    storage.atomic_write_text(uri, "a,b\n1,2\n")          # the same call as for a local path
    assert storage.read_bytes(uri) == b"a,b\n1,2\n"
    assert store.get_bytes(uri) == b"a,b\n1,2\n"
    assert store.exists(uri) and not store.exists(f"s3://{BUCKET}/runs/1/missing")
    (tmp_path / "tree" / "images").mkdir(parents=True)
    (tmp_path / "tree" / "images" / "a.jpg").write_bytes(b"A")
    (tmp_path / "tree" / "manifest.csv").write_text("m")
    assert store.upload_tree(tmp_path / "tree", f"s3://{BUCKET}/out", last=("manifest.csv",)) == 2
    assert store.list(f"s3://{BUCKET}/out") == [("out/images/a.jpg", 1), ("out/manifest.csv", 1)]
    store.download_file(f"s3://{BUCKET}/out/images/a.jpg", tmp_path / "dl" / "a.jpg")
    assert (tmp_path / "dl" / "a.jpg").read_bytes() == b"A"
    with pytest.raises(StorageError, match="NoSuchKey"):
        store.get_bytes(f"s3://{BUCKET}/nope")


def test_5xx_answers_are_retried_to_success(fault_proxy):
    fault_proxy.fail_first = 3
    uri = f"s3://{BUCKET}/retried.bin"
    S3Store().put_bytes(uri, b"x" * 1000)
    assert fault_proxy.seen[:3] == ["503"] * 3
    assert S3Store().get_bytes(uri) == b"x" * 1000


def test_a_server_that_keeps_failing_gives_a_clear_error_and_no_object(fault_proxy, s3_endpoint,
                                                                        monkeypatch):
    fault_proxy.fail_first = 1000
    uri = f"s3://{BUCKET}/never.bin"
    with pytest.raises(StorageError, match=r"upload s3://.*never.bin: gave up after 5 attempts"):
        S3Store().put_bytes(uri, b"y" * 1000)
    direct = S3Store(S3Config.from_env({"S3_ENDPOINT": f"http://{s3_endpoint}",
                                        "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}))
    assert not direct.exists(uri)


def test_server_gone_mid_multipart_upload_leaves_nothing_visible(fault_proxy, s3_endpoint, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_PART_SIZE", 5 * 1024 * 1024)
    payload = os.urandom(11 * 1024 * 1024)   # three parts
    fault_proxy.methods = {"PUT", "POST"}
    fault_proxy.drop_after = 2               # initiate + first part get through, then the line dies
    uri = f"s3://{BUCKET}/big.bin"
    with pytest.raises(StorageError, match="gave up after 5 attempts"):
        S3Store().put_bytes(uri, payload)
    direct = S3Store(S3Config.from_env({"S3_ENDPOINT": f"http://{s3_endpoint}",
                                        "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}))
    assert not direct.exists(uri)
    assert direct.list(f"s3://{BUCKET}/") == []
    # once the line is back the same call completes, byte for byte
    fault_proxy.drop_after = None
    S3Store().put_bytes(uri, payload)
    assert direct.get_bytes(uri) == payload


def test_server_process_killed_mid_upload_fails_clearly(moto_server, monkeypatch):
    from s3_server import s3_environment

    s3_environment(monkeypatch, moto_server.endpoint)
    S3Store().client.make_bucket(BUCKET)
    proxy = FaultProxy(moto_server.endpoint)
    try:
        s3_environment(monkeypatch, proxy.endpoint)
        monkeypatch.setattr(storage, "MULTIPART_PART_SIZE", 5 * 1024 * 1024)
        parts = []

        def kill_on_second_part(method, path):
            if method == "PUT" and "partNumber" in path:
                parts.append(path)
                if len(parts) == 2:
                    moto_server.stop()
        proxy.before_forward = kill_on_second_part
        with pytest.raises(StorageError, match="upload s3://"):
            S3Store().put_bytes(f"s3://{BUCKET}/killed.bin", os.urandom(11 * 1024 * 1024))
        assert len(parts) >= 2
    finally:
        proxy.close()
