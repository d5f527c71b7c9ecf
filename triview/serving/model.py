"""The KServe model: an exported ensemble behind KServe's v1 and v2 REST routes.

Each image goes through ``triview predict``'s path (:class:`triview.predict.Predictor`):
ingest's decoding (EXIF orientation, 8-bit RGB), the card's lens and crop geometry, the
ONNX ensemble (normalisation inside). KServe's ``preprocess`` reads the request (JSON,
base64) and checks what its images' headers declare against the per-image cap and the
request's pixel budget (:mod:`triview.serving.limits`: 413 before any decoding),
``predict`` decodes each image once, crops and runs ONNX Runtime, ``postprocess`` writes
the answer; KServe's ``request_{preprocess,predict,postprocess}_seconds`` histograms time
the three. ``predict``'s work always runs on the model's pool of ``inference_workers``
threads (OpenCV, PIL's decoders and ONNX Runtime release the GIL), each image holding its
pixels of the server's budget while it is decoded, so the event loop is never blocked:
health, readiness and the next request's refusal answer while images decode.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import kserve
import numpy as np
from fastapi import HTTPException
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from triview.predict import PredictError, Predictor
from triview.serving import MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS, MAX_SERVER_PIXELS, protocol
from triview.serving.limits import PixelBudget, RequestLimits


@dataclass
class _Batch:
    """One request on its way through preprocess -> predict -> postprocess."""
    v2: bool
    images: list[bytes]
    pixels: list[int]            # each image's declared pixels
    keys: list = field(default_factory=list)
    request_id: str | None = None
    probabilities: np.ndarray | None = None


class TriviewModel(kserve.Model):
    """``location``: an exported model folder or a registry model/version, local or s3://."""

    def __init__(self, name: str, location: str, *, threads: int = 0, inference_workers: int = 2,
                 max_images: int = protocol.MAX_IMAGES, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_request_pixels: int = MAX_REQUEST_PIXELS,
                 max_server_pixels: int = MAX_SERVER_PIXELS):
        super().__init__(name)
        self.location, self.threads, self.max_images = location, threads, max_images
        self.limits = RequestLimits(max_pixels, max_request_pixels)
        if max_pixels > max_server_pixels:
            raise ValueError(f"--max-pixels {max_pixels} exceeds --max-server-pixels "
                             f"{max_server_pixels}: such an image could never be decoded")
        self.budget = PixelBudget(max_server_pixels)
        self.predictor: Predictor | None = None
        # as many inferences at once as the cores can run; more threads only contend
        self.pool = ThreadPoolExecutor(max(1, inference_workers), thread_name_prefix="inference")

    def load(self) -> bool:
        import cv2

        # requests run in parallel on the inference pool; OpenCV's own threads would only
        # contend with them (as calibrate-and-crop's worker processes do)
        cv2.setNumThreads(1)
        self.predictor = Predictor(self.location, threads=self.threads)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": protocol.V2_INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        n_classes = len(self.predictor.classes) if self.predictor else -1
        return [{"name": protocol.V2_PREDICTIONS, "datatype": "BYTES", "shape": [-1]},
                {"name": protocol.V2_PROBABILITIES, "datatype": "FP32", "shape": [-1, n_classes]}]

    def validate(self, payload):
        return payload  # preprocess has checked the request and returns a _Batch

    async def preprocess(self, payload, headers: dict | None = None) -> _Batch:
        try:
            if isinstance(payload, InferRequest):
                images, pixels = self.limits.admit(protocol.v2_payloads(
                    [(i.name, i.datatype, i.shape, i.data) for i in payload.inputs],
                    self.max_images))
                return _Batch(True, images, pixels, request_id=payload.id)
            if isinstance(payload, (bytes, bytearray)):  # KServe passes non-JSON content types on
                payload = protocol.parse_json(payload)
            encoded, keys = protocol.v1_payloads(payload, self.max_images)
            images, pixels = self.limits.admit(encoded)
            return _Batch(False, images, pixels, keys=keys)
        except protocol.BadRequest as exc:
            if exc.status == 400:
                raise InvalidInput(str(exc)) from None
            raise HTTPException(exc.status, str(exc)) from None

    async def predict(self, batch: _Batch, headers: dict | None = None) -> _Batch:
        # off the event loop, always: health checks and refusals never wait on decoding
        batch.probabilities = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._probabilities, batch)
        return batch

    def _probabilities(self, batch: _Batch) -> np.ndarray:
        views = []
        for i, (data, pixels) in enumerate(zip(batch.images, batch.pixels)):
            try:
                with self.budget.hold(pixels):
                    views.append(self.predictor.views_of_bytes(
                        data, max_pixels=self.limits.max_image_pixels))
            except PredictError as exc:
                raise InvalidInput(f"image {i}: {exc}") from None
        return self.predictor.probabilities(views)

    async def postprocess(self, batch: _Batch, headers: dict | None = None,
                          response_headers: dict | None = None):
        predictions = [protocol.prediction(self.predictor.labels(p), key)
                       for p, key in zip(batch.probabilities, batch.keys or [None] * len(batch.images))]
        if not batch.v2:
            return {"predictions": predictions}
        n = len(predictions)
        outputs = [
            InferOutput(protocol.V2_PREDICTIONS, [n], "BYTES", [json.dumps(p) for p in predictions]),
            InferOutput(protocol.V2_PROBABILITIES, list(batch.probabilities.shape), "FP32",
                        batch.probabilities.astype(np.float32).reshape(-1).tolist()),
        ]
        return InferResponse(response_id=batch.request_id or str(uuid.uuid4()),
                             model_name=self.name, infer_outputs=outputs)
