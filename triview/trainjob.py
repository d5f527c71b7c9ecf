"""One branch trained on several nodes: a Kubeflow Trainer ``TrainJob``
(``trainer.kubeflow.org/v1alpha1``) on the ``torch-distributed`` runtime, created and awaited
by the train-branch task (``nodes > 1`` on a cluster).

Why a TrainJob and not a wider KFP task: a KFP task is one pod, and DDP inside it covers that
pod's GPUs only. The Trainer is the cluster's engine for multi-node PyTorch: its
``torch-distributed`` runtime starts ``numNodes`` pods with the rendezvous set
(``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ...), which ``torchrun`` reads, under
the GPU quota and queueing (Kueue) the cluster already applies to training.

Each node runs ``torchrun --module triview.stages --trainjob SPEC``
(:func:`triview.stages.train_branch_node`): it downloads the task's input artifacts from
MinIO, trains its ranks of the branch (the same :func:`triview.stages.train_branch_stage`
as one node), and rank 0 uploads the branch's output to the task's output artifact, which the
task then downloads as its own output. The object names Secrets only (the MinIO credentials
are ``secretKeyRef`` by name); no credential is written into it. Its name is a digest of the
run, view and seed, so a retried task finds and awaits the same TrainJob (a server-side
apply) instead of starting a second one.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

GROUP, VERSION, KIND, PLURAL = "trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
GPU_IMAGE = "ghcr.io/triview/triview-gpu:0.1.0"


class TrainJobError(RuntimeError):
    """The TrainJob cannot be built, failed, or did not finish in time."""


@dataclass
class TrainJobOptions:
    """Where and how the nodes run; :meth:`from_env` reads them in the task's pod."""
    namespace: str = "triview"
    image: str = GPU_IMAGE
    gpus: int = 1                        # per node (0: CPU nodes)
    cpu: str = "4"
    memory: str = "16Gi"
    minio_secret: str = "triview-minio"  # Secret with accesskey / secretkey
    s3_endpoint: str = "http://minio-service.kubeflow:9000"
    service_account: str = "triview-pipeline-runner"
    runtime: str = "torch-distributed"
    poll_s: float = 10.0
    timeout_s: float = 6 * 3600.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "TrainJobOptions":
        """``TRIVIEW_TRAINJOB_<FIELD>`` variables over the defaults; the namespace defaults to
        the pod's own, the S3 endpoint to the task's ``S3_ENDPOINT``."""
        env = os.environ if env is None else env
        opts = cls()
        ns_file = Path(SA_NAMESPACE_FILE)
        if ns_file.is_file():
            opts.namespace = ns_file.read_text().strip() or opts.namespace
        if env.get("S3_ENDPOINT"):
            opts.s3_endpoint = env["S3_ENDPOINT"]
        for name, value in ((f, env.get(f"TRIVIEW_TRAINJOB_{f.upper()}")) for f in cls.__dataclass_fields__):
            if value:
                kind = type(getattr(opts, name))
                setattr(opts, name, kind(value))
        return opts


def artifact_location(uri: str) -> str:
    """A KFP artifact URI as a storage location: ``minio://b/k`` and ``s3://b/k`` both read
    through the S3 API; anything else cannot be shared with other pods."""
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://"):]
    if uri.startswith("s3://"):
        return uri
    raise TrainJobError(f"nodes > 1 needs the artifacts in MinIO/S3 (the cluster's pipeline "
                        f"root), got {uri!r}")


def job_name(run_id: str, view: str, seed: int, repeat: bool) -> str:
    """A DNS-1123 name, the same for a retry of the same task."""
    digest = hashlib.blake2b(f"{run_id}|{view}|{seed}|{repeat}".encode(), digest_size=5).hexdigest()
    safe = "".join(c if c.isalnum() else "-" for c in view.lower())[:20].strip("-")
    return f"triview-{safe}-{digest}"


def node_spec(inputs: dict[str, str | None], output: str, view: str, params: dict,
              run_id: str, repeat: bool) -> dict:
    """What every node needs to train its ranks (:func:`triview.stages.train_branch_node`)."""
    return {"inputs": inputs, "output": output, "view": view, "params": params,
            "run_id": run_id, "repeat": repeat}


def train_job(name: str, spec: dict, nodes: int, opts: TrainJobOptions) -> dict:
    """The TrainJob object, built with the Trainer's own API models."""
    from kubeflow_trainer_api import models as m

    from triview.deploy import restricted_container_security, restricted_pod_security

    if nodes < 2:
        raise TrainJobError(f"a TrainJob is for nodes > 1, got {nodes}")
    secret = [m.IoK8sApiCoreV1EnvVar(name=env, value_from=m.IoK8sApiCoreV1EnvVarSource(
        secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=opts.minio_secret, key=k)))
        for k, env in (("accesskey", "AWS_ACCESS_KEY_ID"), ("secretkey", "AWS_SECRET_ACCESS_KEY"))]
    env = [*secret, m.IoK8sApiCoreV1EnvVar(name="S3_ENDPOINT", value=opts.s3_endpoint),
           m.IoK8sApiCoreV1EnvVar(name="MPLCONFIGDIR", value="/tmp/matplotlib")]
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    requests = {"cpu": quantity(opts.cpu), "memory": quantity(opts.memory)}
    limits = {**requests, **({"nvidia.com/gpu": quantity(str(opts.gpus))} if opts.gpus else {})}
    trainer = m.TrainerV1alpha1Trainer(
        image=opts.image, command=["torchrun", "--module", "triview.stages"],
        args=["--trainjob", json.dumps(spec, sort_keys=True)], env=env, num_nodes=nodes,
        num_proc_per_node=max(1, opts.gpus),
        resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(requests=requests, limits=limits))
    pod = {"serviceAccountName": opts.service_account, "securityContext": restricted_pod_security(),
           "volumes": [{"name": "tmp", "emptyDir": {}}],
           "containers": [{"name": "node", "securityContext": restricted_container_security(),
                           "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}]}
    patch = {"manager": "triview.io/train-branch", "trainingRuntimeSpec": {"template": {"spec": {
        "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}}}
    job = m.TrainerV1alpha1TrainJobSpec(runtime_ref=m.TrainerV1alpha1RuntimeRef(name=opts.runtime),
                                        trainer=trainer)
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "namespace": opts.namespace,
                         "labels": {"app.kubernetes.io/part-of": "triview",
                                    "triview.io/view": spec["view"][:63]}},
            "spec": {**job.to_dict(), "runtimePatches": [patch]}}


def finished(obj: dict) -> tuple[bool, str | None]:
    """(done, failure message or None) from a TrainJob's status conditions."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return True, None
        if cond.get("type") == "Failed":
            return True, f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip()
    return False, None


def run(job: dict, api_client=None, opts: TrainJobOptions | None = None, log=print) -> dict:
    """Server-side apply ``job`` (a retry meets the same object) and wait until it completes;
    raise :class:`TrainJobError` when it fails or ``opts.timeout_s`` passes."""
    from kubernetes import dynamic

    from triview.deploy import DeployError, apply, kube_api_client

    opts = opts or TrainJobOptions()
    api_client = api_client or kube_api_client()
    meta = job["metadata"]
    try:
        apply([job], api_client)
    except DeployError as exc:
        raise TrainJobError(str(exc)) from None
    log(f"TrainJob {meta['namespace']}/{meta['name']}: {job['spec']['trainer']['numNodes']} nodes")
    dyn = dynamic.DynamicClient(api_client)
    resource = dyn.resources.get(api_version=API_VERSION, kind=KIND)
    deadline = time.monotonic() + opts.timeout_s
    while True:
        obj = dyn.get(resource, name=meta["name"], namespace=meta["namespace"]).to_dict()
        done, failure = finished(obj)
        if done and failure:
            raise TrainJobError(f"TrainJob {meta['name']} failed: {failure}")
        if done:
            return obj
        if time.monotonic() > deadline:
            raise TrainJobError(f"TrainJob {meta['name']} did not finish within {opts.timeout_s:g} s")
        time.sleep(opts.poll_s)
