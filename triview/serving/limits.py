"""How much decoding the predictor takes on: per image, per request and at once across
requests, judged from each image's header before any pixel is decoded (no KServe import:
the server uses it, and the training environment tests it).

A PNG of 10000 x 10000 pixels can be 292 KB, so a 16 MiB body holds dozens of them, and
each costs about a second and 400 MB to decode. Three budgets bound that:

- **per image** (``max_image_pixels``, serving's own, default 50 megapixels: a 48 MP phone
  photo passes): a larger image is refused;
- **per request** (``max_request_pixels``, default 256 megapixels, a second or three of
  decoding): a request whose images declare more in total is refused, before any of them
  is decoded;
- **per server** (``max_server_pixels``, default 100 megapixels): the pixels decoded at
  once by all inference threads together; an image waits on its thread until its pixels
  fit, so decoding memory stays below about 10 bytes a pixel of this budget (PIL's 4-byte
  pixels, the 3-byte array cropped from them, allocator slack: measured 9.9 on a 49 MP
  PNG), about 1 GB above the idle server.

The first two are judged twice. While the body is still arriving
(:class:`StreamedHeaders`, which the server runs on each chunk), each base64 image is
recognised in the JSON and the header at its start is read: a request of bombs is refused
after its first chunk, without the rest being received, parsed or decoded. Then, on the
parsed request (:meth:`RequestLimits.admit`), every image's header is read again before
any of them is decoded.

Refusals are :class:`~triview.serving.protocol.BadRequest` with status 413 and a message.
"""
from __future__ import annotations

import binascii
import io
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from triview.serving import MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS, MAX_SERVER_PIXELS
from triview.serving.protocol import BadRequest, Payload


def declared_pixels(data: bytes) -> int:
    """Width x height an image file's header declares (PIL reads the header only), 0 when
    PIL cannot read a header (the decoder then refuses the file, decoding nothing)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return int(img.width) * int(img.height)
    except Image.DecompressionBombError as exc:  # PIL's own cap (2 x 89 MP): its size is in the text
        raise BadRequest(f"decompression bomb ({exc})", status=413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError,
            TypeError, KeyError, ZeroDivisionError):
        return 0


@dataclass(frozen=True)
class RequestLimits:
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_request_pixels: int = MAX_REQUEST_PIXELS

    def __post_init__(self) -> None:
        if not 0 < self.max_image_pixels <= self.max_request_pixels:
            raise ValueError(f"the per-image pixel cap ({self.max_image_pixels}) must be positive "
                             f"and at most the per-request budget ({self.max_request_pixels})")

    def refusal(self, where: str, pixels: int, total: int) -> BadRequest | None:
        """Why an image of ``pixels`` (the request's images up to it: ``total``) is refused."""
        if pixels > self.max_image_pixels:
            return BadRequest(f"{where}: {pixels} pixels, more than the {self.max_image_pixels} "
                              "one image may have here (decompression-bomb guard)", status=413)
        if total > self.max_request_pixels:
            return BadRequest(f"the request's images declare more than the "
                              f"{self.max_request_pixels} pixels one request may decode "
                              f"({total} up to {where}): send fewer or smaller images per "
                              "request", status=413)
        return None

    def admit(self, payloads: list[Payload]) -> tuple[list[bytes], list[int]]:
        """Each image's bytes and declared pixels, decoding the base64 of one image at a
        time and reading its header at once: :class:`BadRequest` (413) at the first image
        over the per-image cap or past the request's budget, before the rest is decoded."""
        images, pixels, total = [], [], 0
        for payload in payloads:
            data = payload.decode()
            n = declared_pixels(data)
            total += n
            problem = self.refusal(payload.where, n, total)
            if problem is not None:
                raise problem
            images.append(data)
            pixels.append(n)
        return images, pixels


#: Base64 characters read from the start of each image string to find its header (6 KB of
#: the file: a PNG's size is in its first 24 bytes, a JPEG's after its EXIF block).
HEAD_CHARS = 8192
# the opening quote of a JSON string that starts with 64 base64 characters: an image
_IMAGE_STRING = re.compile(rb'"(?=[A-Za-z0-9+/]{64})')


class StreamedHeaders:
    """A request body judged chunk by chunk, as it arrives: every JSON string starting
    with 64 base64 characters is taken for an image, and the header in its first
    :data:`HEAD_CHARS` characters is read. :meth:`feed` returns the refusal
    (:meth:`RequestLimits.refusal`) as soon as an image is over the per-image cap or the
    images so far over the request's budget. It only ever refuses on a header it read; an
    image whose header it cannot read counts nothing here (the check on the parsed
    request, :meth:`RequestLimits.admit`, still reads it)."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.head: bytearray | None = None   # the current image string's first characters
        self.judged = False
        self.carry = b""                     # an unfinished string start at a chunk's end
        self.images, self.total = 0, 0

    def feed(self, chunk: bytes) -> BadRequest | None:
        data, pos = self.carry + chunk, 0
        self.carry = b""
        while pos < len(data):
            if self.head is None:
                start = _IMAGE_STRING.search(data, pos)
                if start is None:  # keep what could be the start of an image string
                    self.carry = data[max(pos, len(data) - 64):]
                    return None
                self.head, self.judged, pos = bytearray(), False, start.end()
                continue
            end = data.find(b'"', pos)
            stop = len(data) if end < 0 else end
            self.head += data[pos:min(stop, pos + HEAD_CHARS - len(self.head))]
            if not self.judged and (len(self.head) >= HEAD_CHARS or end >= 0):
                problem = self._judge()
                if problem is not None:
                    return problem
            if end < 0:
                return None
            self.head, pos = None, end + 1
        return None

    def _judge(self) -> BadRequest | None:
        self.judged = True
        where = f"image {self.images}"
        self.images += 1
        try:
            head = binascii.a2b_base64(bytes(self.head[: len(self.head) // 4 * 4]), strict_mode=True)
            pixels = declared_pixels(head)
        except binascii.Error:  # not plain base64 (JSON-escaped '/', ...): the parsed check decides
            return None
        except BadRequest as exc:
            return exc
        self.total += pixels
        return self.limits.refusal(where, pixels, self.total)


class PixelBudget:
    """Pixels decoded at once across threads: :meth:`hold` blocks until they fit."""

    def __init__(self, capacity: int = MAX_SERVER_PIXELS) -> None:
        if capacity <= 0:
            raise ValueError(f"the server's pixel budget must be positive, got {capacity}")
        self.capacity, self.in_use, self.peak = capacity, 0, 0
        self._room = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        """Hold ``pixels`` (at most the capacity) of the budget while the block runs."""
        if not 0 <= pixels <= self.capacity:
            raise ValueError(f"{pixels} pixels do not fit a budget of {self.capacity}")
        with self._room:
            self._room.wait_for(lambda: self.in_use + pixels <= self.capacity)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._room:
                self.in_use -= pixels
                self._room.notify_all()
