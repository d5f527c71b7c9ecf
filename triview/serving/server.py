"""``python -m triview.serving.server --model LOCATION``: the KServe ModelServer with the
triview model, in the serving environment (``triview serve`` starts it).

KServe provides the HTTP server (FastAPI on uvicorn), the v1 and v2 routes, health,
readiness and metadata, and ``/metrics`` (Prometheus: request latency histograms per
stage). Set here: the listen address (KServe 0.21 always binds 0.0.0.0), FastAPI's request
body limit (413), uvloop as the event loop, and the try page's routes (``/try``,
:mod:`triview.serving.page`).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from triview.serving import SERVE_DESCRIPTION, add_serve_arguments


class RefuseBinaryExtension:
    """ASGI middleware: 415 for a request in the v2 protocol's binary extension (the
    ``inference-header-content-length`` header). The predictor takes JSON, and KServe's
    parser of the extension answers malformed ones with 500s (a header part without
    ``inputs`` is a KeyError)."""

    HEADER = b"inference-header-content-length"

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and any(k.lower() == self.HEADER for k, _ in scope["headers"]):
            from fastapi.responses import JSONResponse

            response = JSONResponse(status_code=415, content={
                "error": "the v2 binary extension (inference-header-content-length) is not "
                         "supported: send the images base64-encoded in a JSON body"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Refused(Exception):
    def __init__(self, problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


class RefuseOversizedEarly:
    """ASGI middleware: a POST body is read through
    :class:`~triview.serving.limits.StreamedHeaders`, so a request whose images declare
    more pixels than allowed gets its 413 when the chunk holding the first such header
    arrives; uvicorn drains the rest of the body without handing it to anyone."""

    def __init__(self, app, limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        from triview.serving.limits import StreamedHeaders

        scan = StreamedHeaders(self.limits)

        async def scanned_receive():
            message = await receive()
            if message["type"] == "http.request":
                problem = scan.feed(message.get("body", b""))
                if problem is not None:
                    raise _Refused(problem)
            return message

        try:
            await self.app(scope, scanned_receive, send)
        except _Refused as refused:  # raised while the app awaited the body: nothing sent yet
            from fastapi.responses import JSONResponse

            await JSONResponse(status_code=refused.problem.status,
                               content={"error": str(refused.problem)})(scope, receive, send)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m triview.serving.server",
                                     description=SERVE_DESCRIPTION)
    add_serve_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> None:
    """Load the model, then serve until SIGTERM/SIGINT."""
    from triview.registry import resolve_model_spec

    folder, registry_name = resolve_model_spec(args.model)
    sys.argv = sys.argv[:1]  # kserve.model_server parses sys.argv when imported
    import kserve
    from kserve import model_server

    from triview.serving.model import TriviewModel

    class _ModelServer(kserve.ModelServer):
        def setup_event_loop(self) -> None:
            # start() has built the REST server but not bound it yet: set the address here
            if self._rest_server is not None:
                self._rest_server.config.host = args.host
            asyncio.set_event_loop(asyncio.new_event_loop())  # uvloop's policy makes none itself
            super().setup_event_loop()

    model = TriviewModel(args.name or registry_name or "triview", str(folder), threads=args.threads,
                         inference_workers=args.inference_workers, max_images=args.max_images,
                         max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
                         max_server_pixels=args.max_server_pixels)
    model.load()
    if args.name is None and registry_name is None:
        model.name = model.predictor.card.get("name") or "triview"
    # FastAPI's own request body limit (Starlette's RequestBodyLimitMiddleware): 413 when
    # Content-Length or the bytes received exceed it, before the body is buffered
    model_server.app.max_body_size = args.max_body_bytes
    model_server.app.add_middleware(RefuseOversizedEarly, limits=model.limits)
    model_server.app.add_middleware(RefuseBinaryExtension)
    # the try page (GET /try): the same process, the same predictor as the v1/v2 routes
    from triview.serving.page import add_try_page

    add_try_page(model_server.app, model, args.model, max_body_bytes=args.max_body_bytes,
                 parallel=args.inference_workers)
    server = _ModelServer(http_port=args.port, enable_grpc=False, workers=1,
                          enable_latency_logging=False)
    # KServe's timing middleware logs two lines per request; /metrics has the same times
    # and uvicorn's access log still names every request
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    try:  # KServe runs its servers in asyncio.run(); uvloop is what its "auto" loop means
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    server.start([model])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
