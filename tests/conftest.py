"""Shared fixtures: a small real digits data set pushed through the first stages once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Keep each test process to the machine's two cores without oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from triview.demo import write_digits

    folder = tmp_path_factory.mktemp("digits")
    write_digits(folder, per_class=40)
    return folder


@pytest.fixture(scope="session")
def ingested(digits_dir, tmp_path_factory) -> Path:
    from triview.stages import ingest_stage

    out = tmp_path_factory.mktemp("ingested")
    ingest_stage(str(digits_dir), out, seed=0)
    return out


@pytest.fixture(scope="session")
def cropped(ingested, tmp_path_factory) -> Path:
    from triview.stages import calibrate_and_crop_stage

    out = tmp_path_factory.mktemp("cropped")
    calibrate_and_crop_stage(ingested, out, layout="horizontal", image_size=32)
    return out


@pytest.fixture(scope="session")
def balanced(cropped, tmp_path_factory) -> Path:
    from triview.stages import balance_stage

    out = tmp_path_factory.mktemp("balanced")
    balance_stage(cropped, out)
    return out


@pytest.fixture(scope="session")
def augmented(cropped, tmp_path_factory) -> Path:
    from triview.stages import augment_stage

    out = tmp_path_factory.mktemp("augmented")
    augment_stage(cropped, out, copies=1, seed=0)
    return out


@pytest.fixture(scope="session")
def trained(cropped, augmented, balanced, tmp_path_factory) -> dict[str, Path]:
    """Three briefly trained branches (enough to exercise voter, evaluate and export)."""
    from triview.stages import train_branch_stage

    out = {}
    for view in ("left", "center", "right"):
        d = tmp_path_factory.mktemp(f"branch_{view}")
        train_branch_stage(cropped, augmented, balanced, view, d, epochs=3, batch_size=32, seed=0)
        out[view] = d
    return out


@pytest.fixture()
def pushgateway(tmp_path):
    """A real Prometheus Pushgateway (Debian's prometheus-pushgateway) on 127.0.0.1."""
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        pytest.skip("prometheus-pushgateway is not installed (.ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("pushgateway did not become ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
