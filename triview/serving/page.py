"""The try page: ``GET /try`` on the server ``triview serve`` starts, for people who judge
photos rather than call APIs. Upload photos, pick a model, move a threshold; per photo the
labels with scores and what each view saw (its crop box on the photo and its own top
label), counts per class over the batch, downloads as CSV/JSON.

The page is server-rendered HTML with one small script and one stylesheet, all served
from this package (:data:`STATIC`): no CDN, nothing from the network. Its predictions come
from ``POST /try/api/predict`` in this same process, through the same
:class:`~triview.predict.Predictor` the v1/v2 routes use for the served model, so what the
page shows is what the API answers. Routes:

- ``GET /try``: the page; ``GET /try/static/<file>``: its script and stylesheet;
- ``GET /try/api/models``: the models to pick from (the served one; with a registry, the
  model's other versions) and the request limits;
- ``GET /try/api/models/<id>``: a model's classes, views, task and default thresholds
  (503 with a message when it fails to load);
- ``POST /try/api/predict?model=<id>``: one photo's bytes as the body; its labels under the
  model's default thresholds (as the v1 route answers), every class probability, and per
  view the crop box, the probabilities and the top label. 400 for what is not a usable
  photo (the message says why), 413 over the body limit, 503 for a model that failed.

Photos are decoded and predicted on the model's inference threads, never on the event
loop. Other registry versions load on first use (at most :data:`MAX_EXTRA_MODELS` stay
loaded, so a pod's memory is not multiplied).
"""
from __future__ import annotations

import asyncio
import html
import json
import string
from collections import OrderedDict
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from triview import crop
from triview.predict import PredictError, Predictor, labels_json

PREFIX = "/try"
STATIC = Path(__file__).parent / "static"
#: The files ``/try/static/`` serves (nothing else under the folder is reachable).
STATIC_TYPES = {"try.js": "text/javascript; charset=utf-8", "try.css": "text/css; charset=utf-8"}
SERVED = "served"
MAX_EXTRA_MODELS = 1
#: The page runs its own script and style only, talks only to this server, shows the
#: user's photos from blob: URLs, and cannot be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ModelUnavailable(Exception):
    """A model the page offers could not be loaded (the message says why)."""


class ModelChoices:
    """The models the page offers: the served one, and the other versions of the
    registry model it was served from (loaded on first use)."""

    def __init__(self, model, spec: str) -> None:
        self.model = model               # the TriviewModel the v1/v2 routes use
        self.registry, self.served_version = None, None
        try:
            from triview.registry import RegistryError, registry_of_spec

            found = registry_of_spec(spec)
        except (RegistryError, OSError, ValueError):
            found = None                 # the page still offers the served model
        if found is not None:
            self.registry, self.served_version = found
        self.loaded: OrderedDict[str, Predictor] = OrderedDict()
        self.locks: dict[str, asyncio.Lock] = {}

    def choices(self) -> list[dict]:
        served = {"id": SERVED, "served": True,
                  "label": f"{self.model.name} (served"
                           + (f", version {self.served_version})" if self.served_version else ")")}
        if self.registry is None:
            return [served]
        try:
            versions = self.registry.versions()
        except Exception:  # a registry that cannot be listed now: offer what is served
            versions = []
        others = [{"id": str(v), "served": False, "label": f"{self.registry.name} version {v}"}
                  for v in reversed(versions) if v != self.served_version]
        return [served] + others

    async def predictor(self, model_id: str) -> Predictor:
        if model_id == SERVED:
            if self.model.predictor is None:
                raise ModelUnavailable("the served model is not loaded")
            return self.model.predictor
        if self.registry is None or not model_id.isdigit():
            raise ModelUnavailable(f"no model {model_id!r} here: pick one of the list")
        if model_id in self.loaded:
            self.loaded.move_to_end(model_id)
            return self.loaded[model_id]
        lock = self.locks.setdefault(model_id, asyncio.Lock())
        async with lock:    # one load per version, however many photos ask at once
            if model_id not in self.loaded:
                predictor = await asyncio.get_running_loop().run_in_executor(
                    self.model.pool, self._load, int(model_id))
                self.loaded[model_id] = predictor
                while len(self.loaded) > MAX_EXTRA_MODELS:
                    self.loaded.popitem(last=False)
            return self.loaded[model_id]

    def _load(self, version: int) -> Predictor:
        if version not in self.registry.versions():
            raise ModelUnavailable(f"version {version} is not in the registry")
        try:
            return Predictor(str(self.registry.fetch(version)), threads=self.model.threads)
        except Exception as exc:  # a broken export fails in many ways; say which
            raise ModelUnavailable(f"version {version} failed to load: "
                                   f"{type(exc).__name__}: {str(exc)[:300]}") from None


def model_info(predictor: Predictor, model_id: str) -> dict:
    """What the page needs to label answers itself as the threshold moves."""
    default = predictor.default_threshold()
    thresholds = [float(t) for t in default] if getattr(default, "ndim", 0) else \
        [float(default)] * len(predictor.classes)
    return {"id": model_id, "name": predictor.card.get("name") or "triview",
            "classes": predictor.classes, "views": list(predictor.card["views"]),
            "task": "multilabel" if predictor.multilabel else "multiclass",
            "thresholds": thresholds, "created": predictor.card.get("created"),
            "data_version": predictor.card.get("data_version")}


def answer(predictor: Predictor, data: bytes, max_pixels: int) -> dict:
    """One photo through the served path: labels under the model's default thresholds
    (as the v1 route answers), every probability, each view's box, probabilities and top
    label. Raises :class:`PredictError` for what is not a usable photo."""
    views, (width, height) = predictor.views_and_size(data, max_pixels=max_pixels)
    probs, per_view = predictor.view_probabilities([views])
    prob = probs[0]
    out = {"width": width, "height": height, "labels": labels_json(predictor.labels(prob)),
           "probabilities": [float(p) for p in prob], "views": None}
    if per_view is not None:
        boxes = crop.view_boxes_in_photo(predictor.cropper.lens, predictor.geometry, width,
                                         height)
        out["views"] = [{"name": view, "box": [round(v, 1) for v in boxes[view]],
                         "probabilities": [float(p) for p in per_view[view][0]],
                         "top": labels_json([predictor.top(per_view[view][0])])[0]}
                        for view in predictor.card["views"]]
    return out


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def render_page(choices: list[dict], limits: dict) -> str:
    """The page's HTML, every value escaped."""
    options = "\n".join(
        f'          <option value="{html.escape(c["id"])}"{" selected" if c["served"] else ""}>'
        f'{html.escape(c["label"])}</option>' for c in choices)
    template = string.Template((STATIC / "try.html").read_text())
    return template.substitute(prefix=PREFIX, options=options,
                               limits=html.escape(json.dumps(limits), quote=True),
                               max_mb=f"{limits['max_body_bytes'] / 2**20:.0f}")


def add_try_page(app: FastAPI, model, spec: str, *, max_body_bytes: int,
                 parallel: int) -> ModelChoices:
    """Mount the page's routes on KServe's FastAPI ``app`` for the loaded ``model`` (served
    from ``spec``); requests above ``max_body_bytes`` never reach them (the app's limit).
    The page sends up to ``parallel`` photos at once (the model's inference threads)."""
    models = ModelChoices(model, spec)
    limits = {"max_body_bytes": max_body_bytes, "max_pixels": model.max_pixels,
              "parallel": max(1, parallel)}
    router = APIRouter()

    @router.get(PREFIX, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page(models.choices(), limits), headers=SECURITY_HEADERS)

    @router.get(PREFIX + "/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_TYPES:   # a fixed list: no path ever reaches the disk
            return _error(404, "no such file")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_TYPES[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @router.get(PREFIX + "/api/models", include_in_schema=False)
    async def list_models() -> JSONResponse:
        return JSONResponse({"models": models.choices(), "limits": limits},
                            headers=SECURITY_HEADERS)

    @router.get(PREFIX + "/api/models/{model_id}", include_in_schema=False)
    async def describe(model_id: str) -> JSONResponse:
        try:
            predictor = await models.predictor(model_id)
        except ModelUnavailable as exc:
            return _error(503, str(exc))
        return JSONResponse(model_info(predictor, model_id), headers=SECURITY_HEADERS)

    @router.post(PREFIX + "/api/predict", include_in_schema=False)
    async def predict(request: Request, model: str = SERVED) -> JSONResponse:
        data = await request.body()
        if not data:
            return _error(400, "the photo is empty (0 bytes)")
        try:
            predictor = await models.predictor(model)
        except ModelUnavailable as exc:
            return _error(503, str(exc))
        loop = asyncio.get_running_loop()
        try:   # decode, crop and run on the inference threads: the loop keeps answering
            result = await loop.run_in_executor(models.model.pool, answer, predictor, data,
                                                models.model.max_pixels)
        except PredictError as exc:
            return _error(400, str(exc))
        return JSONResponse({"model": model, **result}, headers=SECURITY_HEADERS)

    app.include_router(router)
    return models
