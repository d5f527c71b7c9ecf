"""`triview serve`: the real KServe ModelServer in the serving environment (.venv-serve),
started as a subprocess on 127.0.0.1 and driven over HTTP. Its answers are compared with
`triview predict --format json`; bad requests must get a 4xx with a message and leave the
server up, also under 1,000 mixed requests at concurrency 8."""
from __future__ import annotations

import base64
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.s3_server import moto_server, s3_endpoint  # noqa: F401  (fixtures)
from tests.test_serving_limits import png_header
from triview import manifest as mf
from triview.serving import protocol
from triview.serving.infra import ServerProcess, blank_png, post_json, request
from conftest import stored_photos

NAME = "digits"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def test_photos(ingested) -> list[Path]:
    """The ingested test photos (what a client would send)."""
    table = mf.read_manifest(ingested)
    return stored_photos(ingested, table.loc[table["split"] == "test", "path"])


@pytest.fixture(scope="module")
def server(exported, serve_python):
    with ServerProcess(str(exported), NAME, python=serve_python) as proc:
        yield proc


@pytest.fixture(scope="module")
def predicted(exported, test_photos) -> dict[str, list[dict]]:
    """`triview predict --format json` on the test photos (the CLI itself): path -> labels."""
    proc = subprocess.run([str(Path(sys.executable).parent / "triview"), "predict", "--model",
                           str(exported), *map(str, test_photos), "--format", "json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {r["path"]: r["labels"] for r in map(json.loads, proc.stdout.strip().splitlines())}


def same_labels(got: list[dict], want: list[dict], tolerance: float = 1e-5) -> bool:
    return ([g["label"] for g in got] == [w["label"] for w in want]
            and all(abs(g["score"] - w["score"]) <= tolerance for g, w in zip(got, want)))


def assert_alive(server) -> None:
    assert server.alive()
    assert request(server.port, "GET", "/v2/health/live")[0] == 200


# --------------------------------------------------------------------------- routes


def test_routes_health_metadata_and_metrics(server, test_photos):
    port = server.port
    assert request(port, "GET", "/v2/health/ready")[0] == 200
    assert request(port, "GET", "/v2/health/live")[0] == 200
    status, body = request(port, "GET", "/v1/models")
    assert status == 200 and json.loads(body) == {"models": [NAME]}
    status, body = request(port, "GET", f"/v1/models/{NAME}")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = request(port, "GET", f"/v2/models/{NAME}/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = request(port, "GET", f"/v2/models/{NAME}")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == NAME
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"predictions": "BYTES",
                                                                   "probabilities": "FP32"}
    assert [o["shape"] for o in meta["outputs"]][1] == [-1, 10]
    status, body = request(port, "GET", "/v2")
    assert status == 200 and json.loads(body)["name"]
    assert request(port, "GET", "/v2/models/nope/ready")[0] == 404
    image = test_photos[0].read_bytes()
    assert post_json(port, "/v1/models/nope:predict", protocol.v1_request([image]))[0] == 404
    assert post_json(port, f"/v1/models/{NAME}:predict", protocol.v1_request([image]))[0] == 200
    status, body = request(port, "GET", "/metrics")
    text = body.decode()
    assert status == 200
    # KServe's own Prometheus histograms, per stage of the request
    for metric in ("request_preprocess_seconds", "request_predict_seconds",
                   "request_postprocess_seconds"):
        assert f'{metric}_count{{model_name="{NAME}"}}' in text, metric


# --------------------------------------------------------------------------- answers


def test_v1_and_v2_answers_equal_triview_predict(server, test_photos, predicted):
    keys = [f"k{i}" for i in range(len(test_photos))]
    for start in range(0, len(test_photos), 16):
        photos = test_photos[start:start + 16]
        images = [p.read_bytes() for p in photos]
        status, v1 = post_json(server.port, f"/v1/models/{NAME}:predict",
                               protocol.v1_request(images, keys[start:start + 16]))
        assert status == 200, v1
        assert [p["key"] for p in v1["predictions"]] == keys[start:start + 16]
        status, v2 = post_json(server.port, f"/v2/models/{NAME}/infer",
                               protocol.v2_request(images, request_id="r1"))
        assert status == 200, v2
        assert v2["id"] == "r1" and v2["model_name"] == NAME
        v2_labels, probabilities = protocol.v2_outputs(v2)
        assert probabilities.shape == (len(photos), 10)
        for photo, a, b, p in zip(photos, protocol.v1_labels(v1), v2_labels, probabilities):
            want = predicted[str(photo)]
            assert same_labels(a, want) and same_labels(b, want), (photo, a, b, want)
            # the best class's probability is its score in the labels
            assert abs(float(p.max()) - want[0]["score"]) <= 1e-5


def test_plain_base64_instances_and_non_json_content_type(server, test_photos, predicted):
    image = test_photos[1].read_bytes()
    text = base64.b64encode(image).decode()
    status, body = request(server.port, "POST", f"/v1/models/{NAME}:predict",
                           json.dumps({"instances": [text, {"b64": text}]}).encode(),
                           {"Content-Type": "text/plain"})  # e.g. curl -d without -H
    assert status == 200
    for p in json.loads(body)["predictions"]:
        assert same_labels(p["labels"], predicted[str(test_photos[1])])


# --------------------------------------------------------------------------- bad requests


def _v2(data, datatype="BYTES", shape=None):
    return {"inputs": [{"name": "image", "datatype": datatype,
                        "shape": shape if shape is not None else [len(data)], "data": data}]}


def bad_requests(good: bytes) -> dict[str, tuple]:
    """name -> (route, body[, headers]): every one must get a 4xx (JSON content type
    unless the headers say otherwise)."""
    b64 = base64.b64encode(good).decode()
    v1 = f"/v1/models/{NAME}:predict"
    v2 = f"/v2/models/{NAME}/infer"

    def dumps(obj) -> bytes:
        return json.dumps(obj).encode()
    return {
        "not-an-image": (v1, dumps(protocol.v1_request([b"hello, I am a text file"]))),
        "truncated-base64": (v1, dumps({"instances": [{"b64": b64[:-3]}]})),
        "truncated-image": (v1, dumps(protocol.v1_request([good[: len(good) // 2]]))),
        "decompression-bomb": (v1, dumps(protocol.v1_request([png_header(20000, 20000)]))),
        "v2-wrong-dtype": (v2, dumps(_v2([1.0, 2.0], "FP32"))),
        "v2-wrong-shape": (v2, dumps(_v2([b64], shape=[2]))),
        "v2-wrong-rank": (v2, dumps(_v2([b64], shape=[1, 3]))),
        "v2-not-an-image": (v2, dumps(_v2([base64.b64encode(b"%PDF-1.4 nope").decode()]))),
        "v2-bomb": (v2, dumps(_v2([base64.b64encode(png_header(20000, 20000)).decode()]))),
        "v1-empty-body": (v1, b""),
        "v2-empty-body": (v2, b""),
        "v1-not-json": (v1, b"{instances: oops"),
        "v1-no-instances": (v1, dumps({"inputs": []})),
        "v1-empty-instances": (v1, dumps({"instances": []})),
        "v1-too-many-images": (v1, dumps(protocol.v1_request([good] * 65))),
        "v1-wrong-instance": (v1, dumps({"instances": [{"image": b64}]})),
        "v1-nested-json-as-text": (v1, b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "text/plain"}),
        "v1-nested-json": (v1, b"[" * 100_000 + b"]" * 100_000),
        "v2-nested-json": (v2, b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        "v2-binary-extension": (v2, b"{}", {"Content-Type": "application/octet-stream",
                                            "inference-header-content-length": "2"}),
        "v1-over-the-serving-cap": (v1, dumps(protocol.v1_request([png_header(8000, 8000)]))),
        "v1-over-the-request-budget": (v1, dumps(protocol.v1_request([png_header(7000, 7000)] * 6))),
        "v2-over-the-request-budget": (v2, dumps(_v2([base64.b64encode(png_header(7000, 7000)).decode()] * 6))),
    }


@pytest.mark.parametrize("case", sorted(bad_requests(b"x" * 100)))
def test_bad_requests_get_a_4xx_with_a_message(server, test_photos, case):
    route, body, *headers = bad_requests(test_photos[0].read_bytes())[case]
    status, answer = request(server.port, "POST", route, body,
                             headers[0] if headers else {"Content-Type": "application/json"})
    assert 400 <= status < 500, (status, answer)
    message = json.loads(answer)
    assert message.get("error") or message.get("detail"), message
    assert_alive(server)


def test_a_50_mb_body_gets_413_and_the_server_stays_up(server, test_photos):
    body = json.dumps(protocol.v1_request([b"\0" * (38 * 1024 * 1024)])).encode()
    assert len(body) > 50_000_000
    status, answer = request(server.port, "POST", f"/v1/models/{NAME}:predict", body,
                             {"Content-Type": "application/json"})
    # FastAPI's request body limit (--max-body-bytes, 16 MiB), from the Content-Length
    assert status == 413 and b"Content Too Large" in answer
    status, _ = post_json(server.port, f"/v1/models/{NAME}:predict",
                          protocol.v1_request([test_photos[0].read_bytes()]))
    assert status == 200
    assert_alive(server)


@pytest.mark.slow
def test_1000_mixed_requests_at_concurrency_8(server, test_photos, predicted):
    rng = random.Random(0)
    good_images = [(str(p), p.read_bytes()) for p in test_photos]
    bad = list(bad_requests(good_images[0][1]).values())
    jobs = []
    for i in range(1000):
        if rng.random() < 0.3:
            route, body, *_ = rng.choice(bad)
            jobs.append(("bad", route, body, None))
        else:
            picks = rng.sample(good_images, rng.randint(1, 3))
            route = "v1" if rng.random() < 0.5 else "v2"
            body = protocol.v1_request([d for _, d in picks]) if route == "v1" else \
                protocol.v2_request([d for _, d in picks])
            path = f"/v1/models/{NAME}:predict" if route == "v1" else f"/v2/models/{NAME}/infer"
            jobs.append((route, path, json.dumps(body).encode(), [p for p, _ in picks]))

    local = threading.local()

    def send(job):
        kind, path, body, photos = job
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            return job, *request(server.port, "POST", path, body,
                                 {"Content-Type": "application/json"}, connection=local.conn)
        except (http.client.HTTPException, OSError):
            local.conn.close()  # the server closed this keep-alive connection: reconnect once
            local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            return job, *request(server.port, "POST", path, body,
                                 {"Content-Type": "application/json"}, connection=local.conn)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    n_good = 0
    for (kind, _, _, photos), status, answer in results:
        if kind == "bad":
            assert 400 <= status < 500, (status, answer[:200])
            continue
        n_good += 1
        assert status == 200, answer[:300]
        answer = json.loads(answer)
        labels = protocol.v1_labels(answer) if kind == "v1" else protocol.v2_outputs(answer)[0]
        assert len(labels) == len(photos)
        for photo, got in zip(photos, labels):
            assert same_labels(got, predicted[photo]), (photo, got, predicted[photo])
    assert n_good > 600
    assert_alive(server)


# --------------------------------------------------------------------------- environments


def test_serving_code_imports_neither_torch_nor_pandas():
    code = ("import sys, triview.predict, triview.runtime, triview.registry, triview.crop, "
            "triview.serving.protocol, triview.serving.infra; "
            "print(sorted({'torch', 'pandas'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_serving_environment_has_no_torch_and_kserve_0_21(serve_python):
    code = ("import importlib.util, importlib.metadata as m; import triview.serving.model; "
            "print(importlib.util.find_spec('torch') is None, m.version('kserve'))")
    out = subprocess.run([serve_python, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "0.21.0"]


def test_triview_serve_without_a_serving_environment_is_a_clear_error(tmp_path, exported):
    """A real model, no serving environment: the hint names make serve-env (a missing
    model is named first: test_newcomer)."""
    env = {"TRIVIEW_SERVE_PYTHON": str(tmp_path / "missing" / "python"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(Path(sys.executable).parent / "triview"), "serve", "--model",
                           str(exported)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "make serve-env" in proc.stderr


def test_triview_serve_from_the_main_venv_runs_the_serving_python(exported, serve_python,
                                                                  test_photos, predicted):
    """`triview serve` in .venv (no KServe) replaces itself with the serving venv's Python."""
    from triview.serving.infra import free_port

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "triview"), "serve", "--model",
                             str(exported), "--port", str(port), "--name", NAME],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={"TRIVIEW_SERVE_PYTHON": serve_python, "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(port, "GET", "/v2/health/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        status, answer = post_json(port, f"/v1/models/{NAME}:predict",
                                   protocol.v1_request([test_photos[2].read_bytes()]))
        assert status == 200
        assert same_labels(answer["predictions"][0]["labels"], predicted[str(test_photos[2])])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serves_the_champion_from_an_s3_registry(exported, serve_python, s3_endpoint,
                                                test_photos, predicted):
    from tests.s3_server import BUCKET
    from triview.registry import ModelRegistry

    registry = ModelRegistry(f"s3://{BUCKET}/registry", NAME)
    registry.promote(registry.publish(exported))
    # REGISTRY/<name>@champion; the route's model name is the registry model name
    with ServerProcess(f"s3://{BUCKET}/registry/{NAME}@champion", NAME,
                       python=serve_python) as proc:
        assert json.loads(request(proc.port, "GET", "/v1/models")[1]) == {"models": [NAME]}
        status, answer = post_json(proc.port, f"/v1/models/{NAME}:predict",
                                   protocol.v1_request([test_photos[3].read_bytes()]))
    assert status == 200
    assert same_labels(answer["predictions"][0]["labels"], predicted[str(test_photos[3])])


# --------------------------------------------------------------------------- resource budget


@pytest.mark.slow
def test_a_bomb_flood_beside_good_requests(exported, serve_python, tmp_path):
    """bench/serve_flood.py, smaller: 8 requests of 43 PNGs of 10000 x 10000 (292 KB each,
    16 MB a request) among 40 good requests at concurrency 8, then 2 allowed heavy requests
    (5 x 49 MP, decoded), readiness probed throughout, with a server budget of one such
    image at a time. Every bomb is refused with 413 by the streamed check, every good answer
    is triview predict's, readiness never fails, and the server's peak resident memory
    stays under 900 MB (about 200 MB idle + 10 bytes a pixel of the 50 MP budget; two
    images decoding at once would take it past 1.1 GB)."""
    out = tmp_path / "flood.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_flood.py"), "--model",
                           str(exported), "--bombs", "8", "--good", "40", "--heavy", "2",
                           "--idle-seconds", "0.5", "--no-decode-once", "--json", str(out),
                           "--server-args=--max-server-pixels 50000000"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRIVIEW_SERVE_PYTHON": serve_python})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["bombs"]["n"] == 8 and result["bombs"]["statuses"] == [413]
    # the streamed check's words ("image 0"; the parsed request's check says "instance 0")
    assert result["bombs"]["message"]["error"].startswith("image 0: 100000000 pixels, more than")
    assert result["good"]["answered_200"] == 40 and result["good"]["wrong_labels"] == 0
    assert result["heavy"]["answered_right"] == 2
    assert result["ready"]["n_failures"] == 0 and result["server_alive_after"]
    assert result["rss_mb"]["peak_vmhwm_after_heavy"] < 900


def test_health_answers_while_a_request_decodes(server):
    """Decoding runs on the inference threads, never on the event loop: readiness answers
    while a request of 5 x 49 MP images (seconds of decoding) is in flight, before it
    is answered."""
    body = json.dumps(protocol.v1_request([blank_png(7000)] * 5)).encode()
    answered = {}

    def heavy():
        answered["status"] = request(server.port, "POST", f"/v1/models/{NAME}:predict", body,
                                     {"Content-Type": "application/json"}, timeout=600)[0]
        answered["at"] = time.monotonic()

    thread = threading.Thread(target=heavy)
    thread.start()
    ready_at = []
    while thread.is_alive():
        if request(server.port, "GET", "/v2/health/ready", timeout=600)[0] == 200:
            ready_at.append(time.monotonic())
        time.sleep(0.05)
    thread.join()
    assert answered["status"] == 200
    assert len([t for t in ready_at if t < answered["at"]]) >= 3, (ready_at, answered)
