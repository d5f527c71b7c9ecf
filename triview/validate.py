"""Image validation: decide from the bytes alone whether a file is a usable image,
and normalise it to 8-bit RGB (EXIF orientation applied).

The content, never the file name, picks the decoder: a WebP saved as ``.jpg`` is
decoded as WebP. A rejected file gets one machine-readable reason from
:data:`triview.manifest.QUARANTINE_REASONS`.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from triview import storage
from triview.customvision import DownloadFailed
from triview.params import PARAMS

#: Folder of the stored images inside the ingest output.
IMAGES_DIR = "images"

# Never decode more than this many pixels (decompression-bomb guard). PIL's own guard
# (an error above 2 x Image.MAX_IMAGE_PIXELS) stays in place behind it.
MAX_PIXELS = PARAMS["max_pixels"].default

#: Formats (as PIL names them after sniffing the content) that ingest decodes.
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "DIB"}
# Formats OpenCV decodes to the same pixels as PIL: such files are kept byte for
# byte (JPEGs can then be decoded at 1/2..1/8 scale downstream).
KEEP_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
_KEEP_MODES = {"RGB", "L"}
_EXIF_ORIENTATION = 0x0112

# Magic bytes of image formats PIL does not decode here: "unsupported", not "not an image".
_OTHER_IMAGE_MAGIC = (
    (b"\x00\x00\x00\x0cjXL \r\n\x87\n", "jpeg-xl"), (b"\xff\x0a", "jpeg-xl"),
    (b"8BPS", "psd"), (b"%PDF", "pdf"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
    (b"\x00\x00\x01\x00", "ico"), (b"DDS ", "dds"), (b"qoif", "qoi"),
    (b"\x76\x2f\x31\x01", "openexr"), (b"#?RADIANCE", "hdr"),
)
# Magic bytes of the formats we decode: such a file that PIL cannot open is damaged.
_DECODABLE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_FTYP_BRANDS = {b"heic": "heic", b"heix": "heic", b"hevc": "heic", b"mif1": "heif",
                b"msf1": "heif", b"avif": "avif", b"avis": "avif"}


@dataclass
class Decoded:
    """What validation learned about one file; ``reason`` is None when it is usable."""
    sha256: str
    reason: str | None = None
    detail: str = ""
    image: Image.Image | None = None   # normalised 8-bit RGB
    format: str = ""
    mode: str = ""
    keep_suffix: str | None = None     # store the original bytes under this suffix
    dhash: int = 0
    source_size: tuple[int, int] = (0, 0)  # width, height the file declares
    reduction: int = 1                 # ``image`` is a JPEG decoded at 1/reduction scale


def sniff_unsupported(data: bytes) -> str | None:
    """Name of a known non-decodable image format, from its magic bytes."""
    head = data[:64]
    for magic, name in _OTHER_IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP_BRANDS:
        return _FTYP_BRANDS[head[8:12]]
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in data[:1024].lower()):
        return "svg"
    return None


def decode(data: bytes, *, min_size: int = 8, max_pixels: int = MAX_PIXELS,
           jpeg_reduction: Callable[[int, int], int] | None = None) -> Decoded:
    """Validate and normalise one file's bytes (its declared size is checked against
    ``max_pixels`` before any pixel is decoded).

    ``jpeg_reduction(width, height)`` gives the DCT scale (1, 2, 4 or 8) at which a JPEG
    that is kept byte for byte is decoded (libjpeg's scaled decoding, the pixels OpenCV's
    ``IMREAD_REDUCED_COLOR_<n>`` gives): the caller crops from ``image`` without decoding
    the file again."""
    with warnings.catch_warnings():
        # our cap reports large images with a reason; PIL's warning would only be noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _decode(data, min_size, max_pixels, jpeg_reduction)


def _decode(data: bytes, min_size: int, max_pixels: int,
            jpeg_reduction: Callable[[int, int], int] | None = None) -> Decoded:
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return Decoded(sha, "empty_file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format or "", img.mode
            if fmt not in SUPPORTED_FORMATS:
                return Decoded(sha, "unsupported_format", fmt.lower(), format=fmt)
            if img.width * img.height > max_pixels:
                return Decoded(sha, "decompression_bomb",
                               f"{img.width}x{img.height} > {max_pixels} pixels", format=fmt)
            size, reduction = img.size, 1
            # a JPEG's EXIF is read with its header: one kept as is may be decoded scaled
            if (jpeg_reduction is not None and fmt == "JPEG" and mode in _KEEP_MODES
                    and img.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1)):
                reduction = jpeg_reduction(*size)
                if reduction > 1:
                    img.draft(mode, (size[0] // reduction, size[1] // reduction))
            img.load()  # forces a full decode: truncated files fail here
            rotated = img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
            keep = KEEP_FORMATS.get(fmt) if mode in _KEEP_MODES and not rotated else None
            rgb = to_rgb8(ImageOps.exif_transpose(img) if rotated else img)
    except UnidentifiedImageError:
        other = sniff_unsupported(data)
        if other:
            return Decoded(sha, "unsupported_format", other)
        if data.startswith(_DECODABLE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            return Decoded(sha, "undecodable", "image signature but a damaged header")
        return Decoded(sha, "not_an_image")
    except Image.DecompressionBombError as exc:
        return Decoded(sha, "decompression_bomb", str(exc)[:200])
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            MemoryError, ZeroDivisionError, KeyError) as exc:
        # Decoders raise many types on corrupt data; "truncated" is the common one.
        text = str(exc)
        reason = "truncated" if isinstance(exc, EOFError) or "truncat" in text.lower() \
            or "premature end" in text.lower() else "undecodable"
        return Decoded(sha, reason, f"{type(exc).__name__}: {text[:200]}")
    if min(size) < min_size:
        return Decoded(sha, "too_small", f"{size[0]}x{size[1]} < {min_size}", format=fmt)
    return Decoded(sha, None, image=rgb, format=fmt, mode=mode, keep_suffix=keep,
                   dhash=dhash(rgb), source_size=size, reduction=reduction)


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float scaled (not clipped), alpha composited on white,
    palette, CMYK, LAB and the rest converted."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF/WebP, multi-page TIFF: the first frame
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else float(arr.max()) if arr.size else 1.0
        if mode == "F" and top <= 1.0:
            top = 1.0
        elif mode == "I" and top <= 255:
            top = 255.0
        elif mode == "I" and top <= 65535:
            top = 65535.0
        scaled = np.clip(arr / max(top, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def dhash(rgb: Image.Image) -> int:
    """64-bit difference hash: sign of horizontal gradients on a 9x8 gray thumbnail."""
    small = np.asarray(rgb.resize((9, 8), Image.Resampling.BILINEAR, reducing_gap=2.0).convert("L"),
                       dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def near_duplicate_pairs(hashes: list[int], max_distance: int = 3,
                         max_bucket: int = 256) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)`` with Hamming distance <= ``max_distance`` (<= 3).

    Pigeonhole over four 16-bit bands: two hashes within distance 3 agree on at
    least one band, so only hashes sharing a band are compared. A band value
    shared by more than ``max_bucket`` images (flat or blank pictures) is compared
    among its first ``max_bucket`` only, which keeps the work linear.
    """
    if max_distance > 3:
        raise ValueError("near_duplicate_pairs supports max_distance <= 3 (four bands)")
    arr = np.asarray(hashes, dtype=np.uint64)
    found: dict[tuple[int, int], int] = {}
    for band in range(4):
        keys = (arr >> np.uint64(16 * band)) & np.uint64(0xFFFF)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = order[s:min(e, s + max_bucket)]
            sub = arr[members]
            x = sub[:, None] ^ sub[None, :]
            dist = np.unpackbits(x.view(np.uint8), axis=-1).reshape(len(sub), len(sub), -1).sum(-1)
            ii, jj = np.nonzero(np.triu(dist <= max_distance, k=1))
            for a, b in zip(ii, jj):
                i, j = sorted((int(members[a]), int(members[b])))
                found[(i, j)] = int(dist[a, b])
    return sorted((i, j, d) for (i, j), d in found.items())


# ----------------------------------------------------------------------------- per file
# The functions below run in ingest's pool workers: this module stays light to import
# (no pandas, no scikit-learn), so a worker starts in a fraction of a second.


@dataclass(frozen=True)
class WorkerConfig:
    out_dir: str
    min_size: int
    max_pixels: int
    max_file_bytes: int
    s3: storage.S3Config | None = None   # the parent's settings (a forkserver's env may be stale)


class _TooLarge(Exception):
    pass


class _Reader:
    """Per-process state: the settings, open ZIP archives, an S3 client, an HTTP session."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.zips: dict[str, zipfile.ZipFile] = {}
        self.store: storage.S3Store | None = None
        self.fetcher = None   # triview.customvision.ImageFetcher, made on the first URL

    def read(self, locator: tuple) -> bytes:
        kind = locator[0]
        if kind == "file":
            with open(locator[1], "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > self.config.max_file_bytes:
                    raise _TooLarge(size)
                return f.read()
        if kind == "zip":
            zf = self.zips.get(locator[1])
            if zf is None:
                zf = self.zips[locator[1]] = zipfile.ZipFile(locator[1])
            return zf.read(locator[2])  # sizes were capped on the ZIP directory
        if kind == "s3":
            if self.store is None:
                self.store = storage.S3Store(self.config.s3)
            try:
                return self.store.get_bytes(locator[1])
            except storage.StorageError as exc:   # a table row naming no object
                if getattr(exc.__cause__, "code", None) in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    raise FileNotFoundError(f"no object {locator[1]}") from exc
                raise
        if kind == "url":   # a URI the Custom Vision API returned, checked by the source
            if self.fetcher is None:
                from triview.customvision import ImageFetcher

                self.fetcher = ImageFetcher()
            data = self.fetcher.fetch(locator[1], self.config.max_file_bytes)
            if len(data) > self.config.max_file_bytes:
                raise _TooLarge(f"at least {len(data)}")
            return data
        raise ValueError(f"unknown locator {locator!r}")

_READER: _Reader | None = None


def init_worker(config: WorkerConfig) -> None:
    global _READER
    _READER = _Reader(config)


def inspect_chunk(tasks: list[tuple[tuple, bool]]) -> list[tuple]:
    return [inspect_file(locator, write) for locator, write in tasks]


def inspect_file(locator: tuple, write: bool) -> tuple:
    """Read and validate one file; when ``write``, also return the bytes to store for it.

    Returns ``(reason, detail, sha256, width, height, format, mode, dhash, name, bytes,
    payload)``: ``name`` the stored image's name (``<sha256[:16]><suffix>``), ``payload``
    its bytes (the original file, or the normalised PNG) or None. The caller stores it: a
    worker writes nothing.
    """
    cfg = _READER.config
    try:
        data = _READER.read(locator)
    except FileNotFoundError as exc:
        return ("missing_file", str(exc)[:200], "", 0, 0, "", "", 0, "", 0, None)
    except DownloadFailed as exc:
        return ("download_failed", str(exc)[:200], "", 0, 0, "", "", 0, "", 0, None)
    except _TooLarge as exc:
        return ("too_large", f"{exc.args[0]} bytes > {cfg.max_file_bytes}", "", 0, 0, "", "", 0, "", 0, None)
    except RuntimeError as exc:  # zipfile: encrypted member
        reason = "encrypted" if "encrypted" in str(exc) else "read_error"
        return (reason, str(exc)[:200], "", 0, 0, "", "", 0, "", 0, None)
    except Exception as exc:  # any I/O failure of one file is that file's problem
        return ("read_error", f"{type(exc).__name__}: {str(exc)[:200]}", "", 0, 0, "", "", 0, "", 0, None)
    d = decode(data, min_size=cfg.min_size, max_pixels=cfg.max_pixels)
    if d.reason is not None:
        return (d.reason, d.detail, d.sha256, 0, 0, d.format, d.mode, 0, "", len(data), None)
    name = f"{d.sha256[:16]}{d.keep_suffix or '.png'}"
    payload = None
    if write:
        if d.keep_suffix:
            payload = data
        else:  # normalised: EXIF rotation applied, 8-bit RGB
            buf = io.BytesIO()
            d.image.save(buf, format="PNG", compress_level=1)
            payload = buf.getvalue()
    return (None, "", d.sha256, d.image.width, d.image.height, d.format, d.mode, d.dhash,
            name, len(data), payload)
