"""The predictor's wire format and resource limits, in the training environment (no KServe,
no server): every malformed body is a BadRequest with a message, image headers are judged
before any decoding (on the parsed request and on the body as it streams in), and the
server's pixel budget bounds what the inference threads decode at once."""
from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib

import pytest

from triview.serving import protocol
from triview.serving.limits import (HEAD_CHARS, PixelBudget, RequestLimits, StreamedHeaders,
                                    declared_pixels)
from triview.serving.protocol import BadRequest


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries (almost) no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ----------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("body, message", [
    ([], 'expected a JSON object {"instances": [...]}'),
    ({"inputs": []}, 'expected a JSON object {"instances": [...]}'),
    ({"instances": []}, '"instances" must be a non-empty list'),
    ({"instances": "abc"}, '"instances" must be a non-empty list'),
    ({"instances": [{"image": "abc"}]}, 'instance 0: expected {"image_bytes": {"b64": "..."}}'),
    ({"instances": [{"image_bytes": "abc"}]}, "instance 0: expected"),
    ({"instances": ["AAAA"] * 65}, "65 instances in one request; at most 64"),
])
def test_malformed_v1_bodies_are_bad_requests_with_a_message(body, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("{", r"\{")) as err:
        protocol.v1_payloads(body)
    assert err.value.status == 400


def test_v1_instances_in_every_documented_form():
    image = png_header(3, 2)
    body = {"instances": [{"image_bytes": {"b64": b64(image)}, "key": "a"}, {"b64": b64(image)},
                          b64(image)]}
    payloads, keys = protocol.v1_payloads(body)
    assert keys == ["a", None, None] and [p.decode() for p in payloads] == [image] * 3
    with pytest.raises(BadRequest, match="instance 1: not valid base64"):
        protocol.v1_payloads({"instances": ["AAAA", "not base64!"]})[0][1].decode()
    with pytest.raises(BadRequest, match="instance 0: expected a base64 string, got int"):
        protocol.v1_payloads({"instances": [{"b64": 7}]})[0][0].decode()


@pytest.mark.parametrize("inputs, message", [
    ([], "expected one input 'image', got 0"),
    ([("image", "FP32", [1], [1.0])], "datatype FP32; expected BYTES"),
    ([("image", "BYTES", [2], ["AAAA"])], r"shape \[2\] but 1 elements"),
    ([("image", "BYTES", [1, 3], ["AAAA"])], r"shape \[1, 3\]; expected \[N\] or \[N, 1\]"),
    ([("image", "BYTES", [0], [])], "holds no images"),
    ([("image", "BYTES", [65], ["AAAA"] * 65)], "65 images in one request; at most 64"),
])
def test_malformed_v2_inputs_are_bad_requests_with_a_message(inputs, message):
    with pytest.raises(BadRequest, match=message):
        protocol.v2_payloads(inputs)


@pytest.mark.parametrize("body", [b"{instances: oops", b"\xff\xfe", b"",
                                  b"[" * 100_000 + b"]" * 100_000,
                                  b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_a_body_that_is_not_json_is_a_bad_request(body):
    """Sent with a non-JSON content type KServe hands the bytes on; deep nesting must not
    surface as RecursionError (a 500)."""
    with pytest.raises(BadRequest, match="not JSON|nested too deeply") as err:
        protocol.parse_json(body)
    assert err.value.status == 400


# ----------------------------------------------------------------------------- limits


def test_declared_pixels_come_from_the_header_alone():
    assert declared_pixels(png_header(10_000, 10_000)) == 100_000_000  # 100 MP, 60 bytes
    assert declared_pixels(b"not an image") == 0
    with pytest.raises(BadRequest, match="decompression bomb") as err:
        declared_pixels(png_header(20_000, 20_000))   # over PIL's own cap
    assert err.value.status == 413


def _payloads(images: list[bytes]) -> list[protocol.Payload]:
    return protocol.v1_payloads(protocol.v1_request(images))[0]


def test_the_per_image_cap_and_the_request_budget_refuse_before_decoding():
    limits = RequestLimits(max_image_pixels=50_000_000, max_request_pixels=120_000_000)
    images, pixels = limits.admit(_payloads([png_header(4000, 3000), png_header(10, 10)]))
    assert pixels == [12_000_000, 100] and images[1] == png_header(10, 10)
    with pytest.raises(BadRequest, match="instance 1: 100000000 pixels, more than the 50000000") as err:
        limits.admit(_payloads([png_header(10, 10), png_header(10_000, 10_000)]))
    assert err.value.status == 413
    # 3 x 49 MP: the budget is passed at the third image; the fourth is never decoded
    payloads = _payloads([png_header(7000, 7000)] * 3) + [protocol.Payload("not base64!", "x")]
    with pytest.raises(BadRequest, match=r"more than the 120000000 pixels .*147000000 up to "
                                         r"instance 2") as err:
        limits.admit(payloads)
    assert err.value.status == 413
    with pytest.raises(ValueError, match="per-image pixel cap"):
        RequestLimits(max_image_pixels=10, max_request_pixels=5)


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def _first_refusal(scan: StreamedHeaders, chunks: list[bytes]) -> tuple[int, BadRequest | None]:
    for i, chunk in enumerate(chunks):
        problem = scan.feed(chunk)
        if problem is not None:
            return i, problem
    return len(chunks), None


@pytest.mark.parametrize("size", [1, 7, 100, 4096, 65536])
def test_a_streamed_bomb_is_refused_at_the_chunk_of_its_first_header(size):
    """43 images of 100 MP: refused within the first image's header, whatever the chunk
    boundaries, long before the body (here ~640 KB) has arrived; v1 and v2 bodies."""
    limits = RequestLimits(50_000_000, 256_000_000)
    bomb = png_header(10_000, 10_000) + b"\0" * 10_000  # padding: images are longer than headers
    for body in (protocol.v1_request([bomb] * 43), protocol.v2_request([bomb] * 43)):
        data = json.dumps(body).encode()
        at, problem = _first_refusal(StreamedHeaders(limits), _chunks(data, size))
        assert problem is not None and problem.status == 413
        assert str(problem).startswith("image 0: 100000000 pixels")
        # at the chunk that completes the first image's HEAD_CHARS characters
        first = data.index(b64(bomb)[:64].encode())
        assert at * size < first + HEAD_CHARS <= (at + 1) * size


def test_a_streamed_request_over_its_budget_is_refused_at_the_image_that_passes_it():
    limits = RequestLimits(50_000_000, 256_000_000)
    data = json.dumps(protocol.v1_request([png_header(7000, 7000)] * 43)).encode()
    at, problem = _first_refusal(StreamedHeaders(limits), _chunks(data, 512))
    assert "(294000000 up to image 5)" in str(problem)


def test_streamed_good_requests_and_unreadable_headers_are_never_refused():
    limits = RequestLimits(50_000_000, 256_000_000)
    good = png_header(4000, 3000) + b"\1" * 20_000
    bodies = [json.dumps(protocol.v1_request([good] * 20, keys=[f"k{i}" for i in range(20)])),
              json.dumps(protocol.v2_request([good] * 20, request_id="r")),
              # JSON may escape '/' (\/): such base64 is left to the parsed check
              json.dumps(protocol.v1_request([b"\xff" * 300 + good])).replace("/", "\\/"),
              json.dumps({"instances": [{"key": "x" * 100, "b64": b64(b"text, not an image" * 9)}]})]
    for body in bodies:
        for size in (3, 1000, 1 << 20):
            assert _first_refusal(StreamedHeaders(limits), _chunks(body.encode(), size)) == \
                (len(_chunks(body.encode(), size)), None)


def test_the_server_budget_bounds_the_pixels_decoded_at_once():
    budget = PixelBudget(100)
    in_use, lock, done = [], threading.Lock(), []

    def decode(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                in_use.append(budget.in_use)
            time.sleep(0.02)
        done.append(pixels)

    threads = [threading.Thread(target=decode, args=(p,)) for p in [60, 50, 40, 100, 30, 70] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(done) == 18 and budget.in_use == 0
    assert max(in_use) <= 100 and budget.peak <= 100
    assert budget.peak > 60  # images that fit together did run together
    with pytest.raises(ValueError, match="do not fit"):
        with budget.hold(101):
            pass
