"""One branch trained on several nodes: a Kubeflow Trainer ``TrainJob``
(``trainer.kubeflow.org/v1alpha1``) on the ``torch-distributed`` runtime, created and awaited
by the train-branch task (``nodes > 1`` on a cluster).

Why a TrainJob and not a wider KFP task: a KFP task is one pod, and DDP inside it covers that
pod's GPUs only. The Trainer is the cluster's engine for multi-node PyTorch: its
``torch-distributed`` runtime starts ``numNodes`` pods with the rendezvous set
(``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ...), which ``torchrun`` reads.

Each node runs ``torchrun --module triview.stages --trainjob SPEC``
(:func:`triview.stages.train_branch_node`): it downloads the task's input artifacts from
MinIO, trains its ranks of the branch (the same :func:`triview.stages.train_branch_stage`
as one node), and rank 0 uploads the branch's output to the task's output artifact, which the
task then downloads as its own output. The object names Secrets only (the MinIO credentials
are ``secretKeyRef`` by name); no credential is written into it. Its name is a digest of the
run, view and seed, so a retried task finds and awaits the same TrainJob (a server-side
apply) instead of starting a second one; a TrainJob that *failed* is deleted first, so the
retry trains again. Where the nodes run (image, GPUs, CPU and memory, node pool, toleration,
Secret, deadline) comes from the compile-time platform options through the task's
``TRIVIEW_TRAINJOB_*`` variables (``pipelines/platform.py``), and the task's S3 settings
(endpoint, TLS, region) are passed on. The job carries ``activeDeadlineSeconds``, and the
task deletes it when it gives up waiting or is stopped (SIGTERM), so no abandoned job keeps
its GPUs. Node pods run under their own service account, which has no API rights, and carry
:data:`NODE_LABEL`, which the namespace's NetworkPolicy lets them meet each other by.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GROUP, VERSION, KIND, PLURAL = "trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
GPU_IMAGE = "ghcr.io/triview/triview-gpu:0.1.0"
#: How long before the task pod's timeout the job's deadline and the task's wait end.
WAIT_MARGIN_S = 300
#: The label every node pod carries (the multinode NetworkPolicy selects it).
NODE_LABEL = "triview.io/trainjob-node"
#: The task's S3 settings (not secrets) that the nodes get too (see triview.storage).
S3_SETTINGS = ("S3_VERIFY_TLS", "SSL_CERT_FILE", "AWS_REGION", "AWS_DEFAULT_REGION", "S3_REGION")


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
    service_account: str = "triview-trainjob-node"  # no API rights (manifests: multinode)
    node_selector: str = ""              # LABEL=VALUE of the GPU pool ("" : anywhere)
    toleration: str = ""                 # taint key on those nodes (Exists, NoSchedule)
    runtime: str = "torch-distributed"
    poll_s: float = 10.0
    timeout_s: float = 6 * 3600.0        # also the job's activeDeadlineSeconds
    s3_settings: dict[str, str] = field(default_factory=dict)  # S3_SETTINGS of the task

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "TrainJobOptions":
        """``TRIVIEW_TRAINJOB_<FIELD>`` variables over the defaults; the namespace defaults to
        the pod's own, the S3 endpoint (with its TLS choice) and settings to the task's."""
        env = os.environ if env is None else env
        from triview.storage import S3Config

        opts = cls()
        ns_file = Path(SA_NAMESPACE_FILE)
        if ns_file.is_file():
            opts.namespace = ns_file.read_text().strip() or opts.namespace
        s3 = S3Config.from_env(env)  # the endpoint the task itself uses, whichever variable set it
        opts.s3_endpoint = f"{'https' if s3.secure else 'http'}://{s3.endpoint}"
        opts.s3_settings = {k: env[k] for k in S3_SETTINGS if env.get(k)}
        for name in cls.__dataclass_fields__:
            value = env.get(f"TRIVIEW_TRAINJOB_{name.upper()}")
            if value and name != "s3_settings":
                kind = type(getattr(opts, name))
                try:
                    setattr(opts, name, kind(value))
                except ValueError:
                    raise TrainJobError(f"TRIVIEW_TRAINJOB_{name.upper()}={value!r} is not "
                                        f"a {kind.__name__}") from None
        if opts.node_selector and "=" not in opts.node_selector:
            raise TrainJobError(f"TRIVIEW_TRAINJOB_NODE_SELECTOR must be LABEL=VALUE, "
                                f"got {opts.node_selector!r}")
        return opts

    @staticmethod
    def env_of(*, image: str, gpus: int, cpu: str, memory: str, minio_secret: str,
               node_selector: tuple[str, str] | None, toleration: str | None,
               timeout_s: int) -> dict[str, str]:
        """The ``TRIVIEW_TRAINJOB_*`` variables that carry compile-time platform options
        to the train-branch task (``pipelines/platform.py``)."""
        gpu_nodes = gpus > 0  # the GPU pool and its taint are for GPU nodes only
        # the job's deadline, and the task's wait, end WAIT_MARGIN_S before the task pod's
        # own timeout, so the task is still there to delete the job
        values = {"image": image, "gpus": gpus, "cpu": cpu, "memory": memory,
                  "minio_secret": minio_secret, "timeout_s": max(60, timeout_s - WAIT_MARGIN_S),
                  "node_selector": "=".join(node_selector) if node_selector and gpu_nodes else "",
                  "toleration": toleration if toleration and gpu_nodes else ""}
        return {f"TRIVIEW_TRAINJOB_{k.upper()}": str(v) for k, v in values.items() if v != ""}


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
           *(m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in sorted(opts.s3_settings.items())),
           m.IoK8sApiCoreV1EnvVar(name="MPLCONFIGDIR", value="/tmp/matplotlib"),
           # CPU nodes see no GPU even where the NVIDIA runtime is the node's default
           *([m.IoK8sApiCoreV1EnvVar(name="NVIDIA_VISIBLE_DEVICES", value="void")] if not opts.gpus else [])]
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    requests = {"cpu": quantity(opts.cpu), "memory": quantity(opts.memory)}
    limits = {**requests, **({"nvidia.com/gpu": quantity(str(opts.gpus))} if opts.gpus else {})}
    trainer = m.TrainerV1alpha1Trainer(
        image=opts.image, command=["torchrun", "--module", "triview.stages"],
        args=["--trainjob", json.dumps(spec, sort_keys=True)], env=env, num_nodes=nodes,
        num_proc_per_node=max(1, opts.gpus),
        resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(requests=requests, limits=limits))
    # /dev/shm in memory: DataLoader workers and NCCL between a node's processes need more
    # than the runtime's default 64 MiB
    pod = {"serviceAccountName": opts.service_account, "securityContext": restricted_pod_security(),
           "volumes": [{"name": "tmp", "emptyDir": {}},
                       {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
           "containers": [{"name": "node", "securityContext": restricted_container_security(),
                           "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                            {"name": "dshm", "mountPath": "/dev/shm"}]}]}
    if opts.node_selector:
        key, _, value = opts.node_selector.partition("=")
        pod["nodeSelector"] = {key: value}
    if opts.toleration:
        pod["tolerations"] = [{"key": opts.toleration, "operator": "Exists", "effect": "NoSchedule"}]
    template = {"metadata": {"labels": {NODE_LABEL: "true", "app.kubernetes.io/part-of": "triview"}},
                "spec": pod}
    patch = {"manager": "triview.io/train-branch", "trainingRuntimeSpec": {"template": {"spec": {
        "replicatedJobs": [{"name": "node", "template": {"spec": {"template": template}}}]}}}}
    job = m.TrainerV1alpha1TrainJobSpec(runtime_ref=m.TrainerV1alpha1RuntimeRef(name=opts.runtime),
                                        trainer=trainer)
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "namespace": opts.namespace,
                         "labels": {"app.kubernetes.io/part-of": "triview",
                                    "triview.io/view": spec["view"][:63]}},
            "spec": {**job.to_dict(), "activeDeadlineSeconds": max(1, int(opts.timeout_s)),
                     "runtimePatches": [patch]}}


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
    """Server-side apply ``job`` (a retry meets the same object; one that failed is deleted
    first) and wait until it completes; raise :class:`TrainJobError` when it fails or
    ``opts.timeout_s`` passes. A job this call stops waiting for (timeout, SIGTERM, an error)
    is deleted, so its nodes give their GPUs back."""
    from kubernetes import dynamic

    from triview.deploy import DeployError, apply, kube_api_client

    opts = opts or TrainJobOptions()
    api_client = api_client or kube_api_client()
    meta = job["metadata"]
    dyn = dynamic.DynamicClient(api_client)
    resource = dyn.resources.get(api_version=API_VERSION, kind=KIND)
    old = _get(dyn, resource, meta)
    if old is not None and finished(old)[1]:
        log(f"TrainJob {meta['name']} failed before ({finished(old)[1]}): deleting it to train again")
        _delete(dyn, resource, meta, opts)
    elif old is not None and (old.get("metadata") or {}).get("deletionTimestamp"):
        log(f"TrainJob {meta['name']} is being deleted (an earlier attempt gave up): waiting")
        _wait_gone(dyn, resource, meta, opts)
    try:
        apply([job], api_client)
    except DeployError as exc:
        raise TrainJobError(str(exc)) from None
    log(f"TrainJob {meta['namespace']}/{meta['name']}: {job['spec']['trainer']['numNodes']} nodes")
    done = False
    with _sigterm_as_exit():
        try:
            deadline = time.monotonic() + opts.timeout_s
            while True:
                try:
                    obj = _get(dyn, resource, meta)
                except Exception as exc:  # noqa: BLE001  (an API hiccup is not the job's end)
                    log(f"TrainJob {meta['name']}: cannot read its status ({exc}); trying again")
                    obj = {}
                if obj is None:
                    done = True  # nothing left to delete
                    raise TrainJobError(f"TrainJob {meta['name']} was deleted by someone else "
                                        f"before it finished")
                done, failure = finished(obj)
                if done and failure:
                    raise TrainJobError(f"TrainJob {meta['name']} failed: {failure}")
                if done:
                    return obj
                if time.monotonic() > deadline:
                    raise TrainJobError(f"TrainJob {meta['name']} did not finish within "
                                        f"{opts.timeout_s:g} s (deleted)")
                time.sleep(opts.poll_s)
        finally:
            if not done:
                _delete(dyn, resource, meta, opts, wait=False)


def _get(dyn, resource, meta: dict) -> dict | None:
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        return dyn.get(resource, name=meta["name"], namespace=meta["namespace"]).to_dict()
    except NotFoundError:
        return None


def _delete(dyn, resource, meta: dict, opts: TrainJobOptions, wait: bool = True) -> None:
    """Delete the TrainJob (its pods go with it); with ``wait``, until it is gone."""
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        dyn.delete(resource, name=meta["name"], namespace=meta["namespace"],
                   body={"propagationPolicy": "Foreground"})
    except NotFoundError:
        return
    if wait:
        _wait_gone(dyn, resource, meta, opts)


def _wait_gone(dyn, resource, meta: dict, opts: TrainJobOptions, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while _get(dyn, resource, meta) is not None:
        if time.monotonic() > deadline:
            raise TrainJobError(f"TrainJob {meta['name']} was not deleted within {limit_s:g} s")
        time.sleep(opts.poll_s)


class _sigterm_as_exit:
    """While waiting, SIGTERM (the task stopped: a cancelled run) raises SystemExit, so the
    ``finally`` above deletes the job; only in the main thread, where signals are handled."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False
