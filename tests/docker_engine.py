"""The Docker engine and the built triview images, for tests marked ``docker``.

Without a reachable engine, or without images built from this working tree (`make
images`), those tests skip with the reason; with ``TRIVIEW_REQUIRE_DOCKER=1`` (set by
.ci/run, which starts dockerd and builds the images) the same condition fails them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REQUIRE_ENV = "TRIVIEW_REQUIRE_DOCKER"


def unavailable(reason: str):
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the images must be testable here)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def triview_images() -> dict[str, str]:
    """{"cpu": ref, "gpu": ref, "serve": ref} of images built from this working tree."""
    pytest.importorskip("docker")
    from components.images import CPU_IMAGE, GPU_IMAGE, SERVE_IMAGE
    from pipelines.runners import DockerRunnerError, check_images, docker_client, source_digest

    try:
        client = docker_client()
    except DockerRunnerError as exc:
        unavailable(str(exc))
    try:
        check_images(client, [CPU_IMAGE, GPU_IMAGE, SERVE_IMAGE], source_digest())
    except DockerRunnerError as exc:
        unavailable(str(exc))
    finally:
        client.close()
    return {"cpu": CPU_IMAGE, "gpu": GPU_IMAGE, "serve": SERVE_IMAGE}


@pytest.fixture()
def shared_tmp():
    """A temporary folder uid 10001 may enter (pytest's own are 0700 to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="triview-docker-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def readable_copy(source: Path, dest: Path) -> Path:
    """Copy the folder ``source`` to ``dest`` (inside :func:`shared_tmp`) readable by the
    images' uid 10001: pytest's own folders are private to root."""
    shutil.copytree(source, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest
