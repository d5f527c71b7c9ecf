"""The KServe predictor against ONNX Runtime called directly, on the same image files.

Both paths do the whole per-request work: decode (ingest's validation), crop with the
card's lens and geometry, the ONNX ensemble, the labels. "direct" calls
``triview.predict.Predictor`` in this process; "server" sends one v1 request per image to
``triview serve`` (a subprocess in the serving environment) over a kept-alive HTTP
connection per client thread. Concurrency 1 (the two paths alternate request by request)
and 8 (alternating rounds), the same number of ONNX Runtime threads on both sides, so load
from other processes hits both alike. Also: the largest score difference between the server's v1/v2 answers
and ``triview predict --format json``, and the server's cold start-up time on the model in
a registry folder and on ``s3://`` (moto_server on 127.0.0.1).

    .venv/bin/python bench/serve.py --model DIR --json bench/results_serve.json

Writes ``{"overhead": server p50 / direct p50 at concurrency 1, "max_abs_diff", "table",
"startup_seconds", ...}``. Images: ``--images DIR`` or scikit-learn's digits written as
the demo writes them.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from triview.predict import Predictor, expand_inputs  # noqa: E402
from triview.registry import ModelRegistry  # noqa: E402
from triview.serving import protocol  # noqa: E402
from triview.serving.infra import ServerProcess, post_json, request  # noqa: E402

NAME = "bench"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(call, jobs: list, concurrency: int) -> tuple[list[float], float]:
    """Per-call latencies (s) and wall time of running ``call`` over ``jobs``."""
    def one(job):
        t0 = time.perf_counter()
        call(job)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    if concurrency == 1:
        latencies = [one(job) for job in jobs]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(one, jobs))
    return latencies, time.perf_counter() - t0


def startup_times(model: str, python: str, runs: int, env: dict | None = None,
                  threads: int = 1) -> list[float]:
    times = []
    for _ in range(runs):
        server = ServerProcess(model, NAME, python=python, env=env,
                               extra_args=("--threads", str(threads)))
        try:
            times.append(round(server.start(), 3))
            assert request(server.port, "GET", f"/v2/models/{NAME}/ready")[0] == 200
        finally:
            server.stop()
    return times


def s3_startup(model_dir: Path, python: str, runs: int, threads: int) -> list[float] | str:
    """Start-up from ``s3://`` on a moto_server on 127.0.0.1 (the registry's champion)."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(binary).exists():
        return "skipped: moto_server is not installed"
    from tests.s3_server import MotoServer

    moto = MotoServer()
    env = {"S3_ENDPOINT": f"http://{moto.endpoint}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from triview.storage import S3Store

        S3Store().client.make_bucket("bench")
        registry = ModelRegistry("s3://bench/registry", NAME)
        registry.promote(registry.publish(model_dir))
        return startup_times(f"s3://bench/registry/{NAME}@champion", python, runs, env, threads)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        moto.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument("--images", default=None, help="folder of image files (default: "
                        "scikit-learn's digits as `triview demo-data` writes them)")
    parser.add_argument("--n-images", type=int, default=64, help="distinct images (default 64)")
    parser.add_argument("--requests", type=int, default=400,
                        help="requests per path and concurrency (default 400)")
    parser.add_argument("--rounds", type=int, default=8,
                        help="alternating rounds at concurrency 8 (default 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads, both paths (default 1)")
    parser.add_argument("--startup-runs", type=int, default=3, help="cold starts each (default 3)")
    parser.add_argument("--python", default=None, help="serving interpreter (default: .venv-serve)")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="triview-bench-serve-"))
    if args.images:
        paths = expand_inputs([args.images])[: args.n_images]
    else:
        from triview.demo import write_digits

        write_digits(scratch / "digits", per_class=max(1, -(-args.n_images // 10)))
        paths = expand_inputs([str(scratch / "digits")])[: args.n_images]
    images = [Path(p).read_bytes() for p in paths]

    import cv2

    cv2.setNumThreads(1)  # as the server (triview/serving/model.py): parallelism is per request
    direct = Predictor(args.model, threads=args.threads)

    def run_direct(data: bytes):
        return direct.labels(direct.probabilities([direct.views_of_bytes(data)])[0])

    server = ServerProcess(args.model, NAME, python=args.python,
                           extra_args=("--threads", str(args.threads)),
                           log_path=scratch / "server.log")
    first_start = server.start()
    local = threading.local()
    bodies = [json.dumps(protocol.v1_request([data])).encode() for data in images]

    def run_server(i: int):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        status, body = request(server.port, "POST", f"/v1/models/{NAME}:predict", bodies[i],
                               {"Content-Type": "application/json"}, connection=local.conn)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return body

    try:
        # parity with `triview predict --format json` (the CLI, on the same files)
        cli = subprocess.run([str(Path(sys.executable).parent / "triview"), "predict", "--model",
                              args.model, *map(str, paths), "--format", "json"],
                             capture_output=True, text=True, check=True)
        predicted = [json.loads(line)["labels"] for line in cli.stdout.strip().splitlines()]
        max_diff, labels_equal = 0.0, True
        for start in range(0, len(images), 16):
            chunk = images[start:start + 16]
            v1 = post_json(server.port, f"/v1/models/{NAME}:predict", protocol.v1_request(chunk))[1]
            v2 = post_json(server.port, f"/v2/models/{NAME}/infer", protocol.v2_request(chunk))[1]
            for got in (protocol.v1_labels(v1), protocol.v2_outputs(v2)[0]):
                for g, want in zip(got, predicted[start:start + 16]):
                    labels_equal &= [x["label"] for x in g] == [x["label"] for x in want]
                    max_diff = max([max_diff] + [abs(x["score"] - y["score"]) for x, y in zip(g, want)])

        for _ in range(20):  # warm-up: ORT arenas, samplers, HTTP connection
            run_direct(images[0])
            run_server(0)
        latencies = {(p, c): [] for p in ("direct", "server") for c in (1, 8)}
        walls = {key: 0.0 for key in latencies}
        # CPU seconds at concurrency 1: this process (direct: all of it; server: the client)
        # and the server process; less sensitive to other load than wall time
        cpu = {"direct": 0.0, "server_client": 0.0, "server_process": 0.0}
        # concurrency 1: direct and server alternate request by request, so both see the
        # same background load (this machine is shared); concurrency 8: alternating rounds
        health = []  # an HTTP round trip without inference: the floor any request pays here
        for i in range(args.requests):
            t0 = time.perf_counter()
            status, _ = request(server.port, "GET", "/v2/health/live", connection=local.conn)
            health.append(time.perf_counter() - t0)
            for path in ("direct", "server") if i % 2 == 0 else ("server", "direct"):
                own, theirs = time.process_time(), process_cpu_seconds(server.proc.pid)
                t0 = time.perf_counter()
                run_direct(images[i % len(images)]) if path == "direct" else run_server(i % len(images))
                elapsed = time.perf_counter() - t0
                latencies[(path, 1)].append(elapsed)
                walls[(path, 1)] += elapsed
                if path == "direct":
                    cpu["direct"] += time.process_time() - own
                else:
                    cpu["server_client"] += time.process_time() - own
                    cpu["server_process"] += process_cpu_seconds(server.proc.pid) - theirs
        per_round = max(8, args.requests // args.rounds)
        for r in range(args.rounds):
            order = range(r * per_round, (r + 1) * per_round)
            for path, call, jobs in (("direct", run_direct, [images[i % len(images)] for i in order]),
                                     ("server", run_server, [i % len(images) for i in order])):
                lat, wall = timed(call, jobs, 8)
                latencies[(path, 8)] += lat
                walls[(path, 8)] += wall
        table = [{"path": p, "concurrency": c, "n": len(v), "p50_ms": round(percentile(v, 50), 3),
                  "p99_ms": round(percentile(v, 99), 3),
                  "requests_per_s": round(len(v) / walls[(p, c)], 1)}
                 for (p, c), v in latencies.items()]
        alive = server.alive()
    finally:
        server.stop()

    registry = ModelRegistry(str(scratch / "registry"), NAME)
    registry.promote(registry.publish(args.model))
    startup = {
        "first_start": round(first_start, 3),
        "registry_folder": startup_times(str(scratch / "registry" / "models" / NAME), args.python
                                         or server.command[0], args.startup_runs,
                                         threads=args.threads),
        "s3": s3_startup(Path(args.model), args.python or server.command[0], args.startup_runs,
                         args.threads),
    }
    p50 = {(row["path"], row["concurrency"]): row["p50_ms"] for row in table}
    n1 = len(latencies[("direct", 1)])
    cpu_ms = {k: round(1000 * v / n1, 3) for k, v in cpu.items()}
    result = {
        "overhead": round(p50[("server", 1)] / p50[("direct", 1)], 3),
        "overhead_concurrency_8": round(p50[("server", 8)] / p50[("direct", 8)], 3),
        "cpu_ms_per_request": cpu_ms,
        "health_round_trip_p50_ms": round(percentile(health, 50), 3),
        "cpu_overhead": round((cpu_ms["server_client"] + cpu_ms["server_process"]) / cpu_ms["direct"], 3),
        "max_abs_diff": max_diff,
        "labels_equal": bool(labels_equal),
        "table": table,
        "startup_seconds": startup,
        "server_alive_after": alive,
        "threads": args.threads,
        "n_images": len(images),
        "image_bytes_mean": round(float(np.mean([len(d) for d in images])), 1),
        "model": {k: direct.card.get(k) for k in ("views", "image_size")},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'path':<8} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for row in table:
        print(f"{row['path']:<8} {row['concurrency']:>4} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
              f"{row['requests_per_s']:>8.1f}")
    print(f"overhead (server p50 / direct p50, concurrency 1): {result['overhead']:.3f}; "
          f"max |score - triview predict|: {max_diff:.2e}; labels equal: {labels_equal}")
    print(f"CPU ms per request at concurrency 1: {json.dumps(cpu_ms)}; CPU overhead "
          f"{result['cpu_overhead']:.3f}; GET /v2/health/live p50 {result['health_round_trip_p50_ms']} ms")
    print(f"start-up (s): {json.dumps(startup)}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
