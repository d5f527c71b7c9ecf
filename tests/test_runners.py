"""The docker runner's settings (pipelines/runners.py), without an engine: what a task's
container is started with. Runs in containers: tests/test_containers.py."""
from pathlib import Path

import pytest

from docker_engine import shared_tmp  # noqa: F401  (fixture)
from pipelines.platform import PlatformOptions
from pipelines.runners import (NETWORK_ENV, WRITABLE_PATHS, host_mounts, limits, network_mode,
                               restricted_run_args, source_digest)


def test_a_task_container_is_a_restricted_pod():
    from kfp.local import DockerRunner

    args = restricted_run_args([("/data", False), ("/registry", True)])
    DockerRunner(**args)  # kfp 2.17 accepts every one of them
    assert args["user"] == "10001:10001" and args["read_only"] is True
    assert args["cap_drop"] == ["ALL"] and args["security_opt"] == ["no-new-privileges"]
    assert set(args["tmpfs"]) == set(WRITABLE_PATHS) >= {"/tmp", "/gcs", "/minio", "/s3",
                                                         "/.local", "/.cache"}
    assert [(m["Source"], m["ReadOnly"]) for m in args["mounts"]] == [("/data", True),
                                                                     ("/registry", False)]
    with pytest.raises(ValueError, match="volumes"):
        DockerRunner(volumes={})  # kfp mounts the pipeline root itself


def test_limits_follow_the_platform_options_capped_at_this_machine():
    options = PlatformOptions()
    light, train = limits(options.light, host_cpus=16), limits(options.train, host_cpus=16)
    assert (light.cpus, light.memory_bytes) == (2.0, 8 * 2**30)
    assert (train.cpus, train.memory_bytes) == (8.0, 32 * 2**30)
    assert limits(options.train, host_cpus=2).cpus == 2.0  # docker refuses more CPUs than exist


def test_network_only_when_a_service_is_configured(monkeypatch):
    for name in NETWORK_ENV:
        monkeypatch.delenv(name, raising=False)
    assert network_mode() == "none"
    monkeypatch.setenv("PUSHGATEWAY_URL", "http://127.0.0.1:9091")
    assert network_mode() == "host"


def test_local_path_parameters_are_mounted_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "chessboards").mkdir()
    params, mounts = host_mounts("data", {"calibration_images": "chessboards/*.jpg",
                                          "registry": "registry", "weights": "s3://b/w.pt",
                                          "epochs": 1})
    assert params["calibration_images"] == str(tmp_path / "chessboards/*.jpg")
    assert params["registry"] == str(tmp_path / "registry") and params["weights"] == "s3://b/w.pt"
    assert sorted(mounts) == sorted([(str(tmp_path / "data"), False),
                                     (str(tmp_path / "chessboards"), False),
                                     (str(tmp_path / "registry"), True)])
    with pytest.raises(FileNotFoundError, match="calibration_file"):
        host_mounts("data", {"calibration_file": "missing.json"})


def test_source_digest_changes_with_the_code(tmp_path):
    for package in ("triview", "components", "pipelines"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    before = source_digest(tmp_path)
    (tmp_path / "pipelines" / "triview.yaml").write_text("x")
    assert source_digest(tmp_path) != before
    assert len(source_digest()) == 64 and source_digest() == source_digest(Path(__file__).parents[1])


def test_an_out_folder_the_task_user_cannot_enter_is_refused_before_any_container(shared_tmp):
    from pipelines.runners import DockerRunnerError, check_reachable

    private = shared_tmp / "private"
    (private / "out").mkdir(parents=True)
    private.chmod(0o700)
    with pytest.raises(DockerRunnerError, match=r"uid 10001, which cannot enter .*private .*drwx------"):
        check_reachable(private / "out")
    private.chmod(0o711)
    check_reachable(private / "out")


def test_the_cli_imports_kfp_without_the_slow_optional_grammar():
    """`triview run/compile/submit` import kfp's client; kfp -> kubernetes ->
    kubernetes_validate -> jsonschema would import rfc3987_syntax, which builds a Lark
    grammar for 4.5 s (bench/cli_startup.py). `make install` leaves it out."""
    import subprocess
    import sys

    code = "import sys, pipelines.local, kfp.client; print('rfc3987_syntax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
