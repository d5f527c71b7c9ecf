"""A real S3 server for tests: moto's standalone ``moto_server`` on 127.0.0.1, and a
small HTTP proxy in front of it that can inject faults (5xx answers, dropped
connections). Test modules import the fixtures they use from here.
"""
from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BUCKET = "triview-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` as a subprocess."""

    def __init__(self) -> None:
        binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        if not Path(binary).exists():
            pytest.skip("moto_server is not installed (pip install 'moto[server]')")
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not become ready")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FaultProxy:
    """Forward HTTP requests to ``upstream``; ``fail_first`` requests get a 503 and,
    after ``drop_after`` forwarded requests, every connection is cut (a server that
    went away mid-upload). ``methods`` restricts which requests count."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_first = 0
        self.drop_after: int | None = None
        self.methods: set[str] | None = None
        self.before_forward = None   # called as f(method, path) before each forward
        self.seen: list[str] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                counts = proxy.methods is None or self.command in proxy.methods
                with proxy.lock:
                    n = len([s for s in proxy.seen if s != "503"]) if counts else 0
                    if counts and proxy.fail_first > 0:
                        proxy.fail_first -= 1
                        proxy.seen.append("503")
                        action = "503"
                    elif counts and proxy.drop_after is not None and n >= proxy.drop_after:
                        proxy.seen.append("drop")
                        action = "drop"
                    else:
                        if counts:
                            proxy.seen.append(f"{self.command} {self.path}")
                        action = "forward"
                if action == "503":
                    payload = b"Service Unavailable"
                    self.send_response(503)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if proxy.before_forward is not None:
                    proxy.before_forward(self.command, self.path)
                host, port = proxy.upstream.split(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request(self.command, self.path, body=body,
                             headers={k: v for k, v in self.headers.items()})
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_environment(monkeypatch, endpoint: str) -> None:
    """Point triview's storage at ``endpoint`` with dummy credentials (moto takes any)."""
    monkeypatch.setenv("S3_ENDPOINT", f"http://{endpoint}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("S3_BACKOFF_S", "0.01")
    for name in ("MINIO_ENDPOINT", "AWS_ENDPOINT_URL", "S3_SECURE", "S3_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def moto_server():
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def s3_endpoint(moto_server, monkeypatch) -> str:
    """A running S3 server with an empty bucket; the environment points at it."""
    from triview.storage import S3Store

    s3_environment(monkeypatch, moto_server.endpoint)
    S3Store().client.make_bucket(BUCKET)
    return moto_server.endpoint


@pytest.fixture()
def fault_proxy(s3_endpoint, monkeypatch):
    """A :class:`FaultProxy` in front of the S3 server; the environment points at it."""
    proxy = FaultProxy(s3_endpoint)
    s3_environment(monkeypatch, proxy.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()
