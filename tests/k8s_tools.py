"""The Kubernetes tools the manifest and deploy tests run: ``kubectl`` (its built-in
kustomize renders manifests/) or a standalone ``kustomize``, and kubernetes-validate.

Without them those tests skip with the reason; with ``TRIVIEW_REQUIRE_K8S_TOOLS=1`` (set by
.ci/run, which installs them) the same condition fails them: a CI run must not pass by
skipping what it is responsible for.
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest

REQUIRE_ENV = "TRIVIEW_REQUIRE_K8S_TOOLS"


def unavailable(reason: str):
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: .ci/run installs it)", pytrace=False)
    pytest.skip(reason)


def kustomize_cmd(path: Path) -> list[str]:
    """The command that renders the kustomization at ``path`` to standard output."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize", str(path)]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build", str(path)]
    unavailable("neither kubectl nor kustomize is on PATH: cannot render manifests/")


def require_module(name: str):
    """``pytest.importorskip`` that fails instead under ``TRIVIEW_REQUIRE_K8S_TOOLS=1``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"{name} cannot be imported: {exc}")


def strict_schema(schema):
    """The schema with unknown fields refused wherever an object lists its properties
    (what the API server's strict field validation does for structural schemas)."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


def crd_validator(path: Path, version: str, what: str):
    """A strict JSON-schema validator of one version of the CRD at ``path`` (a file of
    ``../shared/schemas``); skips, naming ``what``, when ``../shared`` is absent."""
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    if not path.is_file():
        pytest.skip(f"the {what} CRD schemas are not in {path.parent} (../shared is absent)")
    crd = yaml.safe_load(path.read_text())
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(strict_schema(entry["schema"]["openAPIV3Schema"]))
