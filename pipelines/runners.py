"""``triview run --runner docker``: every task of the DAG in the image the compiled IR
names, through kfp.local's DockerRunner, started the way a restricted-profile KFP pod
starts it:

- uid/gid 10001, a read-only root file system, every capability dropped,
  ``no-new-privileges``;
- tmpfs at ``/tmp`` (the lightweight component's program file) and at the paths where
  KFP (>= 2.2) mounts emptyDirs so that a non-root container can write the launcher's
  local artifact paths: ``/gcs``, ``/minio``, ``/s3``, ``/.local``, ``/.cache``, ``/.config``;
- no network, or the host's (for its 127.0.0.1 test servers) only when
  ``PUSHGATEWAY_URL`` or an S3 endpoint is set;
- the CPU and memory limits of ``PlatformOptions`` (light stages / training), CPUs
  capped at this machine's.

kfp.local does the rest as for the subprocess runner: placeholders, executor input,
the pipeline root bind-mounted at its own path (read-write), outputs. Two things of
kfp 2.17's DockerRunner are replaced for the run, in ``_start_task_container``:
its containers are started with ``auto_remove`` and a status lost to that race is
taken for success (kubeflow/pipelines#13332: a failing task "passes"), and its run
arguments are one set for every task, where a pod has its task's limits.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipelines.platform import PlatformOptions, Resources

RUNTIME_UID = 10001
#: KFP's emptyDirs (kubeflow/pipelines#10538) plus /tmp; everything else is read-only.
WRITABLE_PATHS = ("/tmp", "/gcs", "/minio", "/s3", "/.local", "/.cache", "/.config")
TMPFS_OPTIONS = "rw,nosuid,nodev,size=2g,mode=1777"
SOURCE_LABEL = "io.triview.source-digest"
#: Parameters that may name a local path, and whether the task writes there.
PATH_PARAMS = {"calibration_file": False, "calibration_images": False, "weights": False,
               "registry": True, "checkpoint_root": True}
#: Passed through from this environment when set: services, credentials, numerics.
PASSED_ENV = ("PUSHGATEWAY_URL", "S3_ENDPOINT", "MINIO_ENDPOINT", "AWS_ENDPOINT_URL", "S3_SECURE",
              "S3_VERIFY_TLS", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "S3_BACKOFF_S", "S3_ATTEMPTS",
              # the same OpenBLAS kernel as the subprocess runner on this machine
              "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
NETWORK_ENV = ("PUSHGATEWAY_URL", "S3_ENDPOINT", "MINIO_ENDPOINT", "AWS_ENDPOINT_URL")


#: The packages the images install; their files make the source digest.
PACKAGES = ("triview", "components", "pipelines")


def is_source(path: str) -> bool:
    return path.split("/", 1)[0] in PACKAGES and path.endswith((".py", ".yaml"))


def digest_of(files: dict[str, str]) -> str:
    """SHA-256 over sorted ``path sha256`` lines."""
    return hashlib.sha256("".join(f"{p} {h}\n" for p, h in sorted(files.items())).encode()).hexdigest()


def source_digest(root: Path | None = None) -> str:
    """Digest of the triview, components and pipelines sources under ``root`` (default:
    where these packages are imported from: the working tree, or site-packages), the
    ``io.triview.source-digest`` label of an image built from them."""
    root = root or Path(__file__).resolve().parents[1]
    files = {}
    for package in PACKAGES:
        for file in (root / package).rglob("*"):
            rel = file.relative_to(root).as_posix()
            if file.is_file() and "__pycache__" not in rel and is_source(rel):
                files[rel] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digest_of(files)


class DockerRunnerError(RuntimeError):
    """The docker runner cannot start, or a task's container failed (with the end of its log)."""


@dataclass(frozen=True)
class Limits:
    cpus: float
    memory_bytes: int


def limits(resources: Resources, host_cpus: int | None = None) -> Limits:
    """A pod's CPU/memory limits as docker limits (CPUs capped at this machine's)."""
    from kubernetes.utils.quantity import parse_quantity

    cpus = float(parse_quantity(resources.cpu_limit))
    return Limits(cpus=min(cpus, float(host_cpus or os.cpu_count() or 1)),
                  memory_bytes=int(parse_quantity(resources.memory_limit)))


def docker_client():
    """A docker-py client for DOCKER_HOST (or the default socket); a clear error when
    no engine answers."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerRunnerError(f"no Docker engine reachable ({exc}); start dockerd or set "
                                "DOCKER_HOST (docs/reference/images.md)") from None
    return client


def check_images(client, images: list[str], source_digest: str) -> None:
    """Every image exists locally (nothing can be pulled) and holds this working tree's code."""
    import docker

    for image in images:
        try:
            labels = client.images.get(image).labels or {}
        except docker.errors.ImageNotFound:
            raise DockerRunnerError(f"image {image} is not in the local Docker engine; build it "
                                    "with `make images`") from None
        built_from = labels.get(SOURCE_LABEL)
        if built_from is not None and built_from != source_digest:
            raise DockerRunnerError(f"image {image} was built from other sources than this working "
                                    f"tree ({built_from[:12]} vs {source_digest[:12]}); rebuild with "
                                    "`make images`")


def _local_root(value: str) -> Path | None:
    """The local folder or file a path parameter names (the part before any glob)."""
    if not value or "://" in value:
        return None
    glob_at = min((value.index(c) for c in "*?[" if c in value), default=None)
    if glob_at is None:
        return Path(value).resolve()
    return Path(os.path.dirname(value[:glob_at]) or ".").resolve()


def host_mounts(data: str, params: dict) -> tuple[dict, list[tuple[str, bool]]]:
    """Parameters with local paths made absolute, and the (path, writable) bind mounts
    the tasks need: the input read-only, a registry or checkpoint folder read-write."""
    params = dict(params)
    mounts = [(str(Path(data).resolve()), False)] if "://" not in data else []
    for name, writable in PATH_PARAMS.items():
        root = _local_root(str(params.get(name) or ""))
        if root is None:
            continue
        value = str(params[name])
        params[name] = os.path.abspath(value)  # the task's working directory is not ours
        if writable:
            root.mkdir(parents=True, exist_ok=True)
            _give_to_runtime_user(root)
        elif not root.exists():
            raise FileNotFoundError(f"{name}={value!r}: {root} does not exist")
        mounts.append((str(root), writable))
    return params, mounts


def _give_to_runtime_user(folder: Path) -> None:
    """Let uid 10001 write ``folder`` (as a pod's fsGroup would); a clear error when we cannot."""
    if folder.stat().st_uid == RUNTIME_UID:
        return
    if os.geteuid() == 0:
        os.chown(folder, RUNTIME_UID, RUNTIME_UID)
        return
    raise DockerRunnerError(f"{folder} must be writable for uid {RUNTIME_UID}, the tasks' user: "
                            f"sudo chown {RUNTIME_UID} {folder}")


def check_reachable(path: Path) -> None:
    """uid 10001 can traverse every folder down to ``path`` (bind mounts keep host modes)."""
    import stat

    for folder in [*reversed(path.parents), path]:
        st = folder.stat()
        if not (st.st_uid == RUNTIME_UID or st.st_mode & stat.S_IXOTH
                or (st.st_gid == RUNTIME_UID and st.st_mode & stat.S_IXGRP)):
            raise DockerRunnerError(
                f"the tasks run as uid {RUNTIME_UID}, which cannot enter {folder} "
                f"({stat.filemode(st.st_mode)}, owner {st.st_uid}) on the way to {path}; "
                f"use a folder others may enter (e.g. under /tmp or /srv) or `chmod o+x {folder}`")


def container_environment(cpus: float) -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    env["OMP_NUM_THREADS"] = str(max(1, int(cpus)))  # as many threads as the task may use
    return env


def network_mode() -> str:
    """``host`` only when a task must reach a service (its 127.0.0.1 test servers here)."""
    return "host" if any(os.environ.get(name) for name in NETWORK_ENV) else "none"


def restricted_run_args(mounts: list[tuple[str, bool]]) -> dict:
    """kfp.local DockerRunner arguments (docker-py ``containers.run``) of a restricted pod."""
    from docker.types import Mount

    return {
        "user": f"{RUNTIME_UID}:{RUNTIME_UID}",
        "read_only": True,
        "tmpfs": {path: TMPFS_OPTIONS for path in WRITABLE_PATHS},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "network_mode": network_mode(),
        "pids_limit": 4096,
        "mounts": [Mount(target=path, source=path, type="bind", read_only=not writable)
                   for path, writable in mounts],
    }


def _start_task_container(limits_by_image: dict[str, Limits], failures: list[str]):
    """kfp.local's ``run_docker_container`` (same signature) with the task's own limits and
    the container's real exit status (it is removed only after ``wait``)."""
    import docker

    def run_container(client, image: str, command: list[str], volumes: dict,
                      **run_args) -> int:
        if image not in limits_by_image:
            raise DockerRunnerError(f"task image {image} is neither the light nor the training image")
        lim = limits_by_image[image]
        print(f"task container: {image} uid {RUNTIME_UID}, read-only root, {lim.cpus:g} CPUs, "
              f"{lim.memory_bytes / 2**30:g} GiB, network {run_args.get('network_mode')}\n")
        run_args["environment"] = {**run_args.get("environment", {}),
                                   "OMP_NUM_THREADS": str(max(1, int(lim.cpus)))}
        container = client.containers.run(image=image, command=command, volumes=volumes,
                                          detach=True, nano_cpus=int(lim.cpus * 1e9),
                                          mem_limit=lim.memory_bytes, memswap_limit=lim.memory_bytes,
                                          **run_args)
        tail: list[str] = []
        try:
            for chunk in container.logs(stream=True, follow=True):
                text = chunk.decode(errors="replace")
                print(text, end="")
                tail = (tail + text.splitlines())[-30:]
            code = int(container.wait()["StatusCode"])
            if code != 0:
                container.reload()
                oom = container.attrs["State"].get("OOMKilled")
                reason = (f"killed at its memory limit of {lim.memory_bytes / 2**30:.1f} GiB" if oom
                          else f"exit status {code}")
                failures.append(f"task container ({image}, uid {RUNTIME_UID}, read-only root) "
                                f"failed: {reason}\n" + "\n".join(tail[-15:]))
            return code
        finally:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)

    return run_container


@contextlib.contextmanager
def docker_session(out: Path, data: str, params: dict, options: PlatformOptions):
    """Set up kfp.local with a restricted DockerRunner for one run under ``out``; yields
    the parameters to run with (local paths made absolute). A failing task raises
    :class:`DockerRunnerError` with the end of its container's log."""
    from kfp import local
    from kfp.local import docker_task_handler

    client = docker_client()
    check_images(client, [options.image, options.gpu_image], source_digest())
    params, mounts = host_mounts(data, params)
    root, workspace = out / "pipeline_root", out / "workspace"
    for folder in (root, workspace):  # the tasks, as uid 10001, create everything below
        folder.mkdir(parents=True, exist_ok=True)
        _give_to_runtime_user(folder)
    for path, _ in [*mounts, (str(root), True)]:
        check_reachable(Path(path))
    light, train = limits(options.light), limits(options.train)
    limits_by_image = {options.image: light, options.gpu_image: train}
    runner = local.DockerRunner(**restricted_run_args(mounts),
                                environment=container_environment(light.cpus))
    local.init(runner=runner, pipeline_root=str(root), workspace_root=str(workspace),
               raise_on_error=True)
    # kfp.local's note that resources are ignored is not true here (_start_task_container)
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    failures: list[str] = []
    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = _start_task_container(limits_by_image, failures)
    try:
        yield params
    except RuntimeError as exc:
        if failures:
            raise DockerRunnerError(f"{exc}: {failures[-1]}") from exc
        raise
    finally:
        docker_task_handler.run_docker_container = original
        client.close()
