"""The same search on a Kubeflow cluster: a Kubeflow Trainer ``OptimizationJob``
(``trainer.kubeflow.org/v1alpha1``) whose trials are TrainJobs running ``triview tune-trial``.

Why an OptimizationJob and not a Katib Experiment: the trials are TrainJobs, the unit the
cluster already schedules training as (a ClusterTrainingRuntime, its GPU quota, Kueue);
the CRD's schema is checked offline, strictly, in the tests; and Katib's own SDK cannot
be installed beside kfp 2.17 (protobuf), while the Trainer's API models can. What it costs:
the controller's first phase offers random search only (no TPE, no pruning), so the cluster
search is a seeded random search over the same space; TPE and pruning are the local
search's.

How a trial learns its parameters and reports its value: the controller sets one
environment variable ``KUBEFLOW_TRAINER_OPT_<name>`` per searched parameter in the trial's
TrainJob; the trial runs the DAG up to the voter (:mod:`triview.tune.runner`) and posts the
objective to the TrainJob's status (``trainerStatus.metrics``) through the Trainer's status
server (``KUBEFLOW_TRAINER_STATUS_URL``, its CA and a projected token), where the
controller reads the last value of the objective's name. The object names Secrets only (the
MinIO credentials are ``secretKeyRef`` by name); no credential is ever written into it.
"""
from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from triview import params as spec
from triview.tune.objective import Objective
from triview.tune.space import Dimension, SearchSpace, SpaceError, parse_space

GROUP, VERSION, KIND = "trainer.kubeflow.org", "v1alpha1", "OptimizationJob"
API_VERSION = f"{GROUP}/{VERSION}"
#: The controller names each trial's parameter ``KUBEFLOW_TRAINER_OPT_<name>``.
ENV_PREFIX = "KUBEFLOW_TRAINER_OPT_"
STATUS_URL, STATUS_CA, STATUS_TOKEN = ("KUBEFLOW_TRAINER_STATUS_URL",
                                       "KUBEFLOW_TRAINER_STATUS_CA_CERT",
                                       "KUBEFLOW_TRAINER_STATUS_TOKEN")
GPU_IMAGE = os.environ.get("TRIVIEW_GPU_IMAGE", "ghcr.io/triview/triview-gpu:0.1.0")
CACHE_DIR = "/var/cache/triview-tune"
#: The most values a grid (a range with a step) may expand to: the CRD's choices limit.
MAX_CHOICES = 100


class ClusterError(ValueError):
    """The OptimizationJob cannot be built, or a trial cannot read or report its values."""


@dataclass
class ClusterOptions:
    """Where and how the trials run."""
    name: str = "triview-tune"
    namespace: str = "triview"
    trials: int = 30
    parallel_trials: int = 1
    image: str = GPU_IMAGE
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    minio_secret: str = "triview-minio"          # Secret with accesskey / secretkey
    s3_endpoint: str = "http://minio-service.kubeflow:9000"
    service_account: str = "triview-pipeline-runner"
    runtime: str = "torch-distributed"           # the ClusterTrainingRuntime of the trials
    cache_pvc: str | None = None                 # a ReadWriteMany claim the trials share


# ----------------------------------------------------------------------------- the object


def _number(value: float | int) -> str:
    return repr(int(value)) if isinstance(value, int) else repr(float(value))


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _grid(d: Dimension) -> list:
    count = int(round((d.high - d.low) / d.step)) + 1
    if count > MAX_CHOICES:
        raise ClusterError(f"{d.name!r}: a step grid of {count} values exceeds the "
                           f"OptimizationJob's {MAX_CHOICES} choices; widen the step")
    return [d.param.type(d.low + k * d.step) for k in range(count)]


def search_parameters(space: SearchSpace) -> list[dict]:
    """``spec.parameters`` of the OptimizationJob: one per dimension of ``space`` (ranges as
    uniform or logUniform of the parameter's type; choices and step grids as categorical)."""
    out = []
    for d in space.dimensions:
        if d.categorical or d.step:
            choices = list(d.choices) if d.categorical else _grid(d)
            body = {"categorical": {"choices": [_text(c) for c in choices]}}
        else:
            kind = "logUniform" if d.log else "uniform"
            body = {kind: {"min": _number(d.low), "max": _number(d.high),
                           "type": "Int" if d.param.type is int else "Float"}}
        out.append({"name": d.name, "searchSpace": body})
    return out


def space_from_parameters(parameters: list[dict]) -> dict:
    """The space file's mapping that ``parameters`` (an OptimizationJob's) describe (step
    grids come back as choices)."""
    mapping = {}
    for p in parameters:
        (kind, body), = p["searchSpace"].items()
        param = spec.PARAMS[p["name"]]
        if kind == "categorical":
            mapping[p["name"]] = {"choices": [param.coerce(c) for c in body["choices"]]}
        else:
            entry = {"low": param.coerce(body["min"]), "high": param.coerce(body["max"])}
            if kind == "logUniform":
                entry["log"] = True
            mapping[p["name"]] = entry
    return mapping


def _trial_args(data: str, space: SearchSpace, objective: Objective, base: dict) -> list[str]:
    defaults = spec.defaults()
    given = [f"{k}={_text(v)}" for k, v in base.items() if v != defaults[k]]
    return (["--data", data, "--objective", objective.name, "--cache", CACHE_DIR,
             "--space-json", json.dumps(space.to_mapping(), sort_keys=True)]
            + [a for pair in given for a in ("--param", pair)])


def train_job_spec(data: str, space: SearchSpace, objective: Objective, base: dict,
                   opts: ClusterOptions) -> dict:
    """The trials' TrainJob spec, built with the Trainer's own API models."""
    from kubeflow_trainer_api import models as m

    from triview.deploy import restricted_container_security, restricted_pod_security

    secret = {k: m.IoK8sApiCoreV1EnvVar(name=env, value_from=m.IoK8sApiCoreV1EnvVarSource(
        secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=opts.minio_secret, key=k)))
        for k, env in (("accesskey", "AWS_ACCESS_KEY_ID"), ("secretkey", "AWS_SECRET_ACCESS_KEY"))}
    env = [*secret.values(), m.IoK8sApiCoreV1EnvVar(name="S3_ENDPOINT", value=opts.s3_endpoint),
           m.IoK8sApiCoreV1EnvVar(name="MPLCONFIGDIR", value="/tmp/matplotlib")]
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    requests = {"cpu": quantity(opts.cpu), "memory": quantity(opts.memory)}
    limits = {**requests, **({"nvidia.com/gpu": quantity(str(opts.gpus))} if opts.gpus else {})}
    trainer = m.TrainerV1alpha1Trainer(
        image=opts.image, command=["triview", "tune-trial"],
        args=_trial_args(data, space, objective, base), env=env, num_nodes=1,
        resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(requests=requests, limits=limits))
    cache = ({"persistentVolumeClaim": {"claimName": opts.cache_pvc}} if opts.cache_pvc
             else {"emptyDir": {}})
    pod = {"serviceAccountName": opts.service_account, "securityContext": restricted_pod_security(),
           "volumes": [{"name": "tune-cache", **cache}, {"name": "tmp", "emptyDir": {}}],
           "containers": [{"name": "node", "securityContext": restricted_container_security(),
                           "volumeMounts": [{"name": "tune-cache", "mountPath": CACHE_DIR},
                                            {"name": "tmp", "mountPath": "/tmp"}]}]}
    patch = {"manager": "triview.io/tune", "trainingRuntimeSpec": {"template": {"spec": {
        "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}}}
    job = m.TrainerV1alpha1TrainJobSpec(runtime_ref=m.TrainerV1alpha1RuntimeRef(name=opts.runtime),
                                        trainer=trainer)
    return {**job.to_dict(), "runtimePatches": [patch]}


def optimization_job(data: str, space: SearchSpace, objective: Objective, base: dict,
                     seed: int, opts: ClusterOptions) -> dict:
    """The OptimizationJob of a search: ``space`` and ``objective`` as the local search has
    them, ``seed`` for the controller's random search, ``base`` (checked values) as every
    trial's fixed parameters."""
    if not 1 <= opts.parallel_trials <= opts.trials <= 100:
        raise ClusterError(f"need 1 <= parallel trials ({opts.parallel_trials}) <= trials "
                           f"({opts.trials}) <= 100 (the OptimizationJob's limits)")
    if not str(data).startswith("s3://"):
        raise ClusterError(f"the trials read the data from MinIO: give --data s3://bucket/prefix, "
                           f"got {data!r}")
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": opts.name, "namespace": opts.namespace,
                         "labels": {"app.kubernetes.io/part-of": "triview"}},
            "spec": {"objectives": [{"metric": objective.name,
                                     "direction": objective.direction.capitalize()}],
                     "searchAlgorithm": {"random": {"seed": seed}},
                     "parameters": search_parameters(space),
                     "numTrials": opts.trials, "parallelTrials": opts.parallel_trials,
                     "trainJobTemplate": {"metadata": {"labels": {
                         "app.kubernetes.io/part-of": "triview"}},
                         "spec": train_job_spec(data, space, objective, base, opts)}}}


def build_job(data: str, space: str, objective: str, seed: int, base: dict,
              opts: ClusterOptions) -> dict:
    """The OptimizationJob for ``triview tune --emit/--apply``: the space (a file or a
    shipped name) checked against the spec as the local search checks it, ``base`` the
    parameters as given (trial values override them)."""
    from triview.tune.objective import get_objective
    from triview.tune.runner import searched_stages
    from triview.tune.space import load_space

    searched = load_space(space, searched_stages())
    checked = spec.validate(base, complete=True)
    return optimization_job(data, searched, get_objective(objective), checked, seed, opts)


def to_yaml(obj: dict) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


# ----------------------------------------------------------------------------- a trial


def assignments(space: SearchSpace, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The trial's parameter values from the controller's environment variables, typed by
    the spec and checked to lie in ``space`` (names as the controller writes them, or in
    upper case)."""
    env = os.environ if env is None else env
    given = {k[len(ENV_PREFIX):]: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    by_name = {n.lower(): n for n in space.names}
    unknown = sorted(k for k in given if k.lower() not in by_name)
    if unknown:
        raise ClusterError(f"the trial was given parameters outside the space: {unknown}")
    values = {by_name[k.lower()]: v for k, v in given.items()}
    missing = sorted(set(space.names) - set(values))
    if missing:
        raise ClusterError(f"no {ENV_PREFIX}<name> value for {', '.join(missing)}: is this "
                           "pod a trial of the OptimizationJob?")
    typed = {}
    for name, text in values.items():
        param = spec.PARAMS[name]
        try:
            typed[name] = param.coerce(param.type(float(text)) if param.type is int else text)
        except (ValueError, spec.ParamError) as exc:
            raise ClusterError(f"{ENV_PREFIX}{name}={text!r}: {exc}") from None
    try:
        space.check_point(typed, "the controller's value")
    except SpaceError as exc:
        raise ClusterError(str(exc)) from None
    return typed


def status_request(objective: Objective, value: float) -> dict:
    """The body of the status update: the objective as a TrainJob metric (the Trainer's
    own request model)."""
    from kubeflow_trainer_api import models as m

    return m.TrainerV1alpha1UpdateTrainJobStatusRequest(
        trainer_status=m.TrainerV1alpha1TrainerStatus(
            progress_percentage=100, last_updated_time=datetime.now(timezone.utc),
            metrics=[m.TrainerV1alpha1Metric(name=objective.name, value=f"{value:.6f}")])
    ).to_dict()


def report_status(objective: Objective, value: float, env: dict[str, str] | None = None) -> bool:
    """Post the objective to the TrainJob's status; False (and a line on stdout that a log
    collector can read) when the pod has no status server (the TrainJobStatus feature gate
    is off)."""
    env = os.environ if env is None else env
    print(f"{objective.name}={value:.6f}", flush=True)
    url = env.get(STATUS_URL)
    if not url:
        print(f"triview tune-trial: {STATUS_URL} is not set: the objective was only printed "
              "(enable the Trainer's TrainJobStatus feature gate)", file=sys.stderr)
        return False
    with open(env[STATUS_TOKEN]) as fh:
        token = fh.read().strip()
    context = ssl.create_default_context(cafile=env.get(STATUS_CA)) if url.startswith("https") \
        else None
    body = json.dumps(status_request(objective, value), default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:
            answer.read()
    except OSError as exc:
        raise ClusterError(f"the TrainJob status server refused the objective: {exc}") from None
    return True


def trial_space(space_json: str) -> SearchSpace:
    """The space a trial was started with (its ``--space-json``), checked again."""
    from triview.tune.runner import searched_stages

    try:
        return parse_space(json.loads(space_json), searched_stages(), source="--space-json")
    except json.JSONDecodeError as exc:
        raise SpaceError(f"--space-json is not JSON: {exc}") from None


def run_cluster_trial(data: str, space_json: str, objective: Objective, base: dict,
                      cache_dir: str, env: dict[str, str] | None = None, threads: int = 0) -> float:
    """One trial inside its TrainJob: the controller's values over ``base``, the DAG up to
    the voter (reusing what earlier trials left in ``cache_dir`` when it is a shared
    volume), and the objective posted to the TrainJob's status. Returns the objective."""
    from pathlib import Path

    from triview.tune.runner import (StageCache, TrialContext, data_identity, run_trial,
                                     trial_threads)

    space = trial_space(space_json)
    values = spec.validate({**base, **assignments(space, env)}, complete=True)
    cache = Path(cache_dir)
    with trial_threads(cache / "features", threads):
        outcome = run_trial(values, StageCache(cache),
                            TrialContext(data, data_identity(data), cache / "features"))
    value = objective.value(outcome.folder("train-voter"))
    report_status(objective, value, env)
    return value
