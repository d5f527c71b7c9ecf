"""`triview serve` under a decompression-bomb flood: requests of many huge-but-tiny PNGs
(by default 40 requests of 43 PNGs of 10000 x 10000 pixels, 292 KB each, as much as a
16 MiB body holds) sent beside a stream of good requests at concurrency 8, while a probe
asks /v2/health/ready every 50 ms on its own connection.

Then a heavy phase: requests that are allowed but costly (by default 8 requests of 5
black PNGs of 7000 x 7000 pixels, 245 megapixels a request, under the 256 MP request
budget), at the same concurrency with the same probe: every image is decoded, on the
inference threads, within the server's pixel budget.

Also, in this process: a 48 MP photo-like image through the predictor's path (one
decode) against the path it replaced (ingest's validation decode, then OpenCV decoding
what ingest stores), as PNG and as JPEG.

Measured in the same run: readiness latency with the server idle (the baseline), during
the flood and during the heavy phase; the latency of every bomb's refusal and every
answer; whether each answer equals ``triview predict``'s (:class:`triview.predict.Predictor`
run here); the server's resident memory idle and its peak (VmHWM) after each phase.

    .venv/bin/python bench/serve_flood.py --model DIR --json bench/results_serve_flood.json

Writes ``{"bombs": {...}, "good": {...}, "ready": {...}, "rss_mb": {...}, "ratios": {...}}``.
Good images: ``--images DIR`` or the model's own kind of input, scikit-learn's digits
written as the demo writes them.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shlex
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
from triview.serving import protocol  # noqa: E402
from triview.serving.infra import ServerProcess, blank_png, request  # noqa: E402

NAME = "flood"
V1 = f"/v1/models/{NAME}:predict"
V2 = f"/v2/models/{NAME}/infer"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ms = np.asarray(values) * 1000.0
    return {"n": len(values), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


class ReadinessProbe(threading.Thread):
    """GET /v2/health/ready every ``interval`` s on one kept-alive connection."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.done.is_set():
            t0 = time.perf_counter()
            try:
                status, _ = request(self.port, "GET", "/v2/health/ready", connection=conn)
                if status != 200:
                    self.failures.append(f"status {status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.latencies.append(time.perf_counter() - t0)
            self.done.wait(self.interval)


def good_images(images_dir: str | None, tmp: Path) -> list[Path]:
    if images_dir:
        return [Path(p) for p in expand_inputs([images_dir])]
    from triview.demo import write_digits

    write_digits(tmp / "digits", per_class=4)
    return sorted((tmp / "digits").rglob("*.jpg"))


def decode_once(predictor: Predictor, side: tuple[int, int] = (8000, 6000), rounds: int = 2) -> dict:
    """Seconds per image of the predictor's path (one decode) against the path it replaced
    (ingest's validation decode, then OpenCV decoding what ingest would store), on a
    photo-like 48 MP image as PNG and as JPEG; the views are checked equal."""
    import io

    import cv2
    from PIL import Image

    from triview import validate

    rng = np.random.default_rng(0)
    small = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    photo = cv2.resize(small, side, interpolation=cv2.INTER_CUBIC)
    photo = (photo.astype(np.int16) + rng.integers(-8, 8, photo.shape)).clip(0, 255).astype(np.uint8)

    def twice(data: bytes) -> dict:
        decoded = validate.decode(data, min_size=1)
        if decoded.keep_suffix:
            stored = data
        else:
            buffer = io.BytesIO()
            decoded.image.save(buffer, format="PNG")
            stored = buffer.getvalue()
        return predictor.cropper.views_of_bytes(stored, jpeg=decoded.keep_suffix == ".jpg")

    out = {}
    for fmt, options in (("PNG", {"compress_level": 1}), ("JPEG", {"quality": 90})):
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format=fmt, **options)
        data = buffer.getvalue()
        times = {"before": [], "once": []}
        for _ in range(rounds):  # interleaved, so load from other processes hits both alike
            for name, call in (("before", lambda: twice(data)),
                               ("once", lambda: predictor.views_of_bytes(data, max_pixels=10**9))):
                t0 = time.perf_counter()
                views = call()
                times[name].append(time.perf_counter() - t0)
                if name == "before":
                    reference = views
            same = all(np.array_equal(views[k], reference[k]) for k in reference)
        best = {k: min(v) for k, v in times.items()}
        out[fmt.lower()] = {"megapixels": side[0] * side[1] / 1e6, "bytes": len(data),
                            "seconds_before": best["before"], "seconds_once": best["once"],
                            "speedup": best["before"] / best["once"], "same_views": same}
    return out


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        photos = good_images(args.images, Path(tmp))
        predictor = Predictor(args.model, threads=1)
        want = {str(p): [d["label"] for d in protocol.labels_json(
            predictor.labels(predictor.probabilities([predictor.views(p)])[0]))] for p in photos}
        t0 = time.perf_counter()
        bomb = blank_png(args.bomb_side)
        bomb_body = json.dumps(protocol.v1_request([bomb] * args.bomb_images)).encode()
        big = blank_png(args.heavy_side)
        heavy_body = json.dumps(protocol.v1_request([big] * args.heavy_images)).encode()
        heavy_want = predictor.labels(predictor.probabilities([predictor.views_of_bytes(big)])[0])
        build_s = time.perf_counter() - t0
        jobs = [("bomb", V1, bomb_body, None) for _ in range(args.bombs)]
        for i in range(args.good):
            picks = rng.sample(photos, rng.randint(1, 3))
            data = [p.read_bytes() for p in picks]
            route, body = (V1, protocol.v1_request(data)) if i % 2 else (V2, protocol.v2_request(data))
            jobs.append(("good", route, json.dumps(body).encode(), [str(p) for p in picks]))
        rng.shuffle(jobs)

        server = ServerProcess(args.model, NAME,
                               extra_args=("--threads", "1", *shlex.split(args.server_args)))
        server.start()
        try:
            pid = server.proc.pid
            # warm up, then the idle baseline: readiness alone, and the server's memory
            for p in photos[:4]:
                request(server.port, "POST", V1, json.dumps(protocol.v1_request([p.read_bytes()])).encode(),
                        {"Content-Type": "application/json"})
            idle = ReadinessProbe(server.port)
            idle.start()
            time.sleep(args.idle_seconds)
            idle.done.set()
            idle.join()
            rss_idle = rss_mb(pid)

            local = threading.local()

            def send(job):
                kind, route, body, picks = job
                if not hasattr(local, "conn"):
                    local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                t = time.perf_counter()
                try:
                    status, answer = request(server.port, "POST", route, body,
                                             {"Content-Type": "application/json"}, connection=local.conn)
                except (OSError, http.client.HTTPException):
                    local.conn.close()  # the server closed this keep-alive connection
                    local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                    status, answer = request(server.port, "POST", route, body,
                                             {"Content-Type": "application/json"}, connection=local.conn)
                return kind, route, picks, status, answer, time.perf_counter() - t

            probe = ReadinessProbe(server.port)
            probe.start()
            t_flood = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(send, jobs))
            flood_s = time.perf_counter() - t_flood
            probe.done.set()
            probe.join()
            rss_peak = rss_mb(pid, "VmHWM")

            heavy_probe = ReadinessProbe(server.port)
            heavy_probe.start()
            t_heavy = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                heavy = list(pool.map(send, [("heavy", V1, heavy_body, None)] * args.heavy))
            heavy_s = time.perf_counter() - t_heavy
            heavy_probe.done.set()
            heavy_probe.join()
            rss_heavy = rss_mb(pid, "VmHWM")
            alive = server.alive() and request(server.port, "GET", "/v2/health/live")[0] == 200
        finally:
            server.stop()

    bombs = [r for r in results if r[0] == "bomb"]
    goods = [r for r in results if r[0] == "good"]
    wrong = 0
    for _, route, picks, status, answer, _ in goods:
        if status != 200:
            wrong += 1
            continue
        parsed = json.loads(answer)
        labels = protocol.v1_labels(parsed) if route == V1 else protocol.v2_outputs(parsed)[0]
        wrong += sum([d["label"] for d in got] != want[p] for p, got in zip(picks, labels))
    decode = decode_once(predictor) if args.decode_once else None
    bomb_statuses = sorted({r[3] for r in bombs})
    heavy_right = sum(r[3] == 200 and all(
        [d["label"] for d in got] == [k for k, _ in heavy_want]
        for got in protocol.v1_labels(json.loads(r[4]))) for r in heavy)
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "flood": {"bomb_requests": args.bombs, "pngs_per_bomb_request": args.bomb_images,
                  "png_side": args.bomb_side, "png_bytes": len(bomb), "bomb_body_bytes": len(bomb_body),
                  "declared_pixels_per_bomb_request": args.bomb_images * args.bomb_side ** 2,
                  "good_requests": args.good, "concurrency": args.concurrency,
                  "seconds": flood_s, "build_seconds": build_s},
        "bombs": {"statuses": bomb_statuses, "all_4xx": all(400 <= r[3] < 500 for r in bombs),
                  "message": json.loads(bombs[0][4]) if bombs else None,
                  **summary([r[5] for r in bombs])},
        "good": {"answered_200": sum(r[3] == 200 for r in goods), "wrong_labels": wrong,
                 **summary([r[5] for r in goods])},
        "heavy": {"requests": args.heavy, "pngs_per_request": args.heavy_images,
                  "png_side": args.heavy_side, "png_bytes": len(big),
                  "declared_pixels_per_request": args.heavy_images * args.heavy_side ** 2,
                  "answered_right": heavy_right, "seconds": heavy_s,
                  **summary([r[5] for r in heavy])},
        "ready": {"idle": summary(idle.latencies), "flood": summary(probe.latencies),
                  "heavy": summary(heavy_probe.latencies),
                  "failures": (probe.failures + heavy_probe.failures)[:5],
                  "n_failures": len(probe.failures) + len(heavy_probe.failures)},
        "rss_mb": {"idle": rss_idle, "peak_vmhwm_after_flood": rss_peak,
                   "peak_vmhwm_after_heavy": rss_heavy},
        "server_alive_after": alive,
        "decode_once": decode,
        "ratios": {"ready_p99_flood_over_idle": summary(probe.latencies)["p99_ms"]
                   / max(summary(idle.latencies)["p99_ms"], 1e-9),
                   "ready_p99_heavy_over_idle": summary(heavy_probe.latencies)["p99_ms"]
                   / max(summary(idle.latencies)["p99_ms"], 1e-9),
                   "rss_peak_over_idle": rss_heavy / rss_idle},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument("--images", default=None, help="folder of good images (default: digits)")
    parser.add_argument("--bombs", type=int, default=40)
    parser.add_argument("--bomb-images", type=int, default=43)
    parser.add_argument("--bomb-side", type=int, default=10000)
    parser.add_argument("--good", type=int, default=400)
    parser.add_argument("--heavy", type=int, default=8)
    parser.add_argument("--heavy-images", type=int, default=5)
    parser.add_argument("--heavy-side", type=int, default=7000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--decode-once", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one decode per image against the former two (48 MP)")
    parser.add_argument("--server-args", default="",
                        help="more `triview serve` options, one string (e.g. "
                        "--server-args='--max-server-pixels 50000000')")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
