"""Checks of a BUILT triview image, run in containers from it, and its SBOM.

``python -m images.inspect_image check --out DIR IMAGE...`` (the last step of
``make images``) writes ``DIR/<name>-<tag>.cdx.json`` (CycloneDX, made by cyclonedx-py
from this venv scanning the image's own interpreter) and ``DIR/<name>-<tag>.json``
(size, the installed distributions, the findings below) and exits 1 on any finding:

- a setuid/setgid file;
- a world-writable file or directory (sticky /tmp and /var/tmp aside), a file owned by
  the runtime user outside its home, or a file whose owner or group has no name;
- ``python -m triview --help`` or ``import kfp`` failing as uid 10001 on a read-only root
  (the serving image: ``python -m triview serve --help`` and importing the predictor with
  KServe and ONNX Runtime, and torch absent);
- an installed distribution whose version differs from the image's lock (``--lock``:
  ``images/requirements.lock``, pyproject's pins and what they pull in, by default;
  ``images/requirements-serve.lock`` for the serving image), or one the lock does not name;
- triview's installed files differing from this working tree (``source_digest``).

``python -m images.inspect_image source-digest`` prints this tree's digest (the image
label ``io.triview.source-digest`` that ``make images`` sets).
"""
from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.utils import canonicalize_name

from images.lock import RUNTIME_LOCK, SERVE_LOCK, read_lock
from pipelines.runners import SOURCE_LABEL, digest_of, is_source, source_digest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_UID = 10001
HOME = "/home/triview"
#: Where `pip install --target` put triview in the image (Dockerfiles).
TRIVIEW_TARGET = "/opt/triview"
# The sandbox of every check container: no network, read-only root, nothing to gain.
SANDBOX = ["--network", "none", "--read-only", "--tmpfs", "/tmp", "--security-opt", "no-new-privileges"]


def _docker(*args: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(["docker", *args], input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:6])} ... failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc.stdout.decode()


def run_in_image(image: str, *command: str, user: str = str(RUNTIME_UID),
                 mounts: tuple[str, ...] = ()) -> str:
    """stdout of ``command`` in a throw-away container of ``image`` (raises on failure);
    every capability dropped unless it runs as root (the file scan must read every folder).
    ``command[0]`` replaces the image's entrypoint (the serving image has one)."""
    volume_args = [a for m in mounts for a in ("-v", m)]
    caps = [] if user == "0" else ["--cap-drop", "ALL"]
    return _docker("run", "--rm", *SANDBOX, *caps, "--user", user, *volume_args,
                   "--entrypoint", command[0], image, *command[1:])


_RECORD_SCRIPT = """
import importlib.metadata as m, json
print(json.dumps([[str(f), f.hash.value] for f in m.distribution('triview').files or [] if f.hash]))
"""


def image_source_digest(image: str) -> str:
    """The same digest over triview's installed files, from its wheel RECORD in the image."""
    records = json.loads(run_in_image(image, "python", "-c", _RECORD_SCRIPT))
    files = {}
    for path, urlsafe_b64 in records:
        if is_source(path):
            raw = base64.urlsafe_b64decode(urlsafe_b64 + "=" * (-len(urlsafe_b64) % 4))
            files[path] = raw.hex()
    return digest_of(files)


def image_label(image: str, label: str) -> str | None:
    """A label of a local image (None when unset); raises when the image is missing."""
    labels = json.loads(_docker("image", "inspect", "--format", "{{json .Config.Labels}}", image))
    return (labels or {}).get(label)


_DISTRIBUTIONS = """
import importlib.metadata as m, json
print(json.dumps(sorted([d.metadata['Name'], d.version] for d in m.distributions())))
"""


def installed_distributions(image: str) -> dict[str, str]:
    """{canonical name: version} of every distribution the image's Python sees."""
    pairs = json.loads(run_in_image(image, "python", "-c", _DISTRIBUTIONS))
    return {canonicalize_name(name): version for name, version in pairs}


def pin_mismatches(installed: dict[str, str], lock: Path = RUNTIME_LOCK) -> list[str]:
    """Installed versions that differ from the lock, and distributions it does not name."""
    locked = {name: version for name, (version, _) in read_lock(lock).items()}
    problems = [f"{name}: image has {installed.get(name)}, lock pins {version}"
                for name, version in locked.items() if installed.get(name) != version]
    extra = set(installed) - set(locked) - {"triview"}
    problems += [f"{name}=={installed[name]} is installed but not in the lock" for name in sorted(extra)]
    return problems


# Run as root (with its default capabilities) so that no directory is unreadable to the scan.
_SCAN = f"""
find / -xdev -type f -perm /6000 -printf 'setuid %p\\n'
find / -xdev -perm -0002 ! -type l ! \\( -type d -perm -1000 \\) -printf 'world-writable %p\\n'
find / -xdev -user {RUNTIME_UID} ! -path '{HOME}' ! -path '{HOME}/*' -printf 'owned-by-runtime-user %p\\n'
find / -xdev \\( -nouser -o -nogroup \\) -printf 'unnamed-owner %p\\n'
"""


def file_findings(image: str) -> list[str]:
    """Setuid/setgid files, world-writable paths, files the runtime user should not own."""
    return [line for line in run_in_image(image, "sh", "-c", _SCAN, user="0").splitlines() if line]


_SERVING_IMPORTS = """
import importlib.util, kserve, onnxruntime, triview.serving.server
assert importlib.util.find_spec('torch') is None, 'torch in the serving image'
"""


def smoke(image: str, lock: Path = RUNTIME_LOCK) -> None:
    """As uid 10001 on a read-only root: ``python -m triview --help`` and ``import kfp``
    (training images), or the predictor's CLI and imports with no torch (serving image)."""
    if lock == SERVE_LOCK:
        run_in_image(image, "python", "-m", "triview", "serve", "--help")
        run_in_image(image, "python", "-c", _SERVING_IMPORTS)
        return
    run_in_image(image, "python", "-m", "triview", "--help")
    run_in_image(image, "python", "-c", "import kfp, kfp.dsl.executor_main")


def write_sbom(image: str, out: Path) -> dict:
    """CycloneDX JSON of the image's environment: this venv's cyclonedx-py, mounted
    read-only into a container of the image, scans the image's own interpreter."""
    tool = sysconfig.get_paths()["purelib"]
    script = ("import sys, runpy; sys.path.append('/sbom-tool'); "
              "sys.argv = ['cyclonedx-py', 'environment', '--pyproject', '/sbom-src/pyproject.toml', "
              "'--output-reproducible', '--of', 'JSON', '-o', '-', sys.executable]; "
              "runpy.run_module('cyclonedx_py', run_name='__main__')")
    # the scanned interpreter's sys.path must not contain the tool: no PYTHONPATH for it
    text = run_in_image(image, "python", "-c", script,
                        mounts=(f"{tool}:/sbom-tool:ro", f"{REPO / 'pyproject.toml'}:/sbom-src/pyproject.toml:ro"))
    bom = json.loads(text)
    out.write_text(json.dumps(bom, indent=1) + "\n")
    return bom


def image_size(image: str) -> int:
    return int(_docker("image", "inspect", "--format", "{{.Size}}", image).strip())


def check_image(image: str, out_dir: Path, lock: Path = RUNTIME_LOCK) -> list[str]:
    """Run every check on ``image`` against ``lock``; write its SBOM and a JSON report;
    return the findings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = image.rsplit("/", 1)[-1].replace(":", "-")
    findings = file_findings(image)
    smoke(image, lock)
    installed = installed_distributions(image)
    findings += pin_mismatches(installed, lock)
    digest = image_source_digest(image)
    if digest != source_digest():
        findings.append(f"triview in the image is not this working tree ({digest[:12]} vs "
                        f"{source_digest()[:12]}): run `make images`")
    if image_label(image, SOURCE_LABEL) not in (None, digest):
        findings.append(f"label {SOURCE_LABEL} does not match the installed files")
    bom = write_sbom(image, out_dir / f"{stem}.cdx.json")
    report = {"image": image, "size_bytes": image_size(image), "distributions": installed,
              "sbom_components": len(bom.get("components", [])), "source_digest": digest,
              "findings": findings}
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m images.inspect_image")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("source-digest", help="print this working tree's source digest")
    p = sub.add_parser("check", help="check built images and write an SBOM next to each")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="build/images")
    p.add_argument("--lock", type=Path, default=RUNTIME_LOCK,
                   help="the lock the images' distributions must match (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "source-digest":
        print(source_digest())
        return 0
    failed = False
    for image in args.images:
        findings = check_image(image, Path(args.out), args.lock.resolve())
        print(f"{image}: {'OK' if not findings else f'{len(findings)} finding(s)'}")
        for finding in findings:
            print(f"  {finding}")
        failed |= bool(findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
