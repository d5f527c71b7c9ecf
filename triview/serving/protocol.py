"""The predictor's wire format on KServe's REST routes, read and written in one place so the
server, the infra validator, the benchmark and the tests agree (no KServe import here).

v1 (``POST /v1/models/<name>:predict``)::

    {"instances": [{"image_bytes": {"b64": "<base64 image file>"}, "key": "optional"}, ...]}
    -> {"predictions": [{"labels": [{"label": "7", "score": 0.93}, ...], "key": "..."}, ...]}

An instance may also be ``{"b64": "..."}`` or the base64 string itself.

v2, the Open Inference Protocol (``POST /v2/models/<name>/infer``): one BYTES input
``image`` of shape ``[N]`` whose elements are base64 image files (raw bytes over gRPC);
outputs ``predictions`` (BYTES ``[N]``, each the JSON object of a v1 prediction) and
``probabilities`` (FP32 ``[N, C]``, classes in the model card's order).

``labels`` are exactly those of ``triview predict --format json``: best first, the model's
threshold(s), scores rounded to 6 decimals.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import NamedTuple

import numpy as np

from triview.predict import labels_json
from triview.serving import MAX_IMAGES

V2_INPUT = "image"
V2_PREDICTIONS = "predictions"
V2_PROBABILITIES = "probabilities"


class BadRequest(ValueError):
    """A request the predictor refuses, answered with ``status`` (400, or 413 for more
    than the predictor decodes) and this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_b64(text, where: str) -> bytes:
    """The bytes of one base64 image (``bytes`` pass through: gRPC carries raw bytes)."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    if not isinstance(text, str):
        raise BadRequest(f"{where}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where}: not valid base64 ({exc})") from None


def parse_json(body: bytes):
    """A request body sent with a non-JSON content type, read as JSON."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not JSON ({exc})") from None
    except RecursionError:
        raise BadRequest("the request body is JSON nested too deeply") from None


class Payload(NamedTuple):
    """One image of a request, still base64-encoded (or raw bytes, from gRPC)."""
    encoded: object
    where: str          # how the error messages name it ("instance 3", "image[0]")

    def decode(self) -> bytes:
        return decode_b64(self.encoded, self.where)


def v1_payloads(body, max_images: int = MAX_IMAGES) -> tuple[list[Payload], list]:
    """The images of a v1 request body, not yet decoded, and each instance's ``key``
    (None when absent)."""
    if not isinstance(body, dict) or "instances" not in body:
        raise BadRequest('expected a JSON object {"instances": [...]} (v1 protocol)')
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest('"instances" must be a non-empty list')
    if len(instances) > max_images:
        raise BadRequest(f"{len(instances)} instances in one request; at most {max_images}")
    images, keys = [], []
    for i, instance in enumerate(instances):
        where = f"instance {i}"
        key = None
        if isinstance(instance, dict):
            key = instance.get("key")
            payload = instance.get("image_bytes", instance)
            if not isinstance(payload, dict) or "b64" not in payload:
                raise BadRequest(f'{where}: expected {{"image_bytes": {{"b64": "..."}}}}, '
                                 '{"b64": "..."} or a base64 string')
            payload = payload["b64"]
        else:
            payload = instance
        images.append(Payload(payload, where))
        keys.append(key)
    return images, keys


def v2_payloads(inputs: list[tuple[str, str, list, list]],
                max_images: int = MAX_IMAGES) -> list[Payload]:
    """The images of a v2 request, not yet decoded, given its inputs as ``(name, datatype,
    shape, data)``."""
    if len(inputs) != 1:
        raise BadRequest(f"expected one input {V2_INPUT!r}, got {len(inputs)}")
    name, datatype, shape, data = inputs[0]
    if datatype != "BYTES":
        raise BadRequest(f"input {name!r} has datatype {datatype}; expected BYTES "
                         "(base64-encoded image files)")
    shape = list(shape or [])
    if not shape or len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise BadRequest(f"input {name!r} has shape {shape}; expected [N] or [N, 1]")
    data = list(np.asarray(data, dtype=object).reshape(-1)) if data is not None else []
    if shape[0] != len(data):
        raise BadRequest(f"input {name!r} has shape {shape} but {len(data)} elements")
    if not data:
        raise BadRequest(f"input {name!r} holds no images")
    if len(data) > max_images:
        raise BadRequest(f"{len(data)} images in one request; at most {max_images}")
    return [Payload(item, f"{name}[{i}]") for i, item in enumerate(data)]


def prediction(labels: list[tuple[str, float]], key=None) -> dict:
    out = {"labels": labels_json(labels)}
    if key is not None:
        out["key"] = key
    return out


# ----------------------------------------------------------------------------- clients


def v1_request(images: list[bytes], keys: list | None = None) -> dict:
    instances = [{"image_bytes": {"b64": base64.b64encode(data).decode("ascii")}} for data in images]
    for instance, key in zip(instances, keys or []):
        instance["key"] = key
    return {"instances": instances}


def v2_request(images: list[bytes], request_id: str | None = None) -> dict:
    body = {"inputs": [{"name": V2_INPUT, "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(data).decode("ascii") for data in images]}]}
    if request_id:
        body["id"] = request_id
    return body


def v1_labels(response: dict) -> list[list[dict]]:
    """``labels`` of every prediction of a v1 response."""
    return [p["labels"] for p in response["predictions"]]


def v2_outputs(response: dict) -> tuple[list[list[dict]], np.ndarray]:
    """``labels`` of every prediction and the probabilities (N x C) of a v2 response."""
    outputs = {o["name"]: o for o in response["outputs"]}
    labels = [json.loads(text)["labels"] for text in outputs[V2_PREDICTIONS]["data"]]
    probs = outputs[V2_PROBABILITIES]
    return labels, np.asarray(probs["data"], dtype=np.float64).reshape(probs["shape"])
