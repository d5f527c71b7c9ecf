"""Static checks of the kustomize tree under manifests/ (no cluster, no network).

Every overlay is rendered with ``kubectl kustomize`` (or a standalone ``kustomize``), each
object is validated against the Kubernetes OpenAPI schemas shipped with kubernetes-validate
(strict: unknown fields fail), and the rendered objects are held to the rules the platform
relies on: Pod Security "restricted", least-privilege RBAC, no committed credentials, the
kfp-launcher provider config, the NetworkPolicy paths of the run pods and the dashboard's
metric names. CRD kinds (ServiceMonitor) have no schema there and are checked by hand.
"""
from __future__ import annotations

import copy
import functools
import ipaddress
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from k8s_tools import kustomize_cmd, require_module

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
BASE = "base"
OVERLAYS = ["overlays/gpu-cluster", "overlays/local-kind"]
TARGETS = [BASE, *OVERLAYS]

#: Kubernetes minor version the objects are validated against (kubernetes-validate ships it).
K8S_VERSION = "1.32"
#: Kinds served by CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
             # KServe (components/serving): validated against its CRD in tests/test_deploy.py
             ("serving.kserve.io/v1alpha1", "ServingRuntime")}

NAMESPACE = "triview"
RUNNER_SA = "triview-pipeline-runner"
MINIO_SECRET = "triview-minio"
SECRET_KEYS = {"accesskey", "secretkey"}
#: Label KFP's Argo compiler puts on every pod of a v2 run (Workflow spec.podMetadata).
PIPELINE_POD_LABELS = {"pipelines.kubeflow.org/v2_component": "true"}

WORKLOAD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job",
                  "CronJob", "ReplicationController"}

DASHBOARD_FILE = MANIFESTS / "base" / "grafana" / "triview-dashboard.json"
DASHBOARD_METRICS = [
    "triview_stage_duration_seconds", "triview_items_per_second", "triview_train_loss",
    "triview_val_loss", "triview_val_macro_f1", "triview_test_ensemble_macro_f1",
    "triview_quarantined", "triview_blessed", "triview_champion_macro_f1",
]


# --------------------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=None)
def _render(target: str) -> tuple[dict, ...]:
    proc = subprocess.run(kustomize_cmd(MANIFESTS / target), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"kustomize build {target} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(target: str) -> list[dict]:
    """The rendered objects of one kustomization (a private copy: tests may mutate it)."""
    return copy.deepcopy(list(_render(target)))


def find(docs: list[dict], kind: str, name: str | None = None,
         namespace: str | None = NAMESPACE) -> list[dict]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def one(docs: list[dict], kind: str, name: str, namespace: str | None = NAMESPACE) -> dict:
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind}/{name} in {namespace}, found {len(found)}"
    return found[0]


@pytest.fixture(params=TARGETS)
def target(request) -> str:
    return request.param


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


# --------------------------------------------------------------------------- build + schema

def test_kustomize_builds_and_objects_are_well_formed(target):
    docs = render(target)
    assert docs, f"{target} renders nothing"
    seen = set()
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        meta = doc["metadata"]
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        if doc["kind"] != "Namespace":
            allowed = {NAMESPACE, "kubeflow"} if target.endswith("local-kind") else {NAMESPACE}
            assert meta.get("namespace") in allowed, f"{key} has no/unexpected namespace"
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "triview", key
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
            "Service", "NetworkPolicy"} <= kinds


def test_objects_validate_strictly_against_kubernetes_schemas(target):
    kubernetes_validate = require_module("kubernetes_validate")
    errors, skipped = [], set()
    for doc in render(target):
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            skipped.add((doc["apiVersion"], doc["kind"]))
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} "
                          "(a CRD kind? add it to CRD_KINDS and check it by hand)")
    assert not errors, "\n".join(errors)
    assert skipped <= CRD_KINDS


def test_strict_validation_rejects_unknown_fields():
    """Proof that strict mode is on: a misspelt field must fail, not be ignored."""
    kubernetes_validate = require_module("kubernetes_validate")
    deployment = one(render(BASE), "Deployment", "pushgateway")
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # sic
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- ServiceMonitor (CRD)

SERVICEMONITOR_SPEC_KEYS = {"selector", "namespaceSelector", "endpoints", "jobLabel",
                            "targetLabels", "podTargetLabels", "sampleLimit", "targetLimit",
                            "labelLimit", "attachMetadata", "scrapeProtocols"}
SERVICEMONITOR_ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "interval",
                                "scrapeTimeout", "honorLabels", "honorTimestamps", "params",
                                "relabelings", "metricRelabelings", "tlsConfig",
                                "bearerTokenSecret", "authorization", "basicAuth",
                                "followRedirects", "enableHttp2", "proxyUrl", "oauth2"}


def _selector_matches(selector: dict | None, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels AND matchExpressions)."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@pytest.mark.parametrize("name", [BASE, "overlays/gpu-cluster"])
def test_servicemonitor_structure(name):
    docs = render(name)
    monitor = one(docs, "ServiceMonitor", "pushgateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= SERVICEMONITOR_SPEC_KEYS, set(spec) - SERVICEMONITOR_SPEC_KEYS
    assert NAMESPACE in spec["namespaceSelector"]["matchNames"]
    service = one(docs, "Service", "pushgateway")
    assert spec["selector"].get("matchLabels"), "an empty selector would match every Service"
    assert _selector_matches(spec["selector"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICEMONITOR_ENDPOINT_KEYS, endpoint
        assert endpoint["port"] in port_names
        assert endpoint["honorLabels"] is True, "pushed job/run_id/stage labels must survive"
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    if name.endswith("gpu-cluster"):
        assert monitor["metadata"]["labels"].get("release"), "kube-prometheus-stack selector label"


def test_local_kind_has_no_crd_objects():
    docs = render("overlays/local-kind")
    assert not find(docs, "ServiceMonitor", namespace=None)
    assert not [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]


def test_plain_prometheus_scrape_config(target):
    docs = render(target)
    config = yaml.safe_load(one(docs, "ConfigMap", "prometheus-scrape-triview")["data"]
                            ["triview-pushgateway.yaml"])
    assert isinstance(config, list) and len(config) == 1
    job = config[0]
    assert job["honor_labels"] is True
    url = urlsplit(one(docs, "ConfigMap", "triview-config")["data"]["pushgateway_url"])
    assert job["static_configs"][0]["targets"] == [url.netloc]


# --------------------------------------------------------------------------- Pod Security

def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def image_pinned(image: str) -> bool:
    """A tag other than latest, or a digest."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    return last.split(":", 1)[1] not in ("", "latest")


def pss_violations(doc: dict) -> list[str]:
    """Everything in one workload that breaks PSS restricted or this repo's pod rules."""
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = pod_spec(doc)
    found = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(f"{where}: {flag}")
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            found.append(f"{where}: hostPath volume {volume['name']}")
    if spec.get("automountServiceAccountToken") is not False:
        found.append(f"{where}: service account token mounted (no workload here needs the API)")
    pod_sc = spec.get("securityContext") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or []),
                  *(spec.get("ephemeralContainers") or [])]
    if not containers:
        found.append(f"{where}: no containers")
    for container in containers:
        at = f"{where} container {container['name']}"
        sc = container.get("securityContext") or {}
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{at}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{at}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{at}: seccompProfile {seccomp!r}")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{at}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            found.append(f"{at}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{at}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{at}: adds capabilities {caps['add']}")
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{at}: root filesystem writable")
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if not (resources.get(section) or {}).get(resource):
                    found.append(f"{at}: no {resource} {section[:-1]}")
        if not image_pinned(container.get("image", "")):
            found.append(f"{at}: image {container.get('image')!r} not pinned by tag or digest")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{at}: hostPort {port['hostPort']}")
    return found


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def test_workloads_meet_pod_security_restricted(target):
    docs = render(target)
    checked = workloads(docs)
    assert checked, "no workload rendered"
    problems = [p for doc in checked for p in pss_violations(doc)]
    assert not problems, "\n".join(problems)


def test_pushgateway_probes_image_and_identity(target):
    deployment = one(render(target), "Deployment", "pushgateway")
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    assert container["image"].startswith("prom/pushgateway:v")
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert spec["securityContext"]["runAsUser"] == 65534
    assert spec["serviceAccountName"] != RUNNER_SA
    assert deployment["spec"]["replicas"] == 1, "Pushgateway replicas share no state"


def _mutations():
    def container(d):
        return pod_spec(d)["containers"][0]

    def sc(d):
        return container(d)["securityContext"]

    def clear_seccomp(d):
        sc(d).pop("seccompProfile")
        pod_spec(d)["securityContext"].pop("seccompProfile")

    def clear_non_root(d):
        sc(d).pop("runAsNonRoot")
        pod_spec(d)["securityContext"].pop("runAsNonRoot")

    return {
        "privileged": lambda d: sc(d).update(privileged=True),
        "privilege-escalation": lambda d: sc(d).update(allowPrivilegeEscalation=True),
        "no-drop-all": lambda d: sc(d)["capabilities"].update(drop=[]),
        "add-sys-admin": lambda d: sc(d)["capabilities"].update(add=["SYS_ADMIN"]),
        "root-user": lambda d: sc(d).update(runAsUser=0),
        "no-run-as-non-root": clear_non_root,
        "no-seccomp": clear_seccomp,
        "writable-root": lambda d: sc(d).update(readOnlyRootFilesystem=False),
        "host-network": lambda d: pod_spec(d).update(hostNetwork=True),
        "host-pid": lambda d: pod_spec(d).update(hostPID=True),
        "host-path": lambda d: pod_spec(d)["volumes"].append(
            {"name": "host", "hostPath": {"path": "/var/run"}}),
        "host-port": lambda d: container(d)["ports"][0].update(hostPort=9091),
        "no-memory-limit": lambda d: container(d)["resources"]["limits"].pop("memory"),
        "no-cpu-request": lambda d: container(d)["resources"]["requests"].pop("cpu"),
        "latest-tag": lambda d: container(d).update(image="prom/pushgateway:latest"),
        "no-tag": lambda d: container(d).update(image="prom/pushgateway"),
        "token-mounted": lambda d: pod_spec(d).pop("automountServiceAccountToken"),
        "privileged-init-container": lambda d: pod_spec(d).setdefault("initContainers", []).append(
            {"name": "init", "image": "busybox:1.36", "securityContext": {"privileged": True}}),
    }


@pytest.mark.parametrize("mutation", sorted(_mutations()))
def test_pod_security_policy_catches_violations(mutation):
    deployment = one(render(BASE), "Deployment", "pushgateway")
    assert pss_violations(deployment) == []
    _mutations()[mutation](deployment)
    assert pss_violations(deployment), f"policy missed the {mutation!r} violation"


@pytest.mark.parametrize("image,pinned", [
    ("prom/pushgateway:v1.11.2", True), ("registry:5000/prom/pushgateway:v1", True),
    ("prom/pushgateway@sha256:" + "a" * 64, True), ("prom/pushgateway", False),
    ("prom/pushgateway:latest", False), ("registry:5000/prom/pushgateway", False)])
def test_image_pinning_rule(image, pinned):
    assert image_pinned(image) is pinned


def test_namespace_enforces_restricted_pod_security(target):
    (namespace,) = [d for d in render(target) if d["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted", mode


# --------------------------------------------------------------------------- RBAC

def test_rbac_is_namespaced_and_least_privilege(target):
    docs = render(target)
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = find(docs, "Role", namespace=None)
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in (rule.get(key) or []), f"wildcard in {key}: {rule}"
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
            resources = set(rule["resources"])
            assert not {"pods/exec", "pods/attach", "serviceaccounts/token"} & resources, rule
            if "secrets" in resources:
                assert rule.get("resourceNames"), f"secrets without resourceNames: {rule}"
                assert set(rule["verbs"]) <= {"get"}, rule
    runner = one(docs, "Role", RUNNER_SA)
    secret_rules = [r for r in runner["rules"] if "secrets" in r["resources"]]
    assert [r["resourceNames"] for r in secret_rules] == [[MINIO_SECRET]]
    configmap_rules = [r for r in runner["rules"] if "configmaps" in r["resources"]]
    assert [r["resourceNames"] for r in configmap_rules] == [["kfp-launcher"]]


def test_role_binding_grants_runner_role_to_runner_sa(target):
    docs = render(target)
    binding = one(docs, "RoleBinding", RUNNER_SA)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": RUNNER_SA}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RUNNER_SA,
                                    "namespace": NAMESPACE}]
    runner = one(docs, "ServiceAccount", RUNNER_SA)
    # the KFP driver/launcher build an in-cluster client from the mounted token
    assert runner.get("automountServiceAccountToken", True) is True
    assert one(docs, "ServiceAccount", "pushgateway")["automountServiceAccountToken"] is False


# --------------------------------------------------------------------------- credentials

KNOWN_DEFAULT_CREDENTIALS = re.compile(r"minioadmin|minio123|AKIA[0-9A-Z]{16}|"
                                       r"-----BEGIN [A-Z ]*PRIVATE KEY-----", re.IGNORECASE)
PLACEHOLDER = re.compile(r"^(CHANGE_ME[A-Z_]*)?$")


def _looks_like_secret_token(token: str) -> bool:
    """A long base64/hex-ish token mixing upper, lower and digits (keys, encoded data)."""
    return (len(token) >= 32 and bool(re.fullmatch(r"[A-Za-z0-9+=_-]+", token))
            and bool(re.search(r"[A-Z]", token)) and bool(re.search(r"[a-z]", token))
            and bool(re.search(r"\d", token)))


def credential_findings(name: str, text: str) -> list[str]:
    found = [f"{name}: known credential {m.group(0)!r}"
             for m in KNOWN_DEFAULT_CREDENTIALS.finditer(text)]
    found += [f"{name}: secret-looking token {tok[:8]}..."
              for tok in re.split(r"[^A-Za-z0-9+=_-]", text) if _looks_like_secret_token(tok)]
    if name.endswith((".yaml", ".yml")):
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                found.append(f"{name}: commits a Secret ({doc.get('metadata', {}).get('name')})")
    if ".env" in name:
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                if not PLACEHOLDER.match(value.strip()):
                    found.append(f"{name}: {key.strip()} has a non-placeholder value")
    return found


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*") if p.is_file())


def test_no_credentials_committed_under_manifests():
    files = manifest_files()
    assert files
    problems = [f for path in files
                for f in credential_findings(str(path.relative_to(REPO)), path.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name,text", [
    ("x.yaml", "env:\n  - name: MINIO_ROOT_USER\n    value: minioadmin\n"),
    ("x.yaml", "password: minio123\n"),
    ("x.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {a: Zm9v}\n"),
    ("x.yaml", "key: wJalrXUtnFEMI7K7MDENGbPxRfiCYEXAMPLEKEY0\n"),
    ("x.env", "accesskey=AKIAIOSFODNN7EXAMPLE\nsecretkey=CHANGE_ME\n"),
    ("x.env.example", "accesskey=someone\nsecretkey=CHANGE_ME\n"),
])
def test_credential_scan_catches_leaks(name, text):
    assert credential_findings(name, text)


def test_secret_template_has_placeholders_only():
    example = MANIFESTS / "base" / "minio-credentials.env.example"
    entries = dict(line.split("=", 1) for line in example.read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert set(entries) == SECRET_KEYS
    assert all(value.startswith("CHANGE_ME") for value in entries.values())
    ignore = (MANIFESTS / ".gitignore").read_text().split()
    assert "*.env" in ignore, "filled-in copies must be git-ignored"


def test_no_secret_is_rendered(target):
    docs = render(target)
    assert not find(docs, "Secret", namespace=None), "the Secret is created out of band"
    rendered = yaml.safe_dump_all(docs)
    assert not credential_findings(f"{target} (rendered)", rendered)


# --------------------------------------------------------------------------- kfp-launcher

#: Fields of the KFP launcher provider config (kubeflow/pipelines backend/src/v2/config/s3.go).
PROVIDERS = {"minio", "s3", "gs"}
PROVIDER_KEYS = {"default", "overrides", "Overrides"}
DEFAULT_KEYS = {"endpoint", "credentials", "region", "disableSSL", "forcePathStyle",
                "maxRetries"}
CREDENTIAL_KEYS = {"fromEnv", "secretRef"}
SECRET_REF_KEYS = {"secretName", "accessKeyKey", "secretKeyKey"}


def launcher_config(docs: list[dict]) -> tuple[str, dict]:
    data = one(docs, "ConfigMap", "kfp-launcher")["data"]
    assert set(data) <= {"defaultPipelineRoot", "providers"}, set(data)
    return data["defaultPipelineRoot"], yaml.safe_load(data["providers"])


def test_kfp_launcher_points_minio_at_the_triview_secret(target):
    docs = render(target)
    root, providers = launcher_config(docs)
    assert re.fullmatch(r"minio://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[\w./-]+)?", root), root
    assert set(providers) <= PROVIDERS
    minio = providers["minio"]
    assert set(minio) <= PROVIDER_KEYS
    default = minio["default"]
    assert set(default) <= DEFAULT_KEYS, set(default) - DEFAULT_KEYS
    assert re.fullmatch(r"[a-z0-9.-]+:\d+", default["endpoint"]), "host:port, no scheme"
    assert isinstance(default.get("disableSSL", False), bool)
    credentials = default["credentials"]
    assert set(credentials) <= CREDENTIAL_KEYS, "credentials only by reference"
    assert credentials["fromEnv"] is False
    secret_ref = credentials["secretRef"]
    assert set(secret_ref) == SECRET_REF_KEYS
    assert secret_ref == {"secretName": MINIO_SECRET, "accessKeyKey": "accesskey",
                          "secretKeyKey": "secretkey"}
    # the S3 settings of every triview-config copy (S3_ENDPOINT, S3_SECURE in the run pods)
    # name the same store, with TLS exactly when the launcher uses it
    for config in find(docs, "ConfigMap", "triview-config", namespace=None):
        assert config["data"]["minio_endpoint"] == default["endpoint"]
        assert config["data"]["s3_secure"] == str(not default.get("disableSSL", False)).lower()


def test_local_kind_uses_kfp_standalone_minio():
    _, providers = launcher_config(render("overlays/local-kind"))
    assert providers["minio"]["default"]["endpoint"] == "minio-service.kubeflow:9000"


def test_manifest_names_match_the_pipeline_code():
    """The compiled pipeline names the Secret, its keys and the ConfigMap: keep them in step."""
    require_module("kfp.kubernetes")
    from pipelines.platform import PlatformOptions

    options = PlatformOptions()
    assert options.minio_secret == MINIO_SECRET
    assert set(options.secret_env) == SECRET_KEYS
    docs = render(BASE)
    assert "pushgateway_url" in one(docs, "ConfigMap", options.config_map)["data"]


# --------------------------------------------------------------------------- network paths

@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class External:
    ip: str


def _peer_matches(peer: dict, policy_namespace: str, other) -> bool:
    if "ipBlock" in peer:
        if not isinstance(other, External):
            return False  # pod IPs are not modelled; ipBlocks only match external addresses
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        return (address in ipaddress.ip_network(block["cidr"])
                and not any(address in ipaddress.ip_network(c) for c in block.get("except", [])))
    if isinstance(other, External):
        return False
    namespace_selector = peer.get("namespaceSelector")
    if namespace_selector is None:
        namespace_ok = other.namespace == policy_namespace
    else:
        namespace_ok = _selector_matches(namespace_selector,
                                         {"kubernetes.io/metadata.name": other.namespace})
    return namespace_ok and _selector_matches(peer.get("podSelector"), other.labels)


def _port_matches(ports: list[dict] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        start = entry.get("port")
        if start is None or start == port or (start <= port <= entry.get("endPort", start)):
            return True
    return False


def _policy_types(policy: dict) -> set[str]:
    spec = policy["spec"]
    return set(spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else [])))


def _direction_allows(policies, direction: str, subject: Pod, other, port: int,
                      protocol: str) -> bool:
    selecting = [p for p in policies
                 if p["metadata"]["namespace"] == subject.namespace
                 and direction in _policy_types(p)
                 and _selector_matches(p["spec"]["podSelector"], subject.labels)]
    if not selecting:
        return True  # no policy isolates the pod in this direction
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selecting:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(peer, policy["metadata"]["namespace"], other)
                                 for peer in peers)) \
                    and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def can_connect(policies: list[dict], source, destination, port: int,
                protocol: str = "TCP") -> bool:
    """Would the NetworkPolicies let ``source`` open ``port`` on ``destination``?"""
    egress = (not isinstance(source, Pod)
              or _direction_allows(policies, "Egress", source, destination, port, protocol))
    ingress = (not isinstance(destination, Pod)
               or _direction_allows(policies, "Ingress", destination, source, port, protocol))
    return egress and ingress


def _service_pod_port(docs: list[dict], service_name: str, port: int) -> tuple[Pod, int]:
    """Follow Service port -> selected Deployment pod and its container port."""
    service = one(docs, "Service", service_name)
    (svc_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    matches = [d for d in find(docs, "Deployment")
               if _selector_matches({"matchLabels": service["spec"]["selector"]},
                                    d["spec"]["template"]["metadata"]["labels"])]
    assert len(matches) == 1, f"Service {service_name} selects {len(matches)} Deployments"
    template = matches[0]["spec"]["template"]
    target = svc_port.get("targetPort", port)
    if isinstance(target, str):
        (target,) = [p["containerPort"] for c in template["spec"]["containers"]
                     for p in c.get("ports", []) if p.get("name") == target]
    return Pod(NAMESPACE, template["metadata"]["labels"]), target


def test_pipeline_pods_reach_the_pushgateway_of_triview_config(target):
    docs = render(target)
    policies = find(docs, "NetworkPolicy")
    url = urlsplit(one(docs, "ConfigMap", "triview-config")["data"]["pushgateway_url"])
    assert url.scheme == "http" and url.port == 9091
    service_name, service_namespace = url.hostname.split(".")[:2]
    assert (service_name, service_namespace) == ("pushgateway", NAMESPACE)
    pushgateway, pod_port = _service_pod_port(docs, service_name, url.port)
    assert pod_port == 9091

    pipeline_pod = Pod(NAMESPACE, dict(PIPELINE_POD_LABELS))
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert can_connect(policies, pipeline_pod, pushgateway, pod_port)
    assert can_connect(policies, prometheus, pushgateway, pod_port)
    # everything else is denied: other pods, other namespaces, other ports
    assert not can_connect(policies, Pod(NAMESPACE, {"app": "other"}), pushgateway, pod_port)
    assert not can_connect(policies, Pod("default", dict(PIPELINE_POD_LABELS)), pushgateway,
                           pod_port)
    assert not can_connect(policies, prometheus, pushgateway, 8080)
    assert not can_connect(policies, External("203.0.113.7"), pushgateway, pod_port)


def test_standalone_kfp_pipeline_pods_reach_the_pushgateway_on_kind():
    docs = render("overlays/local-kind")
    policies = find(docs, "NetworkPolicy")
    pushgateway, port = _service_pod_port(docs, "pushgateway", 9091)
    assert can_connect(policies, Pod("kubeflow", dict(PIPELINE_POD_LABELS)), pushgateway, port)
    assert not can_connect(policies, Pod("kubeflow", {"app": "ml-pipeline"}), pushgateway, port)
    copies = {d["metadata"]["namespace"]: d["data"]
              for d in find(docs, "ConfigMap", "triview-config", namespace=None)}
    assert set(copies) == {NAMESPACE, "kubeflow"}
    assert copies["kubeflow"] == copies[NAMESPACE]


def test_pipeline_pod_egress_is_limited_to_what_a_run_needs(target):
    docs = render(target)
    policies = find(docs, "NetworkPolicy")
    pipeline_pod = Pod(NAMESPACE, dict(PIPELINE_POD_LABELS))
    _, providers = launcher_config(docs)
    minio_host, minio_port = providers["minio"]["default"]["endpoint"].split(":")
    minio = Pod(minio_host.split(".")[1], {"app": "minio"})
    allowed = [
        (Pod("kube-system", {"k8s-app": "kube-dns"}), 53, "UDP"),
        (Pod("kube-system", {"k8s-app": "kube-dns"}), 53, "TCP"),
        (minio, int(minio_port), "TCP"),
        (Pod("kubeflow", {"app": "ml-pipeline"}), 8887, "TCP"),
        (Pod("kubeflow", {"app": "ml-pipeline"}), 8888, "TCP"),
        (Pod("kubeflow", {"component": "metadata-grpc-server"}), 8080, "TCP"),
        (External("10.96.0.1"), 443, "TCP"),  # kube-apiserver
    ]
    for destination, port, protocol in allowed:
        assert can_connect(policies, pipeline_pod, destination, port, protocol), \
            (destination, port, protocol)
    denied = [
        (External("203.0.113.7"), 80, "TCP"),
        (External("203.0.113.7"), 53, "UDP"),        # DNS only via the cluster resolver
        (Pod("kube-system", {"k8s-app": "other"}), 53, "UDP"),
        (Pod("default", {"app": "db"}), 5432, "TCP"),
        (Pod("kubeflow", {"app": "mysql"}), 3306, "TCP"),
    ]
    for destination, port, protocol in denied:
        assert not can_connect(policies, pipeline_pod, destination, port, protocol), \
            (destination, port, protocol)


def test_namespace_default_denies_ingress(target):
    policies = find(render(target), "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] in ({}, None)
            and "Ingress" in _policy_types(p) and not p["spec"].get("ingress")]
    assert deny, "no default-deny ingress policy"
    # a pipeline pod accepts no connections at all
    assert not can_connect(policies, Pod(NAMESPACE, dict(PIPELINE_POD_LABELS)),
                           Pod(NAMESPACE, dict(PIPELINE_POD_LABELS)), 8080)


# --------------------------------------------------------------------------- selectors

def test_selectors_match_their_pods(target):
    docs = render(target)
    for deployment in find(docs, "Deployment"):
        assert _selector_matches(deployment["spec"]["selector"],
                                 deployment["spec"]["template"]["metadata"]["labels"])
    for service in find(docs, "Service"):
        _service_pod_port(docs, service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    for deployment in find(docs, "Deployment"):
        for volume in pod_spec(deployment).get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                one(docs, "PersistentVolumeClaim", claim)


def test_gpu_cluster_places_the_pushgateway_on_the_cpu_pool():
    docs = render("overlays/gpu-cluster")
    spec = pod_spec(one(docs, "Deployment", "pushgateway"))
    assert spec["nodeSelector"] == {"triview.io/pool": "cpu"}
    assert spec["tolerations"]
    data = one(docs, "ConfigMap", "triview-config")["data"]
    assert data["gpu_pool"] == "triview.io/pool=gpu"
    assert data["gpu_toleration"] == "nvidia.com/gpu"
    base_limits = pod_spec(one(render(BASE), "Deployment", "pushgateway"))["containers"][0]
    assert spec["containers"][0]["resources"] != base_limits["resources"]


# --------------------------------------------------------------------------- Grafana

def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def test_grafana_dashboard_queries_the_pipeline_metrics():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert exprs
    for metric in DASHBOARD_METRICS:
        assert any(re.search(rf"\b{metric}\b", e) for e in exprs), f"no panel queries {metric}"
    for expr in exprs:
        assert 'job="triview"' in expr, expr
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "run_id", "stage"} <= variables
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()


def test_grafana_dashboard_configmap(target):
    config_map = one(render(target), "ConfigMap", "grafana-dashboard-triview")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (payload,) = config_map["data"].values()
    assert json.loads(payload) == json.loads(DASHBOARD_FILE.read_text())


def test_dashboard_metric_names_match_what_the_pipeline_pushes():
    """triview/metrics.py derives gauge names from stage records: the dashboard must agree."""
    require_module("prometheus_client")
    from triview import metrics

    record = {"seconds": 2.0, "items_in": 12, "items_out": 10, "counts": {"quarantined": 1},
              "val_macro_f1": 0.5, "ensemble": {"macro_f1": 0.6}}
    pushed = {f"triview_{metrics._label(name)}" for name in metrics.stage_values(record)}
    expected = {"triview_stage_duration_seconds", "triview_items_per_second",
                "triview_quarantined", "triview_val_macro_f1", "triview_test_ensemble_macro_f1"}
    assert expected <= pushed, expected - pushed
    assert metrics.JOB == "triview"


# --------------------------------------------------------------------------- multi-node

def _node_pod_labels() -> dict:
    """The labels of a TrainJob's node pod: the runtime's own (from the Trainer's
    torch-distributed runtime) and those triview.trainjob sets on the pod template."""
    from triview import trainjob as tj

    spec = tj.node_spec({"views": "s3://b/v", "augmented": None, "balance": "s3://b/b"},
                        "s3://b/m", "center", {}, "run-1", False)
    job = tj.train_job("triview-center-0a1b2c3d4e", spec, 2, tj.TrainJobOptions())
    template = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]
    return {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
            "jobset.sigs.k8s.io/jobset-name": "triview-center-0a1b2c3d4e",
            **template["metadata"]["labels"]}


def test_gpu_cluster_lets_the_runner_apply_trainjobs_and_their_nodes_meet():
    """nodes > 1 (triview.trainjob): the runner may apply, read and delete TrainJobs, nothing
    more; the node pods run as an account with no token and reach each other on any port,
    MinIO and DNS, and nothing else; nothing else reaches them."""
    from triview import trainjob as tj

    docs = render("overlays/gpu-cluster")
    role = one(docs, "Role", "triview-trainer")
    assert role["rules"] == [{"apiGroups": [tj.GROUP], "resources": [tj.PLURAL],
                              "verbs": ["get", "create", "patch", "delete"]}]
    binding = one(docs, "RoleBinding", "triview-trainer")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RUNNER_SA, "namespace": NAMESPACE}]
    account = one(docs, "ServiceAccount", tj.TrainJobOptions().service_account)
    assert account["automountServiceAccountToken"] is False
    assert not [b for b in find(docs, "RoleBinding") + find(docs, "ClusterRoleBinding")
                if any(s.get("name") == account["metadata"]["name"] for s in b.get("subjects") or [])]
    policies = find(docs, "NetworkPolicy")
    labels = _node_pod_labels()
    node, other_node = Pod(NAMESPACE, dict(labels)), Pod(NAMESPACE, dict(labels))
    for port in (29400, 29500, 41234):  # the rendezvous store, then NCCL/gloo's own ports
        assert can_connect(policies, node, other_node, port)
    pipeline_pod = Pod(NAMESPACE, dict(PIPELINE_POD_LABELS))
    assert not can_connect(policies, pipeline_pod, node, 29400)
    assert not can_connect(policies, Pod("default", dict(labels)), node, 29400)
    minio = Pod("minio", {"app": "minio"})  # the gpu-cluster overlay's MinIO namespace
    assert can_connect(policies, node, minio, 9000)
    assert can_connect(policies, node, Pod("kube-system", {"k8s-app": "kube-dns"}), 53, "UDP")
    assert not can_connect(policies, node, Pod("kubeflow", {"app": "ml-pipeline"}), 8888)
    assert not can_connect(policies, node, External("203.0.113.7"), 443)
    # a pod of the runtime without triview's label is not let in
    runtime_only = {k: v for k, v in labels.items() if k != tj.NODE_LABEL}
    assert not can_connect(policies, Pod(NAMESPACE, runtime_only), node, 29400)
