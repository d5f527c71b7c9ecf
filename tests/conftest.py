"""Shared fixtures: a small real digits data set pushed once through every stage, in a
chain each test module picks up where it needs it: digits -> ingested -> cropped ->
balanced / augmented -> trained (three branches) -> voted -> evaluated -> exported."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Keep each test process to the machine's two cores without oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "2")

from triview.params import load_preset, names  # noqa: E402

#: The digits demo's training parameters (the spec's defaults serve photos): tests that
#: train on the small digits fixture pass these, then their own.
DIGITS_TRAIN = {k: v for k, v in load_preset("digits").items() if k in names("train-branch")}
DIGITS_AUGMENT = {k: v for k, v in load_preset("digits").items() if k in names("augment")}


@pytest.fixture(autouse=True)
def _the_real_print():
    """kfp.local indents task logs by swapping ``builtins.print``; when a ParallelFor runs
    tasks in threads, the swaps can interleave and leave the indenting print in place for
    every later test. Put the real one back after each test."""
    import builtins

    real = builtins.print
    yield
    builtins.print = real


def stored_photos(folder: Path, refs) -> list[Path]:
    """Photos that ingest stored in ``folder`` (manifest references: shard members) as
    files named as stored (``<sha256[:16]><suffix>``), in a folder beside it: what a user
    would hand to ``triview predict``, the server or the try page."""
    from triview.shards import read_member, split_ref

    dest = Path(folder).parent / f"{Path(folder).name}-photos"
    dest.mkdir(exist_ok=True)
    out = []
    for ref in refs:
        shard, member = split_ref(ref)
        path = dest / (member or Path(shard).name)
        if not path.exists():
            path.write_bytes(read_member(folder, ref))
        out.append(path)
    return out


def digits_train(**overrides) -> dict:
    """The digits training parameters with ``overrides``."""
    return {**DIGITS_TRAIN, **overrides}


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
    ingest_stage(str(digits_dir), out)
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
    augment_stage(cropped, out, **{**DIGITS_AUGMENT, "augment_copies": 1, "seed": 0})
    return out


@pytest.fixture(scope="session")
def trained(cropped, augmented, balanced, tmp_path_factory) -> dict[str, Path]:
    """Three briefly trained branches (enough to exercise voter, evaluate and export)."""
    from triview.stages import train_branch_stage

    out = {}
    for view in ("left", "center", "right"):
        d = tmp_path_factory.mktemp(f"branch_{view}")
        train_branch_stage(cropped, augmented, balanced, view, d,
                           **{**DIGITS_TRAIN, "epochs": 3, "batch_size": 32, "seed": 0})
        out[view] = d
    return out


@pytest.fixture(scope="session")
def voted(trained, tmp_path_factory) -> Path:
    """The voter chosen over the three branches."""
    from triview.stages import train_voter_stage

    out = tmp_path_factory.mktemp("voter")
    train_voter_stage(list(trained.values()), out)
    return out


@pytest.fixture(scope="session")
def evaluated(trained, voted, cropped, tmp_path_factory) -> Path:
    """The evaluation (no registry: blessed on the absolute bar) with its HTML report."""
    from triview.stages import evaluate_stage

    out = tmp_path_factory.mktemp("evaluation")
    evaluate_stage(list(trained.values()), voted, out, views_dir=cropped, gradcam_per_kind=2)
    return out


@pytest.fixture(scope="session")
def exported(trained, voted, evaluated, cropped, tmp_path_factory) -> Path:
    """The exported ensemble (TorchScript, ONNX and a static INT8 ONNX) with its card."""
    from triview.stages import export_stage

    out = tmp_path_factory.mktemp("model")
    export_stage(list(trained.values()), voted, cropped, evaluated, out, quantize="static")
    return out


#: The photo recipe (epochs=0: the ImageNet EfficientNet-Lite0 frozen, its head cross-fitted
#: over train + val on cached features, an augmented pass, flip TTA, temperatures) on the
#: 32 px digits fixture: the mechanics in seconds.
HEAD_ONLY_TRAIN = {"backbone": "efficientnet_lite0", "weights": "imagenet",
                   "epochs": 0, "head_folds": 3, "feature_passes": 2, "tta": "flip", "seed": 0}


@pytest.fixture(scope="session")
def head_only(cropped, augmented, balanced, tmp_path_factory) -> dict[str, Path]:
    """Three head-only branches, their voter, evaluation and export (folders by name)."""
    from triview.stages import evaluate_stage, export_stage, train_branch_stage, train_voter_stage

    out = {}
    for view in ("left", "center", "right"):
        out[view] = tmp_path_factory.mktemp(f"head_only_{view}")
        train_branch_stage(cropped, augmented, balanced, view, out[view], **HEAD_ONLY_TRAIN)
    branches = [out[v] for v in ("left", "center", "right")]
    out["voter"] = tmp_path_factory.mktemp("head_only_voter")
    train_voter_stage(branches, out["voter"], seed=0)
    out["eval"] = tmp_path_factory.mktemp("head_only_eval")
    evaluate_stage(branches, out["voter"], out["eval"], views_dir=cropped, gradcam_per_kind=0)
    out["model"] = tmp_path_factory.mktemp("head_only_model")
    export_stage(branches, out["voter"], cropped, out["eval"], out["model"], infra_validate="off")
    return out


@contextlib.contextmanager
def pushgateway_server():
    """A real Prometheus Pushgateway (Debian's prometheus-pushgateway) on 127.0.0.1;
    yields its URL."""
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
    # memory only: Debian's default persists to /var/lib/prometheus, shared by every run
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
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


@pytest.fixture()
def pushgateway():
    with pushgateway_server() as url:
        yield url


def triview_run_command(data: Path, out: Path, params=(), *options: str) -> list[str]:
    """``triview run --data DATA --out OUT [OPTIONS] --param P ...`` with this venv's CLI."""
    return ([str(Path(sys.executable).parent / "triview"), "run", "--data", str(data),
             "--out", str(out), *options] + [a for p in params for a in ("--param", p)])


#: The small DAG run's parameters: the photo defaults (ImageNet EfficientNet-Lite0 from
#: its wheel, the head on cached features, then fine-tuning) at 24 px, one epoch of
#: fine-tuning, no offline copies: every task still in the DAG, minutes turned into seconds.
SMALL_RUN_PARAMS = ("epochs=1", "image_size=24", "augment_copies=0")


@pytest.fixture(scope="session")
def small_cli_run(tmp_path_factory) -> dict:
    """One ``triview run`` through the CLI (kfp.local's subprocess runner) on 400 real
    digits and one broken file, with :data:`SMALL_RUN_PARAMS` and ``--repeats 2``,
    pushing its metrics to a real Pushgateway. Shared by the end-to-end
    test (what the run printed, wrote and pushed) and the container test (the same DAG in
    the built images must give the same metrics). Returns the data and output folders,
    the process's stdout/stderr/return code and the Pushgateway's /metrics text after
    the run."""
    import os
    import subprocess
    import urllib.request

    from triview.demo import write_digits

    tmp = tmp_path_factory.mktemp("small_run")
    data, out = tmp / "data", tmp / "out"
    write_digits(data, per_class=40)
    (data / "0" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    cmd = triview_run_command(data, out, SMALL_RUN_PARAMS, "--repeats", "2")
    with pushgateway_server() as url:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "PUSHGATEWAY_URL": url})
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return {"data": data, "out": out, "params": SMALL_RUN_PARAMS, "returncode": proc.returncode,
            "stdout": proc.stdout, "stderr": proc.stderr, "metrics": metrics}


@pytest.fixture(scope="session")
def serve_python() -> str:
    """The serving environment's Python (.venv-serve, `make serve-env`; `make test` builds it)."""
    from triview.serving import serve_python as find

    python = find()
    if python is None:
        pytest.skip("no serving environment: run `make serve-env` (make test does)")
    return python
