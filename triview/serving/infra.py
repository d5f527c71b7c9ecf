"""Infra validation before promotion (as TFX's InfraValidator): start the real predictor on
an exported model as a subprocess on 127.0.0.1, send it real requests (v1 and v2) and
compare its answers with ONNX Runtime run here on the same images and the same crops.

Also the client side the tests and ``bench/serve.py`` use: :class:`ServerProcess` and
:func:`post_json`. Nothing here imports KServe: the server runs in the serving
environment, this module in either.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from triview.serving import protocol, serve_command, serve_python

#: Largest |server - ONNX Runtime| allowed for any probability or score.
TOLERANCE = 1e-5
STARTUP_TIMEOUT_S = 120.0


def blank_png(side: int) -> bytes:
    """A valid RGB PNG of side x side black pixels, compressed at zlib's level 9 to about a
    thousandth of its decoded size (10000 x 10000: 292 KB for 300 MB): what a decompression
    bomb looks like, for the tests and bench/serve_flood.py."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    deflate = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)  # filter byte 0, then the row's pixels
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 60.0,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    """One HTTP request to 127.0.0.1:port; ``(status, body)``. Reuses ``connection`` if given."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if connection is None:
            conn.close()


def post_json(port: int, path: str, payload: dict, timeout: float = 60.0,
              connection: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    status, data = request(port, "POST", path, json.dumps(payload).encode(),
                           {"Content-Type": "application/json"}, timeout, connection)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, {"error": data[:200].decode("utf-8", "replace")}


class ServerProcess:
    """``triview serve`` in the serving environment, as a subprocess on 127.0.0.1.

    ``start()`` returns once ``/v2/health/ready`` answers 200 (or raises ``RuntimeError``
    with the end of the server's log); ``startup_seconds`` is the time that took.
    """

    def __init__(self, model: str, name: str = "triview", *, port: int | None = None,
                 python: str | None = None, extra_args: tuple[str, ...] = (),
                 env: dict | None = None, log_path: str | Path | None = None) -> None:
        self.model, self.name = str(model), name
        self.port = port or free_port()
        self.command = serve_command(["--model", self.model, "--name", name, "--port",
                                      str(self.port), "--host", "127.0.0.1", *extra_args], python)
        self.env = {**os.environ, **(env or {})}
        self._own_log = log_path is None  # a temporary log goes away with the server
        self.log_path = Path(log_path) if log_path else \
            Path(tempfile.mkstemp(prefix="triview-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()  # removes a temporary log
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was "
                                   f"ready: {tail}")
            try:
                if request(self.port, "GET", "/v2/health/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s: {tail}")
            time.sleep(0.05)
        self.startup_seconds = time.perf_counter() - t0
        return self.startup_seconds

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])[-1500:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # KServe shuts down gracefully on SIGTERM
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serving_available() -> bool:
    """Whether a serving environment exists to validate in."""
    return serve_python() is not None


def _score_diff(got: list[dict], want: list[tuple[str, float]]) -> float:
    """Largest score difference of two label lists; inf when the labels differ."""
    if [g["label"] for g in got] != [k for k, _ in want]:
        return float("inf")
    return max((abs(g["score"] - s) for g, (_, s) in zip(got, want)), default=0.0)


def infra_validate(model_dir: str | Path, images: list[bytes], *, name: str = "triview",
                   tolerance: float = TOLERANCE, batch_size: int = 8,
                   timeout: float = STARTUP_TIMEOUT_S, python: str | None = None) -> dict:
    """Serve ``model_dir`` in the real predictor, send ``images`` over v1 and v2, and compare
    every answer with ONNX Runtime run here on the same crops.

    Returns ``{"passed", "reason", "max_abs_diff", "n", "startup_seconds"}``; ``passed`` is
    False when the server does not come up, a request fails, or an answer differs by more
    than ``tolerance`` (labels must be the same, in the same order).
    """
    from triview.predict import Predictor

    verdict = {"passed": False, "reason": "", "max_abs_diff": None, "n": len(images),
               "startup_seconds": None, "tolerance": tolerance}
    if not images:
        verdict["reason"] = "no images to validate with"
        return verdict
    reference = Predictor(str(model_dir))
    expected = reference.probabilities([reference.views_of_bytes(data) for data in images])
    try:
        server = ServerProcess(str(model_dir), name, python=python)
    except FileNotFoundError as exc:
        verdict["reason"] = str(exc)
        return verdict
    try:
        verdict["startup_seconds"] = round(server.start(timeout), 3)
    except RuntimeError as exc:
        verdict["reason"] = f"the predictor did not come up: {exc}"
        return verdict
    worst = 0.0
    try:
        for start in range(0, len(images), batch_size):
            chunk, want = images[start:start + batch_size], expected[start:start + batch_size]
            want_labels = [reference.labels(p) for p in want]
            status, v1 = post_json(server.port, f"/v1/models/{name}:predict",
                                   protocol.v1_request(chunk))
            if status != 200:
                verdict["reason"] = f"v1 request for images {start}..: HTTP {status} {v1.get('error')}"
                return verdict
            status, v2 = post_json(server.port, f"/v2/models/{name}/infer",
                                   protocol.v2_request(chunk))
            if status != 200:
                verdict["reason"] = f"v2 request for images {start}..: HTTP {status} {v2.get('error')}"
                return verdict
            v2_labels, probabilities = protocol.v2_outputs(v2)
            if probabilities.shape != want.shape:
                verdict["reason"] = f"v2 probabilities have shape {list(probabilities.shape)}, " \
                                    f"expected {list(want.shape)}"
                return verdict
            worst = max(worst, float(np.abs(probabilities - want).max()))
            for got in (protocol.v1_labels(v1), v2_labels):
                worst = max([worst] + [_score_diff(g, w) for g, w in zip(got, want_labels)])
        if not server.alive():
            verdict["reason"] = f"the predictor exited while answering: {server.log_tail()}"
            return verdict
    except OSError as exc:
        verdict["reason"] = f"the predictor stopped answering: {exc}; {server.log_tail()}"
        return verdict
    finally:
        server.stop()
    verdict["max_abs_diff"] = worst if np.isfinite(worst) else None
    if worst > tolerance:
        verdict["reason"] = ("the served labels differ from ONNX Runtime's" if not np.isfinite(worst)
                             else f"served answers differ from ONNX Runtime by {worst:.2e} > {tolerance:.0e}")
        return verdict
    verdict.update(passed=True, reason=f"{len(images)} images over v1 and v2 within {tolerance:.0e}")
    return verdict


def sample_images(views_dir: str | Path, n: int = 16, dataset_dir: str | Path | None = None,
                  seed: int = 0) -> list[bytes]:
    """Up to ``n`` test images to validate with: the ingested photos when ``dataset_dir``
    (ingest's output) is given, else the test crops of the first view (real test images
    too, only smaller: the server crops them again, the comparison is the same)."""
    from triview import manifest as mf
    from triview.shards import read_member

    rng = np.random.default_rng(seed)
    if dataset_dir is not None:
        folder = dataset_dir
        table = mf.read_manifest(dataset_dir)
        refs = list(table.loc[table["split"] == "test", "path"])
    else:
        folder = views_dir
        table = mf.read_views(views_dir)
        first = table["view"].iloc[0]
        rows = table[(table["split"] == "test") & (table["augmented"] == 0) & (table["view"] == first)]
        refs = list(rows["path"])
    if len(refs) > n:
        refs = [refs[i] for i in sorted(rng.choice(len(refs), n, replace=False))]
    return [read_member(folder, ref) for ref in refs]

