"""KServe objects for a registry version, and server-side apply of them.

``inference_service`` is the InferenceService of one exported model version: its predictor
names the ``triview-onnx`` ServingRuntime (``serving_runtime``: the serving image running
``triview serve --model /mnt/models``), ``storageUri`` points at the version in the
registry on MinIO, and KServe's storage initializer fetches it with the service account
``triview-serving`` (``service_account``: the ``serving.kserve.io/s3-*`` annotations and
the out-of-band Secret with the S3 keys). Every container runs with the restricted
security context. ``apply`` sends them with the ``kubernetes`` client as a server-side
apply (PATCH ``application/apply-patch+yaml``, field manager ``triview``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

GROUP = "serving.kserve.io"
ISVC_API = f"{GROUP}/v1beta1"
RUNTIME_API = f"{GROUP}/v1alpha1"
NAMESPACE = "triview"
RUNTIME = "triview-onnx"
MODEL_FORMAT = "triview-onnx"
SERVICE_ACCOUNT = "triview-serving"
#: Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, created out of band (never emitted).
S3_SECRET = "triview-serving-s3"
SERVE_IMAGE = os.environ.get("TRIVIEW_SERVE_IMAGE", "ghcr.io/triview/triview-serve:0.1.0")
#: MinIO as pods see it (the base manifests' kfp-launcher endpoint).
S3_ENDPOINT = "minio-service.kubeflow:9000"
MODEL_DIR = "/mnt/models"   # where KServe's storage initializer puts storageUri
PORT = 8080
UID = 10001                 # the image's user
FIELD_MANAGER = "triview"
PART_OF = {"app.kubernetes.io/part-of": "triview"}


class DeployError(ValueError):
    """The objects cannot be built or applied as asked."""


@dataclass
class ServingOptions:
    """How the predictor runs; the defaults suit the demo ensemble on CPU."""
    image: str = SERVE_IMAGE
    cpu_request: str = "500m"
    cpu_limit: str = "2"
    memory_request: str = "512Mi"
    memory_limit: str = "2Gi"   # the server's 100 MP decoding budget (~1 GB) + the model
    min_replicas: int = 1
    max_replicas: int = 3
    threads: int = 1                          # ONNX Runtime threads per inference
    inference_workers: int = 2                # inferences at once = the CPU limit
    canary_traffic_percent: int | None = None
    max_batch_size: int | None = None         # KServe's batcher (agent sidecar), v1 only
    max_latency_ms: int | None = None
    labels: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.canary_traffic_percent is not None and not 0 <= self.canary_traffic_percent <= 100:
            raise DeployError(f"canary traffic must be 0..100 percent, got {self.canary_traffic_percent}")
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise DeployError(f"replicas: need 0 <= min ({self.min_replicas}) <= max "
                              f"({self.max_replicas}) and max >= 1")
        if ":" not in self.image.rsplit("/", 1)[-1] and "@sha256:" not in self.image \
                or self.image.endswith(":latest"):
            raise DeployError(f"image {self.image!r} must be pinned by a tag or digest (not :latest)")


def restricted_container_security() -> dict:
    """Pod Security "restricted" for a container: non-root, read-only root, no privileges."""
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
            "allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def restricted_pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _resources(opts: ServingOptions) -> dict:
    return {"requests": {"cpu": opts.cpu_request, "memory": opts.memory_request},
            "limits": {"cpu": opts.cpu_limit, "memory": opts.memory_limit}}


def serving_runtime(namespace: str = NAMESPACE, opts: ServingOptions | None = None) -> dict:
    """The ServingRuntime: ``triview serve`` in the serving image for the ``triview-onnx``
    model format (KServe fills ``{{.Name}}`` with the InferenceService name)."""
    opts = opts or ServingOptions()
    return {
        "apiVersion": RUNTIME_API, "kind": "ServingRuntime",
        "metadata": {"name": RUNTIME, "namespace": namespace, "labels": dict(PART_OF)},
        "spec": {
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True}],
            "protocolVersions": ["v1", "v2"],
            "containers": [{
                "name": "kserve-container",
                "image": opts.image,
                "command": ["triview", "serve"],
                "args": ["--model", MODEL_DIR, "--name", "{{.Name}}", "--host", "0.0.0.0",
                         "--port", str(PORT), "--threads", str(opts.threads),
                         "--inference-workers", str(opts.inference_workers)],
                "ports": [{"containerPort": PORT, "protocol": "TCP"}],
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "resources": _resources(opts),
                "securityContext": restricted_container_security(),
            }],
        },
    }


def service_account(namespace: str = NAMESPACE, s3_endpoint: str = S3_ENDPOINT,
                    use_https: bool = False, region: str = "us-east-1") -> dict:
    """The predictor's service account: KServe reads these annotations and the attached
    Secret's keys to configure its storage initializer for MinIO."""
    return {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": SERVICE_ACCOUNT, "namespace": namespace, "labels": dict(PART_OF),
                     "annotations": {f"{GROUP}/s3-endpoint": s3_endpoint,
                                     f"{GROUP}/s3-usehttps": "1" if use_https else "0",
                                     f"{GROUP}/s3-region": region}},
        "secrets": [{"name": S3_SECRET}],
        "automountServiceAccountToken": False,  # the predictor never calls the API
    }


def inference_service(name: str, storage_uri: str, namespace: str = NAMESPACE,
                      opts: ServingOptions | None = None, version: int | None = None) -> dict:
    """The InferenceService serving ``storage_uri`` (an exported model folder on S3)."""
    opts = opts or ServingOptions()
    opts.check()
    if not storage_uri.startswith(("s3://", "pvc://", "gs://", "https://")):
        raise DeployError(f"storageUri {storage_uri!r}: the cluster cannot read a local folder; "
                          "publish to an s3:// registry")
    labels = {**PART_OF, **opts.labels}
    if version is not None:
        labels["triview.io/model-version"] = str(version)
    predictor = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "minReplicas": opts.min_replicas,
        "maxReplicas": opts.max_replicas,
        "securityContext": restricted_pod_security(),
        "model": {
            "modelFormat": {"name": MODEL_FORMAT},
            "runtime": RUNTIME,
            "storageUri": storage_uri,
            "resources": _resources(opts),
            "securityContext": restricted_container_security(),
        },
    }
    if opts.canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = opts.canary_traffic_percent
    if opts.max_batch_size:
        predictor["batcher"] = {"maxBatchSize": opts.max_batch_size,
                                "maxLatency": opts.max_latency_ms or 100}
    return {"apiVersion": ISVC_API, "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"predictor": predictor}}


def registry_storage_uri(spec: str) -> tuple[str, str, int]:
    """``(storageUri, model name, version)`` of ``REGISTRY/<name>@champion|@<version>``."""
    from triview.registry import registry_version

    registry, version = registry_version(spec)
    return registry.uri(version), registry.name, version


def serving_objects(spec: str, name: str | None = None, namespace: str = NAMESPACE,
                    opts: ServingOptions | None = None, isvc_only: bool = False,
                    s3_endpoint: str = S3_ENDPOINT, use_https: bool = False,
                    region: str = "us-east-1") -> list[dict]:
    """ServiceAccount, ServingRuntime and InferenceService for a registry version
    (``isvc_only``: the InferenceService alone, when the ``serving`` kustomize component
    already installed the other two). ``s3_endpoint`` is MinIO as the cluster sees it."""
    uri, model_name, version = registry_storage_uri(spec)
    isvc = inference_service(name or model_name, uri, namespace, opts, version)
    if isvc_only:
        return [isvc]
    return [service_account(namespace, s3_endpoint, use_https, region),
            serving_runtime(namespace, opts), isvc]


def to_yaml(objects: list[dict]) -> str:
    import yaml

    return yaml.safe_dump_all(objects, sort_keys=False)


# ----------------------------------------------------------------------------- apply


def _dynamic(api_client):
    from kubernetes import dynamic

    return dynamic.DynamicClient(api_client)


def kube_api_client(kubeconfig: str | None = None):
    """An API client: in-cluster service account when running in a pod, else the kubeconfig
    (``kubeconfig``, else ``$KUBECONFIG`` as it is now: the kubernetes package reads it once,
    when first imported)."""
    import os

    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG") or None)
    return client.ApiClient()


def apply(objects: list[dict], api_client=None, field_manager: str = FIELD_MANAGER,
          dry_run: bool = False) -> list[dict]:
    """Server-side apply each object (create or update; our fields win conflicts)."""
    from kubernetes.client.exceptions import ApiException

    dyn = _dynamic(api_client or kube_api_client())
    applied = []
    for obj in objects:
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        kwargs = {"dry_run": "All"} if dry_run else {}
        try:
            result = dyn.server_side_apply(resource, body=obj, name=obj["metadata"]["name"],
                                           namespace=obj["metadata"].get("namespace"),
                                           field_manager=field_manager, force_conflicts=True,
                                           **kwargs)
        except ApiException as exc:
            raise DeployError(f"apply {obj['kind']}/{obj['metadata']['name']}: HTTP {exc.status} "
                              f"{exc.reason}: {(exc.body or '')[:300]}") from None
        applied.append(result.to_dict())
    return applied


def wait_ready(name: str, namespace: str = NAMESPACE, api_client=None, timeout_s: float = 600,
               poll_s: float = 5.0) -> dict:
    """Poll the InferenceService until its Ready condition is True; its status then.
    Raises DeployError with the last conditions when ``timeout_s`` passes first."""
    dyn = _dynamic(api_client or kube_api_client())
    resource = dyn.resources.get(api_version=ISVC_API, kind="InferenceService")
    deadline = time.monotonic() + timeout_s
    conditions = []
    while True:
        status = (dyn.get(resource, name=name, namespace=namespace).to_dict().get("status") or {})
        conditions = status.get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return status
        if time.monotonic() >= deadline:
            raise DeployError(f"InferenceService {namespace}/{name} not Ready after {timeout_s:.0f} s: "
                              + "; ".join(f"{c.get('type')}={c.get('status')} {c.get('message', '')}"
                                          for c in conditions))
        time.sleep(poll_s)


def deploy(spec: str, namespace: str = NAMESPACE, name: str | None = None,
           opts: ServingOptions | None = None, api_client=None, wait_s: float = 0.0,
           isvc_only: bool = True, poll_s: float = 5.0) -> dict:
    """Apply the InferenceService of a registry version (``REGISTRY/<name>@champion``;
    with ``isvc_only=False`` also its ServiceAccount and ServingRuntime); with ``wait_s`` > 0
    wait that long for it to be Ready.
    Returns ``{"name", "namespace", "storage_uri", "version", "url", "applied"}``."""
    objects = serving_objects(spec, name, namespace, opts, isvc_only)
    api_client = api_client or kube_api_client()
    applied = apply(objects, api_client)
    isvc = objects[-1]
    out = {"name": isvc["metadata"]["name"], "namespace": namespace,
           "storage_uri": isvc["spec"]["predictor"]["model"]["storageUri"],
           "version": int(isvc["metadata"]["labels"]["triview.io/model-version"]),
           "applied": [f"{o['kind']}/{o['metadata']['name']}" for o in applied], "url": None}
    if wait_s > 0:
        out["url"] = wait_ready(out["name"], namespace, api_client, wait_s, poll_s).get("url")
    return out


def deploy_promoted(export_record: dict, registry: str, model_name: str = "triview",
                    namespace: str = NAMESPACE, image: str = SERVE_IMAGE, wait_s: float = 600.0,
                    api_client=None) -> dict:
    """The pipeline's deploy step: server-side apply the InferenceService of exactly the
    version this run's export promoted (``export_record``: export's stage record; not
    whatever is champion by then) and wait for it to be Ready. When export promoted
    nothing, nothing is applied and the result says why (``skipped``)."""
    if not export_record.get("promoted"):
        return {"deployed": 0, "skipped": export_record.get("refused") or "export promoted no model"}
    spec = f"{registry.rstrip('/')}/{model_name}@{export_record['registry_version']}"
    result = deploy(spec, namespace, opts=ServingOptions(image=image), api_client=api_client,
                    wait_s=wait_s)
    return {"deployed": 1, **result}
