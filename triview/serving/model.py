"""The KServe model: an exported ensemble behind KServe's v1 and v2 REST routes.

Each image goes through ``triview predict``'s path (:class:`triview.predict.Predictor`):
ingest's decoding (EXIF orientation, 8-bit RGB, the decompression-bomb cap), the card's
lens and crop geometry, the ONNX ensemble (normalisation inside). KServe's ``preprocess``
reads the request (JSON, base64), ``predict`` decodes, crops and runs ONNX Runtime,
``postprocess`` writes the answer; KServe's ``request_{preprocess,predict,postprocess}_seconds``
histograms time the three. A request alone runs on the event loop (no thread hand-off);
when others are in flight each runs on the model's pool of ``inference_workers`` threads,
where OpenCV and ONNX Runtime release the GIL, so they overlap on the cores and the loop
keeps answering health checks.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import kserve
import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from triview import validate
from triview.predict import PredictError, Predictor
from triview.serving import protocol


@dataclass
class _Batch:
    """One request on its way through preprocess -> predict -> postprocess."""
    v2: bool
    images: list[bytes]
    keys: list = field(default_factory=list)
    request_id: str | None = None
    probabilities: np.ndarray | None = None


class TriviewModel(kserve.Model):
    """``location``: an exported model folder or a registry model/version, local or s3://."""

    def __init__(self, name: str, location: str, *, threads: int = 0, inference_workers: int = 2,
                 max_images: int = protocol.MAX_IMAGES, max_pixels: int = validate.MAX_PIXELS):
        super().__init__(name)
        self.location, self.threads = location, threads
        self.max_images, self.max_pixels = max_images, max_pixels
        self.predictor: Predictor | None = None
        # as many inferences at once as the cores can run; more threads only contend
        self.pool = ThreadPoolExecutor(max(1, inference_workers), thread_name_prefix="inference")
        self._in_predict = 0  # requests in predict(); only touched on the event loop

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
                images = protocol.v2_images([(i.name, i.datatype, i.shape, i.data)
                                             for i in payload.inputs], self.max_images)
                return _Batch(True, images, request_id=payload.id)
            if isinstance(payload, (bytes, bytearray)):  # KServe passes non-JSON content types on
                payload = protocol.parse_json(payload)
            images, keys = protocol.v1_images(payload, self.max_images)
            return _Batch(False, images, keys=keys)
        except protocol.BadRequest as exc:
            raise InvalidInput(str(exc)) from None

    async def predict(self, batch: _Batch, headers: dict | None = None) -> _Batch:
        self._in_predict += 1
        try:
            # one turn of the event loop lets requests that arrived together get here too
            await asyncio.sleep(0)
            if self._in_predict == 1:  # alone: run here, no thread hand-off (latency)
                batch.probabilities = self._probabilities(batch.images)
            else:                      # others waiting: overlap on the pool (throughput)
                batch.probabilities = await asyncio.get_running_loop().run_in_executor(
                    self.pool, self._probabilities, batch.images)
        finally:
            self._in_predict -= 1
        return batch

    def _probabilities(self, images: list[bytes]) -> np.ndarray:
        views = []
        for i, data in enumerate(images):
            try:
                views.append(self.predictor.views_of_bytes(data, max_pixels=self.max_pixels))
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
