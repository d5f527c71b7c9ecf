"""Submit, schedule and list triview runs on a Kubeflow Pipelines cluster with ``kfp.Client``.

Every call compiles the same DAG as ``triview compile`` (``make_pipeline(options)``) to a
temporary IR YAML and hands it to the KFP API; nothing is uploaded to the pipeline registry,
the run (or recurring run) carries the pipeline spec itself.

Connection (``connect``), following kfp's own conventions:

* ``host``: the KFP API endpoint, e.g. ``http://localhost:8080`` after
  ``kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80``, or the Kubeflow gateway URL.
  Without it kfp reads ``KF_PIPELINES_ENDPOINT``; failing that it uses the in-cluster service
  ``ml-pipeline.kubeflow.svc.cluster.local:8888`` (inside a pod, with the pod's projected
  service-account token) or, outside a cluster, the current kubeconfig context through the
  Kubernetes API server's service proxy.
* token: ``token`` or the ``KFP_TOKEN`` environment variable is sent as
  ``Authorization: Bearer ...`` (kfp's ``existing_token``); without one kfp applies its own
  defaults (kubeconfig credentials / in-cluster service-account token; ``KF_PIPELINES_*``
  IAP variables). The token is never printed or logged here.
* ``namespace``: the Kubeflow profile namespace of a multi-user deployment. kfp also uses it
  to find the in-cluster / kube-proxy service when ``host`` is omitted, so a multi-user
  deployment should be reached with an explicit ``host``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import tempfile
import warnings
from pathlib import Path

from pipelines.platform import PlatformOptions, check_pipeline_root  # noqa: F401 (re-export)

DEFAULT_EXPERIMENT = "triview"
DEFAULT_SERVICE_ACCOUNT = "triview-pipeline-runner"  # manifests/base/serviceaccount.yaml
DEFAULT_JOB_NAME = "triview-retrain"
TOKEN_ENV = "KFP_TOKEN"
#: What every recurring run says about itself in the KFP UI.
SCHEDULE_DESCRIPTION = (
    "Scheduled triview retraining (max 1 concurrent run, no catch-up). Every scheduled run goes "
    "through the pipeline's champion/challenger gate: the evaluate/export stage decides "
    "promotion, so a model worse than the current champion is never promoted.")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ClusterError(RuntimeError):
    """The KFP API could not be reached or refused a request."""


@contextlib.contextmanager
def _api_errors():
    """Turn kfp_server_api / urllib3 failures into a short ``ClusterError`` (no headers)."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        body = (exc.body or "").strip() if isinstance(exc.body, str) else ""
        raise ClusterError(f"KFP API answered {exc.status} {exc.reason}"
                           + (f": {body[:500]}" if body else "")) from None
    except urllib3.exceptions.HTTPError as exc:
        raise ClusterError(f"cannot reach the KFP API: {exc}") from None


def connect(host: str | None = None, namespace: str | None = None, token: str | None = None):
    """A ``kfp.Client`` for ``host`` (see the module docstring for the auth conventions)."""
    import kfp

    if host and not re.match(r"https?://", host):
        raise ValueError(f"--host needs a scheme, e.g. http://localhost:8080 (got {host!r})")
    token = token or os.environ.get(TOKEN_ENV) or None
    kwargs = {"host": host, "existing_token": token}
    if namespace:
        kwargs["namespace"] = namespace
    with warnings.catch_warnings(), _api_errors():
        # kfp warns on every construction that it needs KFP >= 2.0.0-beta.2.
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow",
                                category=FutureWarning)
        return kfp.Client(**kwargs)


def check_params(params: dict) -> dict:
    """Reject a missing ``data``, unknown parameters and values the spec does not allow
    (:mod:`triview.params`) before anything is sent; returns them typed."""
    from triview import params as spec

    values = dict(params)
    data = values.pop("data", None)
    if not data:
        raise ValueError("the pipeline needs data=<folder or ZIP of class folders, as the "
                         "ingest pod sees it> (--data)")
    return {"data": data, **spec.validate(values)}


def check_cron(expression: str) -> str:
    """KFP's 6-field cron (``sec min hour day-of-month month day-of-week``), normalised."""
    fields = str(expression).split()
    if len(fields) == 5:
        raise ValueError(
            f"cron {expression!r} has 5 fields (crontab style), but KFP's cron has 6 with "
            f"seconds first: 'sec min hour day-of-month month day-of-week'. "
            f"Prepend '0 ': --cron '0 {' '.join(fields)}'")
    if len(fields) != 6:
        raise ValueError(f"cron {expression!r} has {len(fields)} fields; KFP's cron needs 6: "
                         f"'sec min hour day-of-month month day-of-week', e.g. '0 0 3 * * 0' "
                         f"(Sundays 03:00); for a fixed period use --interval")
    for field_ in fields:
        if not re.fullmatch(r"[0-9A-Za-z*?/,\-]+", field_):
            raise ValueError(f"cron field {field_!r} of {expression!r} is not a cron field")
    return " ".join(fields)


def parse_interval(value: str | int) -> int:
    """Seconds from ``86400``, ``24h``, ``7d``, ``1h30m`` (units s, m, h, d, w)."""
    text = str(value).strip().lower()
    if text.isdigit():
        seconds = int(text)
    elif re.fullmatch(r"(?:\d+\s*[smhdw]\s*)+", text):
        seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)\s*([smhdw])", text))
    else:
        raise ValueError(f"interval {value!r} is not seconds or a duration like 24h, 7d, 1h30m")
    if seconds <= 0:
        raise ValueError(f"interval {value!r} must be positive")
    return seconds


def trigger(cron: str | None = None, interval: str | int | None = None) -> dict:
    """``create_recurring_run`` keyword arguments for exactly one of ``cron`` / ``interval``."""
    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of --cron or --interval")
    if cron is not None:
        return {"cron_expression": check_cron(cron)}
    return {"interval_second": parse_interval(interval)}


@contextlib.contextmanager
def compiled_package(options: PlatformOptions | None = None):
    """Path of a temporary IR YAML of the DAG compiled with ``options``."""
    from pipelines.triview_pipeline import compile_pipeline

    with tempfile.TemporaryDirectory(prefix="triview-kfp-") as tmp:
        path = str(Path(tmp) / "triview.yaml")  # kfp picks the loader by the .yaml suffix
        compile_pipeline(path, options)
        yield path


def _default_run_name() -> str:
    return f"triview {datetime.datetime.now():%Y-%m-%d %H-%M-%S}"


def submit(client, *, params: dict, experiment: str = DEFAULT_EXPERIMENT,
           run_name: str | None = None, pipeline_root: str | None = None,
           namespace: str | None = None, service_account: str | None = DEFAULT_SERVICE_ACCOUNT,
           options: PlatformOptions | None = None, enable_caching: bool | None = None) -> str:
    """Start one run of the DAG in ``experiment`` (created if missing); return its run id.

    ``enable_caching=None`` keeps the compiled per-stage caching (only the data-preparation
    stages are cached); True/False overrides it for every task.
    """
    params = check_params(params)
    pipeline_root = check_pipeline_root(pipeline_root)
    with compiled_package(options) as package, _api_errors():
        # experiment_name: kfp gets the experiment by name or creates it.
        result = client.create_run_from_pipeline_package(
            pipeline_file=package, arguments=params, run_name=run_name or _default_run_name(),
            experiment_name=experiment, namespace=namespace, pipeline_root=pipeline_root,
            enable_caching=enable_caching, service_account=service_account)
    return result.run_id


def schedule(client, *, params: dict, cron: str | None = None, interval: str | int | None = None,
             experiment: str = DEFAULT_EXPERIMENT, job_name: str = DEFAULT_JOB_NAME,
             pipeline_root: str | None = None, namespace: str | None = None,
             service_account: str | None = DEFAULT_SERVICE_ACCOUNT,
             options: PlatformOptions | None = None, enable_caching: bool | None = None,
             description: str = SCHEDULE_DESCRIPTION) -> str:
    """Create a recurring run of the DAG; return its recurring-run id.

    Exactly one of ``cron`` (KFP's 6-field cron, seconds first) or ``interval`` (seconds or
    ``24h`` / ``7d``). At most one run at a time and no catch-up of missed runs. Each run goes
    through the pipeline's champion/challenger gate (see ``SCHEDULE_DESCRIPTION``).
    """
    when = trigger(cron, interval)
    params = check_params(params)
    pipeline_root = check_pipeline_root(pipeline_root)
    with compiled_package(options) as package, _api_errors():
        experiment_id = client.create_experiment(name=experiment,
                                                 namespace=namespace).experiment_id
        recurring = client.create_recurring_run(
            experiment_id=experiment_id, job_name=job_name, description=description,
            max_concurrency=1, no_catchup=True, params=params, pipeline_package_path=package,
            enabled=True, pipeline_root=pipeline_root, enable_caching=enable_caching,
            service_account=service_account, **when)
    return recurring.recurring_run_id


def _when(value) -> datetime.datetime | None:
    """KFP reports an unfinished run's finished_at as the epoch: treat it as missing."""
    if value is None or (isinstance(value, datetime.datetime) and value.year <= 1970):
        return None
    return value


def list_runs(client, *, experiment: str | None = None, namespace: str | None = None,
              limit: int = 20) -> list[dict]:
    """The ``limit`` newest runs (of ``experiment``, if given), newest first."""
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    rows, token = [], ""
    with _api_errors():
        experiment_id = None
        if experiment:
            experiment_id = client.get_experiment(experiment_name=experiment,
                                                  namespace=namespace).experiment_id
        while len(rows) < limit:
            page = client.list_runs(page_token=token, page_size=min(limit - len(rows), 100),
                                    sort_by="created_at desc", experiment_id=experiment_id,
                                    namespace=namespace)
            for run in page.runs or []:
                rows.append({"run_id": run.run_id, "name": run.display_name,
                             "state": run.state or "", "created_at": _when(run.created_at),
                             "finished_at": _when(run.finished_at)})
            token = page.next_page_token
            if not token or not page.runs:
                break
    epoch = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    rows.sort(key=lambda r: _aware(r["created_at"]) or epoch, reverse=True)
    return rows[:limit]


def _aware(value: datetime.datetime | None) -> datetime.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value


def format_runs(rows: list[dict]) -> str:
    """A plain-text table of ``list_runs`` rows."""
    def ts(value):
        return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"

    table = [("RUN ID", "NAME", "STATE", "CREATED", "FINISHED")]
    table += [(r["run_id"] or "", r["name"] or "", r["state"], ts(r["created_at"]),
               ts(r["finished_at"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines) if rows else lines[0] + "\n(no runs)"
