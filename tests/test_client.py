"""`triview submit / schedule / runs` against a stand-in KFP API server, without a network.

A real ``kfp.Client`` (and its generated ``kfp_server_api`` stack: ApiClient, RESTClientObject,
JSON serialisation, auth headers) runs unchanged; only ``urllib3.PoolManager.request``, the
last call before a socket, is replaced by ``FakeKfp``. It records each request (method, path,
query, headers, JSON body) and answers with ``kfp_server_api`` models serialised the way the
server would. ``socket.socket.connect`` is made to fail so any request that slipped past it
would error. kfp's ``Client.__init__`` reads ``~/.config/kfp/context.json`` (redirected to a
missing file) and, without a namespace, calls GET /apis/v2beta1/healthz, which FakeKfp answers.
"""
from __future__ import annotations

import datetime
import json
import logging
import socket
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import kfp
import kfp_server_api
import pytest
import urllib3
import yaml

from pipelines import client as kc
from pipelines.platform import PlatformOptions
from triview.cli import main

HOST = "http://kfp.example.test:8080"
TOKEN = "tok-SeCrEt-0123456789abcdef"
API = "/apis/v2beta1"
STAGES = {"ingest", "calibrate-and-crop", "balance", "augment", "train-branch-view-1",
          "train-branch-view-2", "train-branch-view-3", "train-voter", "evaluate", "export"}
_SERIALISER = kfp_server_api.ApiClient()


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: dict | None


class FakeResponse:
    def __init__(self, status: int, data: bytes):
        self.status, self.reason, self.data = status, "OK" if status < 300 else "Error", data

    def getheaders(self):
        return {"content-type": "application/json"}

    def getheader(self, name, default=None):
        return self.getheaders().get(name.lower(), default)


class FakeKfp:
    """The KFP v2beta1 REST API, as far as these commands use it."""

    def __init__(self, experiments: dict[str, str] | None = None, runs=(), fail: int | None = None):
        self.requests: list[Request] = []
        self.experiments = dict(experiments or {})  # display name -> id
        self.runs = list(runs)
        self.fail = fail

    def __call__(self, pool, method, url, body=None, fields=None, headers=None, **_kw):
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        query.update({k: str(v) for k, v in (fields or [])})
        req = Request(method, parts.path, query, {k.lower(): v for k, v in (headers or {}).items()},
                      json.loads(body) if body else None)
        self.requests.append(req)
        if self.fail:
            return FakeResponse(self.fail, b'{"error": "boom", "code": 13}')
        status, model = self.route(req)
        return FakeResponse(status, json.dumps(_SERIALISER.sanitize_for_serialization(model))
                            .encode())

    def route(self, req: Request):
        m = kfp_server_api
        key = (req.method, req.path)
        if key == ("GET", f"{API}/healthz"):
            return 200, m.V2beta1GetHealthzResponse(multi_user=False)
        if key == ("GET", f"{API}/experiments"):
            wanted = json.loads(req.query["filter"])["predicates"][0]["stringValue"]
            found = [m.V2beta1Experiment(experiment_id=i, display_name=n)
                     for n, i in self.experiments.items() if n == wanted]
            return 200, m.V2beta1ListExperimentsResponse(experiments=found, total_size=len(found))
        if key == ("POST", f"{API}/experiments"):
            name = req.body["display_name"]
            self.experiments[name] = f"exp-{len(self.experiments) + 1}"
            return 200, m.V2beta1Experiment(experiment_id=self.experiments[name],
                                            display_name=name,
                                            namespace=req.body.get("namespace"))
        if key == ("POST", f"{API}/runs"):
            return 200, m.V2beta1Run(run_id="run-42", display_name=req.body["display_name"],
                                     experiment_id=req.body["experiment_id"], state="PENDING")
        if key == ("POST", f"{API}/recurringruns"):
            return 200, m.V2beta1RecurringRun(recurring_run_id="rr-7",
                                              display_name=req.body["display_name"],
                                              mode=req.body["mode"])
        if key == ("GET", f"{API}/runs"):
            size = int(req.query.get("page_size", 10))
            return 200, m.V2beta1ListRunsResponse(runs=self.runs[:size],
                                                  total_size=len(self.runs))
        return 404, {"error": f"no route {key}", "code": 5}

    def of(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if (r.method, r.path) == (method, f"{API}{path}")]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, no user kfp context, no KF_PIPELINES_* / KFP_TOKEN from the environment."""
    def no_connect(*args, **kwargs):
        raise AssertionError("test tried to open a real network connection")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT",
                "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
                "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)


def _install(monkeypatch, fake: FakeKfp) -> FakeKfp:
    # A plain function, so that it binds as a method (pool manager -> first argument).
    def request(pool, method, url, **kwargs):
        return fake(pool, method, url, **kwargs)

    monkeypatch.setattr(urllib3.PoolManager, "request", request)
    return fake


@pytest.fixture()
def server(monkeypatch):
    return _install(monkeypatch, FakeKfp())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """The default DAG compiled once, as kfp puts it in a request body (spec + platform)."""
    from pipelines.triview_pipeline import compile_pipeline

    path = tmp_path_factory.mktemp("ir") / "triview.yaml"
    compile_pipeline(str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    return {"pipeline_spec": spec, "platform_spec": platform}


def _tasks(pipeline_spec: dict) -> dict:
    return pipeline_spec["pipeline_spec"]["root"]["dag"]["tasks"]


def _check_dag(sent: dict):
    assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "triview"
    tasks = _tasks(sent)
    assert len(tasks) == 12  # the ten stages, the repeats condition and the deploy condition
    assert {t["taskInfo"]["name"] for t in tasks.values()} == STAGES | {"repeats", "deploy"}


PARAMS = {"data": "/mnt/data/digits.zip", "epochs": 3, "lr": 0.01, "crop_roi": True,
          "backbone": "resnet18"}


def test_submit_compiles_the_dag_creates_the_experiment_and_starts_a_run(server, compiled):
    client = kc.connect(HOST, token=TOKEN)
    run_id = kc.submit(client, params=PARAMS, run_name="nightly",
                       pipeline_root="minio://triview/runs")
    assert run_id == "run-42"
    # No namespace given: kfp's constructor asks healthz whether KFP is multi-user.
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", f"{API}/healthz"), ("GET", f"{API}/experiments"), ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs")]
    lookup = server.of("GET", "/experiments")[0]
    # kfp sends the filter operation as the enum's number (EQUALS = 1), not its name.
    assert json.loads(lookup.query["filter"])["predicates"][0] == {
        "operation": 1, "key": "display_name", "stringValue": "triview"}
    assert server.of("POST", "/experiments")[0].body["display_name"] == "triview"
    body = server.of("POST", "/runs")[0].body
    assert body["experiment_id"] == "exp-1"
    assert body["display_name"] == "nightly"
    assert body["service_account"] == "triview-pipeline-runner"
    assert body["runtime_config"]["pipeline_root"] == "minio://triview/runs"
    params = body["runtime_config"]["parameters"]
    assert params == PARAMS
    assert [type(params[k]) for k in ("epochs", "lr", "crop_roi", "backbone")] == [
        int, float, bool, str]
    # The spec sent is exactly the compiled DAG, platform spec (kfp-kubernetes) included.
    _check_dag(body["pipeline_spec"])
    assert body["pipeline_spec"] == compiled
    # Compile-time caching kept: only the data-preparation stages are cached.
    cached = {t["taskInfo"]["name"] for t in _tasks(body["pipeline_spec"]).values()
              if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"ingest", "calibrate-and-crop", "balance", "augment"}
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)


def test_submit_reuses_an_existing_experiment_in_the_namespace(monkeypatch, compiled):
    server = _install(monkeypatch, FakeKfp(experiments={"cv-team": "exp-existing"}))
    client = kc.connect(HOST, namespace="alice")
    kc.submit(client, params={"data": "/mnt/d"}, experiment="cv-team", namespace="alice",
              service_account="other-sa")
    # A namespace given: no healthz probe, no experiment created.
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", f"{API}/experiments"), ("POST", f"{API}/runs")]
    assert server.of("GET", "/experiments")[0].query["namespace"] == "alice"
    body = server.of("POST", "/runs")[0].body
    assert body["experiment_id"] == "exp-existing"
    assert body["service_account"] == "other-sa"
    assert body["display_name"].startswith("triview ")
    assert "pipeline_root" not in body["runtime_config"]
    assert body["runtime_config"]["parameters"] == {"data": "/mnt/d"}
    assert all("authorization" not in r.headers for r in server.requests)


def test_cli_submit_applies_cluster_options_params_and_no_cache(server, compiled, capsys):
    rc = main(["submit", "--host", HOST, "--data", "/mnt/d", "--param", "epochs=2",
               "--param", "image-size=48", "--param", "crop_roi=true", "--run-name", "r1",
               "--pipeline-root", "minio://bucket/triview", "--gpus", "2",
               "--gpu-pool", "pool=gpu", "--gpu-toleration", "nvidia.com/gpu",
               "--cpu-pool", "pool=cpu", "--no-cache", "--experiment", "exp-a"])
    out = capsys.readouterr().out
    assert rc == 0 and "submitted run run-42 in experiment 'exp-a'" in out
    body = server.of("POST", "/runs")[0].body
    assert body["runtime_config"]["parameters"] == {"data": "/mnt/d", "epochs": 2,
                                                    "image_size": 48, "crop_roi": True}
    assert body["runtime_config"]["pipeline_root"] == "minio://bucket/triview"
    sent = body["pipeline_spec"]
    _check_dag(sent)
    assert sent != compiled  # compiled with the cluster options, not the defaults
    platform = json.dumps(sent["platform_spec"])
    assert '"pool": "gpu"' in platform and '"pool": "cpu"' in platform
    assert "nvidia.com/gpu" in platform
    accel = [e["container"]["resources"]["accelerator"]
             for e in sent["pipeline_spec"]["deploymentSpec"]["executors"].values()
             if "accelerator" in e["container"].get("resources", {})]
    assert accel and all(str(a.get("resourceCount", a.get("count"))) == "2" for a in accel)
    # --no-cache: enable_caching=False overrides every task.
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in _tasks(sent).values())


def test_schedule_cron_creates_a_recurring_run_one_at_a_time_without_catchup(server, compiled):
    client = kc.connect(HOST, token=TOKEN)
    rr = kc.schedule(client, cron="0 0 3 * * 0", params=PARAMS, experiment="weekly",
                     job_name="triview-weekly", pipeline_root="minio://triview/sched")
    assert rr == "rr-7"
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", f"{API}/healthz"), ("GET", f"{API}/experiments"), ("POST", f"{API}/experiments"),
        ("POST", f"{API}/recurringruns")]
    body = server.of("POST", "/recurringruns")[0].body
    assert body["experiment_id"] == "exp-1"
    assert body["display_name"] == "triview-weekly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
    assert int(body["max_concurrency"]) == 1  # int64: a string in the model, an int on the wire
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["service_account"] == "triview-pipeline-runner"
    assert "champion/challenger" in body["description"]
    assert "never promoted" in body["description"]
    assert body["runtime_config"] == {"pipeline_root": "minio://triview/sched",
                                      "parameters": PARAMS}
    assert body["pipeline_spec"] == compiled


def test_cli_schedule_interval_reuses_the_experiment(monkeypatch, compiled, capsys):
    server = _install(monkeypatch, FakeKfp(experiments={"triview": "exp-9"}))
    rc = main(["schedule", "--host", HOST, "--interval", "7d", "--data", "/mnt/d",
               "--param", "epochs=5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "rr-7" in out and "every 604800 s" in out and "max 1 concurrent run" in out
    assert not server.of("POST", "/experiments")
    body = server.of("POST", "/recurringruns")[0].body
    assert body["experiment_id"] == "exp-9"
    assert body["display_name"] == "triview-retrain"
    assert body["trigger"] == {"periodic_schedule": {"interval_second": 604800}}
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert body["runtime_config"]["parameters"] == {"data": "/mnt/d", "epochs": 5}


def test_five_field_cron_is_a_clear_cli_error_before_any_request(server, capsys):
    rc = main(["schedule", "--host", HOST, "--cron", "0 3 * * 0", "--data", "/mnt/d"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "5 fields" in err and "6" in err and "--cron '0 0 3 * * 0'" in err
    assert server.requests == []


@pytest.mark.parametrize("argv, message", [
    (["schedule", "--cron", "0 0 3 * *  0 2024", "--data", "/d"], "7 fields"),
    (["schedule", "--interval", "fortnight", "--data", "/d"], "not seconds or a duration"),
    (["schedule", "--interval", "0h", "--data", "/d"], "must be positive"),
    (["submit", "--data", "/d", "--param", "epoch=3"], "unknown parameter 'epoch'"),
    (["submit", "--data", "/d", "--param", "epochs=x"], "expects int"),
    (["submit", "--data", "/d", "--pipeline-root", "bucket/path"], "minio://bucket/path"),
    (["submit", "--data", "/d", "--gpu-pool", "gpu"], "LABEL=VALUE"),
    (["runs", "--limit", "0"], "--limit must be at least 1"),
])
def test_bad_arguments_exit_2_with_a_message(server, capsys, argv, message):
    assert main(argv[:1] + ["--host", HOST] + argv[1:]) == 2
    assert message in capsys.readouterr().err
    assert server.requests == []


def test_host_without_scheme_and_cron_plus_interval_are_rejected(server, capsys):
    assert main(["runs", "--host", "localhost:8080"]) == 2
    assert "needs a scheme" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: mutually exclusive
        main(["schedule", "--host", HOST, "--cron", "0 0 3 * * 0", "--interval", "1d",
              "--data", "/d"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="exactly one"):
        kc.trigger()


def test_interval_and_cron_parsing():
    assert kc.parse_interval("24h") == 86400
    assert kc.parse_interval("7d") == 604800
    assert kc.parse_interval("1h30m") == 5400
    assert kc.parse_interval("2w") == 14 * 86400
    assert kc.parse_interval(3600) == 3600
    assert kc.check_cron("  0 0 3  * * 0 ") == "0 0 3 * * 0"
    assert kc.check_cron("0 30 2 ? * MON-FRI") == "0 30 2 ? * MON-FRI"
    with pytest.raises(ValueError, match="--interval"):
        kc.check_cron("@daily")
    from pipelines.platform import options_from_flags

    assert options_from_flags() is None
    assert options_from_flags(gpus=0) == PlatformOptions(gpus=0)


def _run(run_id, minute, state, finished=True):
    t = datetime.datetime(2024, 5, 1, 12, minute, tzinfo=datetime.timezone.utc)
    end = t + datetime.timedelta(minutes=30) if finished else \
        datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return kfp_server_api.V2beta1Run(run_id=run_id, display_name=f"triview {run_id}",
                                     state=state, created_at=t, finished_at=end)


def test_list_runs_asks_for_newest_first_and_reads_the_rows(monkeypatch):
    runs = [_run("b", 20, "RUNNING", finished=False), _run("a", 10, "SUCCEEDED"),
            _run("c", 5, "FAILED")]
    server = _install(monkeypatch, FakeKfp(experiments={"triview": "exp-3"}, runs=runs))
    rows = kc.list_runs(kc.connect(HOST, namespace="alice"), experiment="triview",
                        namespace="alice", limit=5)
    (req,) = server.of("GET", "/runs")
    assert req.query["sort_by"] == "created_at desc"
    assert req.query["page_size"] == "5"
    assert req.query["experiment_id"] == "exp-3"
    assert [r["run_id"] for r in rows] == ["b", "a", "c"]
    assert rows[0]["state"] == "RUNNING" and rows[0]["finished_at"] is None
    assert rows[1]["finished_at"] == datetime.datetime(2024, 5, 1, 12, 40,
                                                       tzinfo=datetime.timezone.utc)
    assert set(rows[0]) == {"run_id", "name", "state", "created_at", "finished_at"}


def test_cli_runs_prints_a_table(monkeypatch, capsys):
    server = _install(monkeypatch, FakeKfp(runs=[_run("r2", 30, "RUNNING", finished=False),
                                                 _run("r1", 0, "SUCCEEDED")]))
    assert main(["runs", "--host", HOST, "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "ID", "NAME", "STATE", "CREATED", "FINISHED"]
    assert lines[1].split()[0] == "r2" and lines[1].rstrip().endswith("-")
    assert "SUCCEEDED" in lines[2] and "2024-05-01 12:30:00" in lines[2]
    (req,) = server.of("GET", "/runs")
    assert req.query["sort_by"] == "created_at desc" and req.query["page_size"] == "2"
    assert "experiment_id" not in req.query


def test_unknown_experiment_in_runs_is_exit_2(monkeypatch, capsys):
    _install(monkeypatch, FakeKfp())
    assert main(["runs", "--host", HOST, "--experiment", "nope"]) == 2
    assert "No experiment is found with name nope" in capsys.readouterr().err


def test_the_token_never_appears_in_output_or_logs(monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    server = _install(monkeypatch, FakeKfp(runs=[_run("r1", 0, "SUCCEEDED")]))
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    assert main(["submit", "--host", HOST, "--data", "/mnt/d"]) == 0
    assert main(["schedule", "--host", HOST, "--cron", "0 0 3 * * 0", "--data", "/mnt/d"]) == 0
    assert main(["runs", "--host", HOST]) == 0
    monkeypatch.delenv("KFP_TOKEN")
    assert main(["runs", "--host", HOST, "--token", TOKEN]) == 0
    # The token did go out, as a bearer header on every request ...
    assert server.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}"
                                   for r in server.requests)
    # ... and an API error is reported without it.
    _install(monkeypatch, FakeKfp(fail=500))
    assert main(["submit", "--host", HOST, "--namespace", "ns", "--token", TOKEN,
                 "--data", "/mnt/d"]) == 1
    captured = capsys.readouterr()
    assert "KFP API answered 500" in captured.err
    for text in (captured.out, captured.err, caplog.text):
        assert TOKEN not in text and TOKEN[4:12] not in text


def test_an_unreachable_kfp_api_exits_1_with_the_reason(capsys, monkeypatch):
    import _socket

    # a real connection attempt, to a loopback port nothing listens on
    monkeypatch.setattr(socket.socket, "connect", _socket.socket.connect)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["runs", "--host", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the KFP API" in err and str(port) in err and "Traceback" not in err
