"""``nodes > 1``: a branch trains in a Kubeflow Trainer TrainJob. The object is checked
strictly against the Trainer's CRD; and the whole path runs against a stand-in API server
that does what the Trainer's torch-distributed runtime does with it (one torchrun per node,
the PET_* rendezvous, env from the object with the Secret resolved), with the artifacts in a
real S3 server (moto): two nodes train one branch, rank 0's output comes back to the task."""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import digits_train  # noqa: E402
from s3_server import BUCKET, free_port, moto_server, s3_endpoint  # noqa: E402,F401  (fixtures)

from triview import trainjob as tj  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAINER_SCHEMAS = REPO.parent / "shared" / "schemas" / "trainer"
SPEC = tj.node_spec({"views": "s3://b/views", "augmented": None, "balance": "s3://b/balance"},
                    "s3://b/model", "center", {"epochs": 1, "nodes": 2}, "run-1", False)


@functools.lru_cache(maxsize=None)
def _validator():
    from k8s_tools import crd_validator

    return crd_validator(TRAINER_SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml", "v1alpha1",
                         "Trainer")


def _node_pod(job: dict) -> dict:
    return job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def crd_errors(obj: dict, old: dict | None = None) -> list[str]:
    """Strict schema errors, plus the CRD's CEL rules (x-kubernetes-validations) that the
    schema cannot express: the name's format and length, numProcPerNode >= 1, and on an
    update of ``old`` the fields that are immutable."""
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(obj)]
    name, spec = obj["metadata"]["name"], obj["spec"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63 characters")
    if isinstance(spec["trainer"].get("numProcPerNode"), int) and spec["trainer"]["numProcPerNode"] < 1:
        errors.append("numProcPerNode must be greater than or equal to 1")
    if old is not None:
        for field in ("activeDeadlineSeconds", "runtimeRef", "trainer", "managedBy", "initializer"):
            if spec.get(field) != old["spec"].get(field):
                errors.append(f"spec.{field} is immutable")
        new_pod, old_pod = _node_pod(obj), _node_pod(old)
        for key in ("containers", "securityContext", "serviceAccountName", "volumes"):
            if new_pod.get(key) != old_pod.get(key):
                errors.append(f"the node pod's {key} is immutable")
    return errors


def test_the_trainjob_validates_strictly_and_names_secrets_only(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-me")
    opts = tj.TrainJobOptions(namespace="ml", gpus=2, minio_secret="minio-creds",
                              node_selector="pool=gpu-a100", toleration="nvidia.com/gpu",
                              timeout_s=7200, s3_settings={"S3_VERIFY_TLS": "false", "AWS_REGION": "eu-1"})
    job = tj.train_job("triview-center-0a1b2c3d4e", SPEC, 4, opts)
    assert crd_errors(job) == []
    assert "do-not-leak-me" not in json.dumps(job)
    assert job["metadata"] == {"name": "triview-center-0a1b2c3d4e", "namespace": "ml",
                               "labels": {"app.kubernetes.io/part-of": "triview", "triview.io/view": "center"}}
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 2)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    assert trainer["command"] == ["torchrun", "--module", "triview.stages"]
    assert trainer["args"][0] == "--trainjob" and json.loads(trainer["args"][1]) == SPEC
    env = {e["name"]: e for e in trainer["env"]}
    for var, key in (("AWS_ACCESS_KEY_ID", "accesskey"), ("AWS_SECRET_ACCESS_KEY", "secretkey")):
        assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "minio-creds", "key": key}}}
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "triview-trainjob-node"
    assert pod["nodeSelector"] == {"pool": "gpu-a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    template = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]
    assert template["metadata"]["labels"][tj.NODE_LABEL] == "true"  # the NetworkPolicy's selector
    assert spec["activeDeadlineSeconds"] == 7200
    assert (env["S3_VERIFY_TLS"]["value"], env["AWS_REGION"]["value"]) == ("false", "eu-1")
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert env["S3_ENDPOINT"]["value"] == opts.s3_endpoint
    cpu = tj.train_job("x", SPEC, 2, tj.TrainJobOptions(gpus=0))["spec"]["trainer"]
    assert "nvidia.com/gpu" not in cpu["resourcesPerNode"]["limits"] and cpu["numProcPerNode"] == 1
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in cpu["env"]
    for mutate in (lambda o: o["spec"]["trainer"].update(gpus=1),
                   lambda o: o["spec"]["trainer"].update(numNodes="two"),
                   lambda o: o["spec"].update(runtime={"name": "torch-distributed"})):
        broken = copy.deepcopy(job)
        mutate(broken)
        assert crd_errors(broken), "the strict schema missed a bad field"
    with pytest.raises(tj.TrainJobError, match="nodes > 1"):
        tj.train_job("x", SPEC, 1, opts)
    # a retried task applies the same object again: nothing immutable changes
    assert crd_errors(tj.train_job("triview-center-0a1b2c3d4e", SPEC, 4, opts), old=job) == []
    for mutate in (lambda o: o["spec"]["trainer"].update(numNodes=8),
                   lambda o: _node_pod(o).update(serviceAccountName="other"),
                   lambda o: o["spec"].update(activeDeadlineSeconds=60),
                   lambda o: o["metadata"].update(name="9-" + o["metadata"]["name"]),
                   lambda o: o["spec"]["trainer"].update(numProcPerNode=0)):
        changed = copy.deepcopy(job)
        mutate(changed)
        assert crd_errors(changed, old=job), "a CEL rule was missed"


def test_names_locations_conditions_and_options():
    name = tj.job_name("run-1", "Center View", 0, False)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63  # RFC 1035 (CEL)
    assert name == tj.job_name("run-1", "Center View", 0, False)  # a retry awaits the same job
    assert len({name, tj.job_name("run-2", "Center View", 0, False),
                tj.job_name("run-1", "Center View", 1, False), tj.job_name("run-1", "Center View", 0, True),
                tj.job_name("run-1", "left", 0, False)}) == 5
    assert tj.artifact_location("minio://mlpipeline/v2/a/model") == "s3://mlpipeline/v2/a/model"
    assert tj.artifact_location("s3://b/k") == "s3://b/k"
    for local in ("/minio/mlpipeline/v2/a/model", "gs://b/k"):
        with pytest.raises(tj.TrainJobError, match="MinIO/S3"):
            tj.artifact_location(local)
    assert tj.finished({}) == (False, None)
    assert tj.finished({"status": {"conditions": [{"type": "Complete", "status": "False"}]}}) == (False, None)
    assert tj.finished({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == (True, None)
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimit",
                                         "message": "node 1 exited 1"}]}}
    assert tj.finished(failed) == (True, "BackoffLimit: node 1 exited 1")
    opts = tj.TrainJobOptions.from_env({"S3_ENDPOINT": "http://minio:9000", "TRIVIEW_TRAINJOB_GPUS": "4",
                                        "TRIVIEW_TRAINJOB_IMAGE": "registry.local/triview-gpu:1.2",
                                        "TRIVIEW_TRAINJOB_POLL_S": "0.5", "S3_VERIFY_TLS": "false",
                                        "AWS_SECRET_ACCESS_KEY": "never-forwarded"})
    assert (opts.s3_endpoint, opts.gpus, opts.image, opts.poll_s) == ("http://minio:9000", 4,
                                                                      "registry.local/triview-gpu:1.2", 0.5)
    assert opts.s3_settings == {"S3_VERIFY_TLS": "false"}
    env = tj.TrainJobOptions.env_of(image="r/i:1", gpus=2, cpu="8", memory="32Gi", minio_secret="m",
                                    node_selector=("pool", "gpu"), toleration="gpu", timeout_s=3600)
    back = tj.TrainJobOptions.from_env(env)
    assert (back.image, back.gpus, back.cpu, back.memory, back.minio_secret, back.node_selector,
            back.toleration, back.timeout_s) == ("r/i:1", 2, "8", "32Gi", "m", "pool=gpu", "gpu",
                                                 3600.0 - tj.WAIT_MARGIN_S)
    cpu_nodes = tj.TrainJobOptions.from_env(tj.TrainJobOptions.env_of(
        image="r/i:1", gpus=0, cpu="8", memory="32Gi", minio_secret="m",
        node_selector=("pool", "gpu"), toleration="gpu", timeout_s=3600))
    assert (cpu_nodes.node_selector, cpu_nodes.toleration) == ("", "")  # not on the GPU pool
    # the endpoint the task uses, whichever variable names it, with its TLS choice
    for env in ({"MINIO_ENDPOINT": "minio.minio:9000", "S3_SECURE": "false"},
                {"AWS_ENDPOINT_URL": "http://minio.minio:9000"}):
        assert tj.TrainJobOptions.from_env(env).s3_endpoint == "http://minio.minio:9000"
    assert tj.TrainJobOptions.from_env({"S3_ENDPOINT": "minio.minio:9000"}).s3_endpoint == \
        "https://minio.minio:9000"
    for bad, match in ((("TRIVIEW_TRAINJOB_GPUS", "two"), "not a int"),
                       (("TRIVIEW_TRAINJOB_NODE_SELECTOR", "gpu"), "LABEL=VALUE")):
        with pytest.raises(tj.TrainJobError, match=match):
            tj.TrainJobOptions.from_env(dict([bad]))


def test_without_a_cluster_nodes_train_here_with_a_warning(cropped, augmented, balanced, tmp_path,
                                                           monkeypatch):
    from triview.stages import train_branch_stage

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.warns(RuntimeWarning, match="nodes=2: a TrainJob needs a Kubeflow cluster"):
        rec = train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "m",
                                 **digits_train(epochs=1, nodes=2))
    assert rec["world_size"] == 1
    # on the cluster path, a checkpoint or cache root on the task pod's disk is refused
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    s3_uris = {k: f"minio://mlpipeline/v2/{k}" for k in ("views", "augmented", "balance", "out")}
    for name in ("checkpoint_root", "cache_root"):
        with pytest.raises(tj.TrainJobError, match=f"{name}='/mnt/x' is a path in this pod"):
            train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "r",
                               artifact_uris=s3_uris, **digits_train(epochs=1, nodes=2, **{name: "/mnt/x"}))
    # in a pod, but with the artifacts on the pod's disk (a local pipeline root): the same
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    uris = {k: f"/minio/mlpipeline/v2/{k}" for k in ("views", "augmented", "balance", "out")}
    with pytest.warns(RuntimeWarning, match="MinIO/S3"):
        rec = train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "n",
                                 artifact_uris=uris, **digits_train(epochs=1, nodes=2))
    assert rec["world_size"] == 1


class ScriptedJobs:
    """A stand-in API server whose TrainJob reports the conditions scripted per apply."""

    def __init__(self, monkeypatch, tmp_path, statuses, on_get=None):
        import tempfile

        from tests.test_deploy import FakeKubeApi as Base

        self.statuses = statuses  # one list of conditions per apply; the last one repeats
        self.gets = 0

        outer = self

        class Api(Base):
            RESOURCES = {**Base.RESOURCES, (tj.GROUP, tj.VERSION): [(tj.PLURAL, tj.KIND)]}

            def route(self, handler, body):
                if f"/{tj.PLURAL}/" in handler.path and handler.command == "GET":
                    outer.gets += 1
                    answer = on_get(self, handler.path, outer.gets) if on_get else None
                    if answer is not None:
                        self.requests.append({"method": "GET", "path": handler.path})
                        return answer
                code, obj = super().route(handler, body)
                if f"/{tj.PLURAL}/" in handler.path and handler.command == "GET" and code == 200:
                    applies = len([r for r in self.of("PATCH") if tj.PLURAL in r["path"]])
                    obj["status"] = {"conditions": outer.statuses[min(applies, len(outer.statuses)) - 1]}
                return code, obj

        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        self.api = Api()
        self.client = _api_client(self.api.host)

    def methods(self):
        return [r["method"] for r in self.api.requests if f"/{tj.PLURAL}/" in r["path"]]


def _api_client(host: str):
    from kubernetes import client

    config = client.Configuration()
    config.host = host
    return client.ApiClient(config)


FAILED = [{"type": "Failed", "status": "True", "reason": "NodeFailed", "message": "exit 1"}]
COMPLETE = [{"type": "Complete", "status": "True"}]


def test_a_retry_deletes_a_failed_trainjob_and_trains_again(monkeypatch, tmp_path):
    jobs = ScriptedJobs(monkeypatch, tmp_path, [FAILED, COMPLETE])
    opts = tj.TrainJobOptions(namespace="ml", gpus=0, poll_s=0.05)
    job = tj.train_job("triview-center-0a1b2c3d4e", SPEC, 2, opts)
    with pytest.raises(tj.TrainJobError, match="failed: NodeFailed: exit 1"):
        tj.run(job, jobs.client, opts, log=lambda *_: None)
    assert jobs.methods() == ["GET", "PATCH", "GET"]  # a failed job is left for its logs ...
    done = tj.run(job, jobs.client, opts, log=lambda *_: None)  # ... until the retry
    assert tj.finished(done) == (True, None)
    assert jobs.methods()[3:] == ["GET", "DELETE", "GET", "PATCH", "GET"]
    jobs.api.close()


def test_api_hiccups_are_waited_out_and_a_vanished_job_is_an_error(monkeypatch, tmp_path):
    def flaky(api, path, n):  # the 2nd and 3rd reads fail as an API server restarting would
        return (503, {"kind": "Status", "code": 503, "message": "unavailable"}) if n in (2, 3) else None

    jobs = ScriptedJobs(monkeypatch, tmp_path, [COMPLETE], on_get=flaky)
    opts = tj.TrainJobOptions(namespace="ml", gpus=0, poll_s=0.05)
    job = tj.train_job("triview-center-0a1b2c3d4e", SPEC, 2, opts)
    lines = []
    assert tj.finished(tj.run(job, jobs.client, opts, log=lines.append)) == (True, None)
    assert "DELETE" not in jobs.methods() and any("cannot read its status" in x for x in lines)

    def vanish(api, path, n):  # someone deletes the job while the task waits
        if n == 3:
            api.objects.pop(path, None)
        return None

    gone = ScriptedJobs(monkeypatch, tmp_path, [[]], on_get=vanish)
    with pytest.raises(tj.TrainJobError, match="deleted by someone else"):
        tj.run(job, gone.client, tj.TrainJobOptions(namespace="ml", gpus=0, poll_s=0.05, timeout_s=60),
               log=lambda *_: None)
    jobs.api.close()
    gone.api.close()


def test_a_retry_waits_for_a_job_still_being_deleted(monkeypatch, tmp_path):
    opts = tj.TrainJobOptions(namespace="ml", gpus=0, poll_s=0.05)
    job = tj.train_job("triview-center-0a1b2c3d4e", SPEC, 2, opts)
    path = f"/apis/{tj.GROUP}/{tj.VERSION}/namespaces/ml/{tj.PLURAL}/{job['metadata']['name']}"

    def deleting(api, p, n):  # the earlier attempt's job, going away over two reads
        if n <= 2:
            return 200, {**job, "metadata": {**job["metadata"], "deletionTimestamp": "2026-12-05T00:00:00Z"}}
        return None

    jobs = ScriptedJobs(monkeypatch, tmp_path, [COMPLETE], on_get=deleting)
    lines = []
    tj.run(job, jobs.client, opts, log=lines.append)
    assert jobs.methods()[:4] == ["GET", "GET", "GET", "PATCH"]  # gone before the new apply
    assert any("being deleted" in x for x in lines) and path in jobs.api.objects
    jobs.api.close()


def test_a_trainjob_the_task_stops_waiting_for_is_deleted(monkeypatch, tmp_path):
    jobs = ScriptedJobs(monkeypatch, tmp_path, [[]])  # never finishes
    opts = tj.TrainJobOptions(namespace="ml", gpus=0, poll_s=0.05, timeout_s=0.3)
    job = tj.train_job("triview-center-0a1b2c3d4e", SPEC, 2, opts)
    assert job["spec"]["activeDeadlineSeconds"] == 1  # the cluster ends it even without us
    with pytest.raises(tj.TrainJobError, match="did not finish within 0.3 s"):
        tj.run(job, jobs.client, opts, log=lambda *_: None)
    assert jobs.methods()[0:2] == ["GET", "PATCH"] and jobs.methods()[-1] == "DELETE"
    assert not jobs.api.objects
    jobs.api.close()


# ----------------------------------------------------------------------------- the whole path


class FakeTrainer:
    """What the Trainer does with a TrainJob, on this machine: one torchrun per node with
    the PET_* rendezvous of the torch-distributed runtime, env from the object (Secrets
    resolved from ``secrets``); the job's status says Complete or Failed when they exit."""

    def __init__(self, secrets: dict[str, dict[str, str]]) -> None:
        self.secrets, self.procs, self.logs = secrets, [], []

    def start(self, job: dict) -> None:
        trainer = job["spec"]["trainer"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        for e in trainer["env"]:
            if "valueFrom" in e:
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.secrets[ref["name"]][ref["key"]]
            else:
                env[e["name"]] = e["value"]
        env.pop("KUBERNETES_SERVICE_HOST", None)
        port = free_port()
        assert trainer["command"][0] == "torchrun"
        for rank in range(trainer["numNodes"]):
            node_env = {**env, "PET_NNODES": str(trainer["numNodes"]), "PET_NODE_RANK": str(rank),
                        "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                        "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
                        "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(Path(env.get("TMPDIR", "/tmp")))}
            cmd = [sys.executable, "-m", "torch.distributed.run", *trainer["command"][1:], *trainer["args"]]
            self.procs.append(subprocess.Popen(cmd, env=node_env, cwd=REPO, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True))
        for proc in self.procs:
            threading.Thread(target=lambda p=proc: self.logs.append(p.communicate()[0]), daemon=True).start()

    def status(self) -> dict:
        codes = [p.poll() for p in self.procs]
        if any(c not in (None, 0) for c in codes):
            return {"conditions": [{"type": "Failed", "status": "True", "reason": "NodeFailed",
                                    "message": f"exit codes {codes}"}]}
        if all(c == 0 for c in codes):
            return {"conditions": [{"type": "Complete", "status": "True", "reason": "JobComplete"}]}
        return {"conditions": []}


@pytest.fixture()
def trainer_api(monkeypatch, tmp_path, s3_endpoint):
    import tempfile

    from tests.test_deploy import FakeKubeApi as Base

    trainer = FakeTrainer({"triview-minio": {"accesskey": os.environ["AWS_ACCESS_KEY_ID"],
                                             "secretkey": os.environ["AWS_SECRET_ACCESS_KEY"]}})

    class Api(Base):
        RESOURCES = {**Base.RESOURCES, (tj.GROUP, tj.VERSION): [(tj.PLURAL, tj.KIND)]}

        def route(self, handler, body):
            is_job = f"/apis/{tj.GROUP}/{tj.VERSION}/" in handler.path
            if is_job and handler.command == "GET" and handler.path in self.objects:
                self.requests.append({"method": "GET", "path": handler.path})
                return 200, {**self.objects[handler.path], "status": trainer.status()}
            code, obj = super().route(handler, body)
            if is_job and handler.command == "PATCH" and not trainer.procs:
                trainer.start(obj)
            return code, obj

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the client's discovery cache
    api = Api()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": api.host}}],
        "users": [{"name": "runner", "user": {"token": "tok-runner"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "runner"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # as in a pod (no token file here)
    monkeypatch.setenv("TRIVIEW_TRAINJOB_POLL_S", "0.5")
    monkeypatch.setenv("TRIVIEW_TRAINJOB_GPUS", "0")
    monkeypatch.setenv("TRIVIEW_TRAINJOB_NAMESPACE", "ml")
    yield api, trainer
    for proc in trainer.procs:
        if proc.poll() is None:
            proc.kill()
    api.close()


@pytest.mark.slow
def test_two_nodes_train_one_branch_through_a_trainjob(trainer_api, cropped, augmented, balanced,
                                                       tmp_path, monkeypatch):
    from triview import metrics, storage
    from triview.artifacts import load_predictions
    from triview.stages import train_branch_stage

    api, trainer = trainer_api
    root = f"s3://{BUCKET}/v2/artifacts/run-7"
    uris = {}
    for name, folder in (("views", cropped), ("augmented", augmented), ("balance", balanced)):
        storage.copy_tree(folder, f"{root}/{name}")
        uris[name] = f"minio://{BUCKET}/v2/artifacts/run-7/{name}"  # as KFP names them
    uris["out"] = f"minio://{BUCKET}/v2/artifacts/run-7/model"
    pushed = []  # the nodes cannot reach the Pushgateway: the task pushes their record
    monkeypatch.setattr(metrics, "push", lambda stage, values, run_id, **_: pushed.append((stage, values)))
    rec = train_branch_stage(cropped, augmented, balanced, 1, tmp_path / "model", run_id="run-7",
                             artifact_uris=uris, **digits_train(epochs=1, batch_size=32, nodes=2))
    assert all(p.returncode == 0 for p in trainer.procs), trainer.logs
    (patch,) = [r for r in api.of("PATCH") if tj.PLURAL in r["path"]]
    job = patch["body"]
    assert crd_errors(job) == []
    assert patch["path"] == f"/apis/{tj.GROUP}/{tj.VERSION}/namespaces/ml/{tj.PLURAL}/" \
        + tj.job_name("run-7", "center", 0, False)
    assert patch["content_type"] == "application/apply-patch+yaml"
    assert job["spec"]["trainer"]["numNodes"] == 2
    # rank 0's output, trained by two processes on two "nodes", is the task's output
    assert rec["view"] == "center" and rec["world_size"] == 2
    assert json.loads((tmp_path / "model" / "stage.json").read_text())["world_size"] == 2
    assert load_predictions(tmp_path / "model")["test_prob"].shape[1] == 10
    assert storage.default_store().exists(f"{root}/model/stage.json")
    assert [stage for stage, _ in pushed] == ["train-branch-center"]
    assert pushed[0][1]["stage_duration_seconds"] == rec["seconds"]
