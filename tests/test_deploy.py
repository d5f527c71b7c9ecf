"""`triview deploy` and triview.deploy: the KServe objects of a registry version, checked
against KServe's own CRD schemas (../shared/schemas/kserve, strict: unknown fields fail as
with `kubectl apply --validate=strict`), the `serving` kustomize component, and server-side
apply with the real `kubernetes` client against a stand-in API server on 127.0.0.1 that
records every request."""
from __future__ import annotations

import copy
import functools
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml

from k8s_tools import crd_validator as strict_crd_validator, kustomize_cmd, require_module
from tests.s3_server import BUCKET, moto_server, s3_endpoint  # noqa: F401  (fixtures)
from triview import deploy as dp
from triview.cli import main
from triview.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO.parent / "shared" / "schemas" / "kserve"
CRDS = {"InferenceService": "serving.kserve.io_inferenceservices.yaml",
        "ServingRuntime": "serving.kserve.io_servingruntimes.yaml"}


# --------------------------------------------------------------------------- schemas


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, version: str):
    return strict_crd_validator(SCHEMAS / CRDS[kind], version, "KServe")


def crd_errors(obj: dict) -> list[str]:
    group, _, version = obj["apiVersion"].partition("/")
    assert group == dp.GROUP
    validator = crd_validator(obj["kind"], version)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)]


def _model_folder(tmp_path: Path) -> Path:
    """Enough of an exported model for the registry (deploy reads only the registry)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_card.json").write_text(json.dumps({"name": "triview", "classes": ["a"]}))
    return folder


@pytest.fixture()
def s3_registry(s3_endpoint, tmp_path):  # noqa: F811
    """An s3:// registry with versions 1 and 2 of `digits`; 1 is the champion."""
    location = f"s3://{BUCKET}/registry"
    registry = ModelRegistry(location, "digits")
    folder = _model_folder(tmp_path)
    registry.promote(registry.publish(folder))
    registry.publish(folder)
    return location


def test_inference_service_validates_against_the_kserve_crd(s3_registry):
    opts = dp.ServingOptions(canary_traffic_percent=10, max_batch_size=8, max_latency_ms=50)
    objects = dp.serving_objects(f"{s3_registry}/digits@champion", namespace="ml", opts=opts)
    assert [o["kind"] for o in objects] == ["ServiceAccount", "ServingRuntime", "InferenceService"]
    sa, runtime, isvc = objects
    for obj in (runtime, isvc):
        assert crd_errors(obj) == [], obj["kind"]
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == f"{s3_registry}/models/digits/1"
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"] == dp.RUNTIME
    assert predictor["model"]["modelFormat"]["name"] in \
        [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["batcher"] == {"maxBatchSize": 8, "maxLatency": 50}
    assert predictor["serviceAccountName"] == sa["metadata"]["name"]
    assert isvc["metadata"] == {"name": "digits", "namespace": "ml", "labels": {
        "app.kubernetes.io/part-of": "triview", "triview.io/model-version": "1"}}
    assert predictor["model"]["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    # the MinIO annotations KServe's storage initializer reads, and the Secret's name only
    assert sa["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == dp.S3_ENDPOINT
    assert sa["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "0"
    assert sa["secrets"] == [{"name": dp.S3_SECRET}]
    kubernetes_validate = require_module("kubernetes_validate")
    kubernetes_validate.validate(sa, "1.32", strict=True)


def test_strict_crd_validation_rejects_misspelt_and_mistyped_fields(s3_registry):
    (isvc,) = dp.serving_objects(f"{s3_registry}/digits@2", isvc_only=True)
    assert crd_errors(isvc) == []
    assert isvc["spec"]["predictor"]["model"]["storageUri"].endswith("/models/digits/2")
    for mutate in (lambda o: o["spec"]["predictor"].update(canaryTrafficPercentage=5),
                   lambda o: o["spec"]["predictor"].update(minReplicas="one"),
                   lambda o: o["spec"]["predictor"]["model"]["securityContext"].update(
                       readOnlyRootFS=True)):
        broken = copy.deepcopy(isvc)
        mutate(broken)
        assert crd_errors(broken), "the strict schema missed a bad field"


def _restricted(container_sc: dict, pod_sc: dict | None = None) -> None:
    assert container_sc["runAsNonRoot"] is True and container_sc["runAsUser"] >= 10000
    assert container_sc["allowPrivilegeEscalation"] is False
    assert container_sc["readOnlyRootFilesystem"] is True
    assert container_sc["capabilities"] == {"drop": ["ALL"]}
    assert container_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    if pod_sc is not None:
        assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault"


def test_every_container_runs_restricted():
    isvc = dp.inference_service("digits", "s3://b/r/models/digits/3")
    _restricted(isvc["spec"]["predictor"]["model"]["securityContext"],
                isvc["spec"]["predictor"]["securityContext"])
    (container,) = dp.serving_runtime()["spec"]["containers"]
    _restricted(container["securityContext"])
    assert container["args"][:2] == ["--model", dp.MODEL_DIR]
    assert container["image"].endswith(":0.1.0")


@pytest.mark.parametrize("opts,message", [
    (dp.ServingOptions(canary_traffic_percent=101), "0..100"),
    (dp.ServingOptions(image="ghcr.io/triview/triview-serve:latest"), "pinned"),
    (dp.ServingOptions(image="ghcr.io/triview/triview-serve"), "pinned"),
    (dp.ServingOptions(min_replicas=3, max_replicas=2), "replicas"),
])
def test_bad_options_are_refused(opts, message):
    with pytest.raises(dp.DeployError, match=message):
        dp.inference_service("digits", "s3://b/r/models/digits/1", opts=opts)


def test_cli_emits_the_objects_for_a_registry_version(s3_registry, tmp_path, capsys):
    out = tmp_path / "isvc.yaml"
    assert main(["deploy", "--emit", str(out), "--registry", s3_registry, "--model-name", "digits",
                 "--version", "2", "--namespace", "serving", "--canary-traffic-percent", "20",
                 "--image", "registry.example/triview-serve:1.2.3", "--s3-endpoint",
                 "minio.minio.svc:9000", "--s3-usehttps", "1"]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ServingRuntime", "InferenceService"]
    for doc in docs[1:]:
        assert crd_errors(doc) == []
    isvc = docs[-1]
    assert isvc["metadata"]["namespace"] == "serving"
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"{s3_registry}/models/digits/2"
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert docs[1]["spec"]["containers"][0]["image"] == "registry.example/triview-serve:1.2.3"
    assert docs[0]["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in out.read_text()  # the Secret is never emitted
    assert main(["deploy", "--emit", "-", "--registry", s3_registry, "--model-name", "digits",
                 "--isvc-only"]) == 0
    (only,) = list(yaml.safe_load_all(capsys.readouterr().out))
    assert only["spec"]["predictor"]["model"]["storageUri"].endswith("/models/digits/1")


@pytest.mark.parametrize("argv,message", [
    (["--version", "latest"], "number or 'champion'"),
    (["--version", "9"], "version 9"),
    (["--model-name", "nothing"], "no champion"),
    (["--canary-traffic-percent", "150"], "0..100"),
    ([], "--emit FILE"),
])
def test_cli_errors_are_clear(s3_registry, argv, message, capsys):
    emit = [] if argv == [] else ["--emit", "-"]
    assert main(["deploy", *emit, "--registry", s3_registry, "--model-name", "digits", *argv]) == 2
    assert message in capsys.readouterr().err


def test_deploy_takes_a_run_folder_through_its_summary(s3_registry, tmp_path, capsys):
    """`triview deploy --run OUT` deploys the registry version that run promoted, and says
    why when the run promoted nothing."""
    import json

    run = tmp_path / "run"
    run.mkdir()

    def summary(**export):
        (run / "run_summary.json").write_text(json.dumps({
            "parameters": {"data": "/d", "registry": s3_registry, "model_name": "digits"},
            "export": export}))

    summary(promoted=1, registry_version=2)
    assert main(["deploy", "--emit", "-", "--run", str(run), "--isvc-only"]) == 0
    (isvc,) = list(yaml.safe_load_all(capsys.readouterr().out))
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"{s3_registry}/models/digits/2"
    summary(promoted=0, refused="not promoted: the model is not blessed (below the bar)")
    assert main(["deploy", "--emit", "-", "--run", str(run)]) == 2
    assert "promoted no model" in capsys.readouterr().err
    (run / "run_summary.json").write_text(json.dumps({"parameters": {"data": "/d"},
                                                      "export": {"promoted": 0}}))
    assert main(["deploy", "--emit", "-", "--run", str(run)]) == 2
    assert "--param registry=s3://" in capsys.readouterr().err
    assert main(["deploy", "--emit", "-", "--run", str(run), "--registry", s3_registry]) == 2
    assert "or --run OUT" in capsys.readouterr().err


def test_a_local_registry_cannot_be_served_from(tmp_path, capsys):
    registry = ModelRegistry(str(tmp_path / "reg"), "digits")
    registry.promote(registry.publish(_model_folder(tmp_path)))
    assert main(["deploy", "--emit", "-", "--registry", str(tmp_path / "reg"),
                 "--model-name", "digits"]) == 2
    assert "s3:// registry" in capsys.readouterr().err


# --------------------------------------------------------------------------- kustomize component


def _render(target: str) -> list[dict]:
    proc = subprocess.run(kustomize_cmd(REPO / "manifests" / target),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _one(docs, kind, name):
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module")
def gpu_cluster():
    return _render("overlays/gpu-cluster")


def test_serving_component_matches_the_code_and_the_crds(gpu_cluster):
    runtime = _one(gpu_cluster, "ServingRuntime", dp.RUNTIME)
    assert runtime == dp.serving_runtime()
    assert crd_errors(runtime) == []
    sa = _one(gpu_cluster, "ServiceAccount", dp.SERVICE_ACCOUNT)
    expected = dp.service_account(s3_endpoint="minio.minio.svc.cluster.local:9000", use_https=True)
    assert sa == expected
    # the storage initializer reads the same MinIO the pipeline writes the registry to
    providers = yaml.safe_load(_one(gpu_cluster, "ConfigMap", "kfp-launcher")["data"]["providers"])
    minio = providers["minio"]["default"]
    annotations = sa["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == minio["endpoint"]
    assert annotations["serving.kserve.io/s3-usehttps"] == ("0" if minio["disableSSL"] else "1")
    assert dp.S3_ENDPOINT == yaml.safe_load(_one(_render("base"), "ConfigMap", "kfp-launcher")
                                            ["data"]["providers"])["minio"]["default"]["endpoint"]


def test_serving_component_rbac_lets_the_pipeline_apply_inference_services_only(gpu_cluster):
    role = _one(gpu_cluster, "Role", "triview-deployer")
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                              "verbs": ["get", "create", "patch"]}]
    binding = _one(gpu_cluster, "RoleBinding", "triview-deployer")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "triview-pipeline-runner",
                                    "namespace": "triview"}]
    policy = _one(gpu_cluster, "NetworkPolicy", "predictor-ingress")
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {8080, 8012}


# --------------------------------------------------------------------------- server-side apply


class FakeKubeApi:
    """A stand-in Kubernetes API server: discovery for core/v1 and serving.kserve.io, and
    PATCH / GET / DELETE of namespaced objects, kept in memory. Every request is recorded."""

    RESOURCES = {
        ("", "v1"): [("serviceaccounts", "ServiceAccount")],
        ("serving.kserve.io", "v1beta1"): [("inferenceservices", "InferenceService")],
        ("serving.kserve.io", "v1alpha1"): [("servingruntimes", "ServingRuntime")],
    }

    def __init__(self, ready_after: int = 2, refuse: int | None = None) -> None:
        self.requests: list[dict] = []
        self.objects: dict[str, dict] = {}
        self.ready_after, self.refuse = ready_after, refuse
        self.gets = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(*api.route(self, None))

            def do_PATCH(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(*api.route(self, body))

            do_DELETE = do_PATCH

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, handler, body):
        parts = urlsplit(handler.path)
        record = {"method": handler.command, "path": parts.path, "query": dict(parse_qsl(parts.query)),
                  "content_type": handler.headers.get("Content-Type"),
                  "authorization": handler.headers.get("Authorization"),
                  "body": json.loads(body) if body else None}
        self.requests.append(record)
        path = parts.path
        if path == "/version":
            return 200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            groups = {}
            for (group, version) in self.RESOURCES:
                if group:
                    groups.setdefault(group, []).append({"groupVersion": f"{group}/{version}",
                                                         "version": version})
            return 200, {"kind": "APIGroupList", "groups": [
                {"name": g, "versions": v, "preferredVersion": v[0]} for g, v in groups.items()]}
        for (group, version), resources in self.RESOURCES.items():
            base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
            if path == base:
                return 200, {"kind": "APIResourceList", "groupVersion": f"{group}/{version}".lstrip("/"),
                             "resources": [{"name": plural, "kind": kind, "namespaced": True,
                                            "singularName": "", "verbs": ["get", "patch", "create"]}
                                           for plural, kind in resources]}
        if record["method"] == "PATCH":
            if self.refuse:
                return self.refuse, {"kind": "Status", "status": "Failure", "code": self.refuse,
                                     "reason": "Forbidden", "message": "triview-pipeline-runner "
                                     "cannot patch inferenceservices"}
            obj = {**record["body"]}
            obj["metadata"] = {**obj["metadata"], "resourceVersion": str(len(self.requests))}
            self.objects[path] = obj
            return 200, obj
        if record["method"] == "DELETE" and path in self.objects:
            del self.objects[path]
            return 200, {"kind": "Status", "status": "Success", "code": 200}
        if record["method"] == "GET" and path in self.objects:
            self.gets += 1
            obj = copy.deepcopy(self.objects[path])
            ready = "True" if self.gets >= self.ready_after else "False"
            obj["status"] = {"url": "http://digits.triview.example.com",
                             "conditions": [{"type": "Ready", "status": ready}]}
            return 200, obj
        return 404, {"kind": "Status", "code": 404, "message": f"no route {path}"}

    def of(self, method: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def kube(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the client's discovery cache
    api = FakeKubeApi()
    yield api
    api.close()


def _api_client(host: str):
    from kubernetes import client

    config = client.Configuration()
    config.host = host
    config.api_key = {"authorization": "Bearer tok-test"}
    return client.ApiClient(config)


def test_apply_is_a_server_side_apply_of_each_object(kube, s3_registry):
    objects = dp.serving_objects(f"{s3_registry}/digits@champion")
    applied = dp.apply(objects, _api_client(kube.host))
    patches = kube.of("PATCH")
    assert [p["path"] for p in patches] == [
        "/api/v1/namespaces/triview/serviceaccounts/triview-serving",
        "/apis/serving.kserve.io/v1alpha1/namespaces/triview/servingruntimes/triview-onnx",
        "/apis/serving.kserve.io/v1beta1/namespaces/triview/inferenceservices/digits"]
    for patch, obj in zip(patches, objects):
        assert patch["content_type"] == "application/apply-patch+yaml"
        assert patch["query"] == {"fieldManager": "triview", "force": "True"} or \
            patch["query"] == {"fieldManager": "triview", "force": "true"}
        assert patch["body"] == obj
        assert patch["authorization"] == "Bearer tok-test"
    assert [a["metadata"]["name"] for a in applied] == ["triview-serving", "triview-onnx", "digits"]


def test_deploy_applies_the_champion_and_waits_until_ready(kube, s3_registry):
    result = dp.deploy(f"{s3_registry}/digits@champion", api_client=_api_client(kube.host),
                       wait_s=30, poll_s=0.05, opts=dp.ServingOptions())
    assert result == {"name": "digits", "namespace": "triview",
                      "storage_uri": f"{s3_registry}/models/digits/1", "version": 1,
                      "applied": ["InferenceService/digits"], "url": "http://digits.triview.example.com"}
    assert len(kube.of("PATCH")) == 1
    assert kube.gets >= 2  # polled until Ready


def test_deploy_fails_clearly_when_not_ready_or_refused(kube, s3_registry):
    kube.ready_after = 10 ** 6
    dp.apply(dp.serving_objects(f"{s3_registry}/digits@1", isvc_only=True), _api_client(kube.host))
    with pytest.raises(dp.DeployError, match="not Ready after.*Ready=False"):
        dp.wait_ready("digits", api_client=_api_client(kube.host), timeout_s=0.3, poll_s=0.05)
    kube.refuse = 403
    with pytest.raises(dp.DeployError, match="HTTP 403.*cannot patch"):
        dp.deploy(f"{s3_registry}/digits@champion", api_client=_api_client(kube.host))


def test_deploy_stage_applies_the_version_export_promoted_or_says_why_not(kube, s3_registry,
                                                                         tmp_path, monkeypatch):
    from triview.stages import deploy_stage

    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "stage.json").write_text(json.dumps({"stage": "export", "promoted": 1,
                                                       "registry_version": 2}))
    monkeypatch.setattr(dp.time, "sleep", lambda s: None)
    rec = deploy_stage(export_dir, tmp_path / "deploy", registry=s3_registry, model_name="digits",
                       api_client=_api_client(kube.host), deploy_wait_seconds=30)
    assert rec["deployed"] == 1 and rec["version"] == 2
    assert rec["storage_uri"] == f"{s3_registry}/models/digits/2"  # not the champion (1)
    assert json.loads((tmp_path / "deploy" / "stage.json").read_text())["deployed"] == 1
    (export_dir / "stage.json").write_text(json.dumps({
        "stage": "export", "promoted": 0,
        "refused": "not promoted: the model is not blessed (infra validation failed: ...)"}))
    before = len(kube.of("PATCH"))
    rec = deploy_stage(export_dir, tmp_path / "deploy2", registry=s3_registry, model_name="digits",
                       api_client=_api_client(kube.host))
    assert rec["deployed"] == 0 and "infra validation failed" in rec["skipped"]
    assert len(kube.of("PATCH")) == before  # nothing applied


def test_the_memory_limits_hold_the_servers_decoding_budget():
    """The predictor's memory limit (deploy's default, the flag's and the ServingRuntime's)
    leaves room for --max-server-pixels decoded at once (about 10 bytes a pixel) beside an
    idle server's 500 MB: a pod at its budget is not OOM-killed."""
    import yaml

    from triview.cli import build_parser
    from triview.deploy import ServingOptions
    from triview.serving import MAX_SERVER_PIXELS

    def bytes_of(quantity: str) -> int:
        units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
        return int(quantity[:-2]) * units[quantity[-2:]]

    need = MAX_SERVER_PIXELS * 10 + 500 * 2**20
    runtime = yaml.safe_load((REPO / "manifests/components/serving/servingruntime.yaml").read_text())
    limits = [ServingOptions().memory_limit,
              build_parser().commands()["deploy"].get_default("memory_limit"),
              runtime["spec"]["containers"][0]["resources"]["limits"]["memory"]]
    assert all(bytes_of(q) >= need for q in limits), (limits, need)
