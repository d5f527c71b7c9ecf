"""A stand-in for Azure Custom Vision's Training API (v3.4-preview) on 127.0.0.1.

It answers the routes triview's import calls with the JSON shapes of the service's
published REST reference (``Image``: id, created, width, height, resizedImageUri,
thumbnailUri, originalImageUri, tags [{tagId, tagName, created}], regions, metadata;
``Tag``: id, name, description, type, imageCount; counts as a bare integer; errors as
``{"code", "message"}`` or, from the gateway, ``{"error": {"code", "message"}}``), pages
with take/skip like the service (capped lower here, so that a small project spans several
pages), and serves the original images under SAS-like URIs (``?sv=...&sig=...``) from its
own host. Faults are set per test: a 429 on one page, a 302 from the API, image downloads
that fail or fail once. It records every request (path, and headers with lower-case names).
"""
from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

API = "/customvision/v3.4-preview/training"
CREATED = "2026-11-02T09:30:00.1234567Z"


@dataclass
class StandInImage:
    body: bytes
    tags: list[str] = field(default_factory=list)   # tag names; [] = untagged
    download: str = "ok"            # ok | fail (500 always) | flaky (503 once, then ok)
                                    # | expired (403: the SAS signature ran out)
    uri: str | None = None          # an originalImageUri of its own (not served here)
    regions_only: bool = False      # tags given as object-detection regions
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


class CustomVisionStandIn:
    """``with CustomVisionStandIn(key, images) as cv:`` serves ``cv.project_id`` at
    ``cv.address`` (a ``customvision://`` address with ``scheme=http``)."""

    def __init__(self, key: str, images: list[StandInImage], *, page_cap: int = 4,
                 throttle_skip: int | None = None, redirect: bool = False,
                 extra_tags: tuple[str, ...] = (), retry_after: str = "1",
                 count_extra: int = 0) -> None:
        self.key, self.images, self.page_cap = key, images, page_cap
        self.throttle_skip = throttle_skip      # the tagged page at this skip answers 429 once
        self.redirect = redirect                # every API call answers 302 to /steal
        self.retry_after = retry_after          # the 429's Retry-After header
        self.count_extra = count_extra          # the tagged count says this many more than listed
        self.project_id = str(uuid.uuid4())
        self.sig = "sig-" + uuid.uuid4().hex    # the SAS signature of every image URI
        names = sorted({t for img in images for t in img.tags} | set(extra_tags))  # extra: no images
        self.tag_ids = {name: str(uuid.uuid4()) for name in names}
        self.requests: list[tuple[str, dict]] = []
        self._once: set[str] = set()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"customvision://127.0.0.1:{self.port}/{self.project_id}?scheme=http"

    def __enter__(self) -> "CustomVisionStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------ JSON shapes

    def image_json(self, img: StandInImage) -> dict:
        base = f"http://127.0.0.1:{self.port}/blob/i-{self.project_id.replace('-', '')}"
        sas = f"?sv=2017-04-17&sr=b&sig={self.sig}&se=2026-11-03T09%3A30%3A00Z&sp=r"
        marks = [{"tagId": self.tag_ids[t], "tagName": t, "created": CREATED} for t in img.tags]
        regions = [{"regionId": str(uuid.uuid4()), "tagName": m["tagName"], "created": CREATED,
                    "tagId": m["tagId"], "left": 0.1, "top": 0.1, "width": 0.5, "height": 0.5}
                   for m in marks] if img.regions_only else []
        return {"id": img.id, "created": CREATED, "width": 64, "height": 64,
                "resizedImageUri": f"{base}/i-{img.id}{sas}",
                "thumbnailUri": f"{base}/t-{img.id}{sas}",
                "originalImageUri": img.uri or f"{base}/o-{img.id}{sas}",
                "tags": [] if img.regions_only else marks, "regions": regions, "metadata": {}}

    def _tags_json(self) -> list[dict]:
        return [{"id": tid, "name": name, "description": None, "type": "Regular",
                 "imageCount": sum(name in img.tags for img in self.images)}
                for name, tid in self.tag_ids.items()]

    # ------------------------------------------------------------------------ routes

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body, headers: dict | None = None,
                      content_type: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with standin._lock:
                    standin.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                parts = urlsplit(self.path)
                if parts.path.startswith("/blob/"):
                    return self._blob(parts.path.rsplit("/", 1)[-1], parse_qs(parts.query))
                if not parts.path.startswith(API + "/projects/"):
                    return self._send(404, {"code": "NotFound", "message": "Resource not found"})
                if standin.redirect:
                    return self._send(302, b"", {"Location": f"http://127.0.0.1:{standin.port}/steal"})
                if self.headers.get("Training-Key") != standin.key:
                    return self._send(401, {"error": {"code": "401", "message": (
                        "Access denied due to invalid subscription key or wrong API endpoint. "
                        "Make sure to provide a valid key for an active subscription and use a "
                        "correct regional API endpoint for your resource.")}})
                rest = parts.path[len(API + "/projects/"):].split("/")
                if rest[0] != standin.project_id:
                    return self._send(404, {"code": "NotFoundProject",
                                            "message": "Project not found"})
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                route = "/".join(rest[1:])
                if route == "tags":
                    return self._send(200, standin._tags_json())
                tagged = [img for img in standin.images if img.tags]
                untagged = [img for img in standin.images if not img.tags]
                if route == "images/tagged/count":
                    return self._send(200, len(tagged) + standin.count_extra)
                if route == "images/untagged/count":
                    return self._send(200, len(untagged))
                if route in ("images/tagged", "images/untagged"):
                    skip, take = int(query.get("skip", 0)), int(query.get("take", 50))
                    if route == "images/tagged" and skip == standin.throttle_skip \
                            and standin._first(f"429:{skip}"):
                        return self._send(429, {"error": {"code": "429", "message":
                                          "Rate limit is exceeded. Try again in 1 seconds."}},
                                          {"Retry-After": standin.retry_after})
                    pool = tagged if route == "images/tagged" else untagged
                    if query.get("orderBy", "Newest") == "Newest":
                        pool = pool[::-1]
                    page = pool[skip:skip + min(take, standin.page_cap)]
                    return self._send(200, [standin.image_json(img) for img in page])
                return self._send(404, {"code": "NotFound", "message": "Resource not found"})

            def _blob(self, name: str, query: dict) -> None:
                img = next((i for i in standin.images if name == f"o-{i.id}"), None)
                if img is None or query.get("sig") != [standin.sig] or img.download == "expired":
                    return self._send(403, b"<Error><Code>AuthenticationFailed</Code></Error>",
                                      content_type="application/xml")
                if img.download == "fail" or (img.download == "flaky"
                                              and standin._first(f"flaky:{img.id}")):
                    return self._send(500 if img.download == "fail" else 503,
                                      b"<Error><Code>ServerBusy</Code></Error>",
                                      content_type="application/xml")
                return self._send(200, img.body, content_type="application/octet-stream")

        return Handler

    def _first(self, event: str) -> bool:
        """True the first time ``event`` happens."""
        with self._lock:
            if event in self._once:
                return False
            self._once.add(event)
            return True

    def downloads(self) -> list[tuple[str, dict]]:
        return [(p, h) for p, h in self.requests if p.startswith("/blob/")]

    def api_calls(self, route: str) -> list[str]:
        return [p for p, _ in self.requests if route in p and p.startswith(API)]
