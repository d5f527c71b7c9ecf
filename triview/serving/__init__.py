"""Serving an exported ensemble with KServe (``triview serve``).

The predictor runs in an environment of its own: KServe 0.21 needs pandas < 3 and the
training environment pins pandas 3, and the predictor needs neither torch nor pandas
(``triview.predict``, ``triview.crop``, ``triview.runtime`` import neither). This package's
``__init__`` and :mod:`~triview.serving.protocol` import no KServe, so the training
environment can find the serving interpreter, talk to a server and validate one;
:mod:`~triview.serving.model` and :mod:`~triview.serving.server` run only where KServe is.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

#: The serving virtual environment ``make serve-env`` creates in the repository.
SERVE_VENV = ".venv-serve"
#: Set to a Python interpreter that has the serving requirements (the images set it).
SERVE_PYTHON_ENV = "TRIVIEW_SERVE_PYTHON"
REPO = Path(__file__).resolve().parents[2]


def has_kserve() -> bool:
    """Whether this interpreter can run the predictor itself."""
    return importlib.util.find_spec("kserve") is not None


def serve_python() -> str | None:
    """The interpreter that runs the predictor: ``$TRIVIEW_SERVE_PYTHON``, else this one
    when it has KServe, else the repository's ``.venv-serve``; None when there is none."""
    configured = os.environ.get(SERVE_PYTHON_ENV)
    if configured:
        return configured if Path(configured).is_file() else None
    if has_kserve():
        return sys.executable
    venv = REPO / SERVE_VENV / "bin" / "python"
    return str(venv) if venv.is_file() else None


DEFAULT_PORT = 8080
#: Images one request may carry (a larger batch is refused: split it).
MAX_IMAGES = 64
#: Largest request body accepted (bytes); a larger one gets 413 and is never buffered.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Pixels one image may declare, all images of one request together, and all inference
#: threads decode at once (:mod:`triview.serving.limits`).
MAX_IMAGE_PIXELS = 50_000_000
MAX_REQUEST_PIXELS = 256_000_000
MAX_SERVER_PIXELS = 100_000_000
SERVE_DESCRIPTION = ("Serve an exported triview ensemble with KServe's ModelServer: v1 "
                     "/v1/models/<name>:predict and v2 /v2/models/<name>/infer (base64 image "
                     "files in, labels and scores out, as `triview predict --format json`), "
                     "health, readiness, metadata and /metrics. Runs in the serving environment: "
                     f"from the training venv, `triview serve` replaces itself with {SERVE_VENV}'s "
                     f"Python (`make serve-env`) or ${SERVE_PYTHON_ENV}.")


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``triview serve`` (shared by the CLI and the server module)."""
    parser.add_argument("--model", required=True,
                        metavar="RUN_OUT|MODEL_DIR|REGISTRY/NAME[@champion|@VERSION]",
                        help="the --out folder of a triview run, an exported model folder, a "
                        "registry model folder (models/<name>: its champion) or version, local "
                        "or s3://; REGISTRY/<name>@champion or @<version> picks a version")
    parser.add_argument("--name", default=None, metavar="NAME", help="model name in the routes "
                        "(default: the registry model name, else the model card's name)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                        help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                        help="listen address (default 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="ONNX Runtime intra-op threads per inference (default 1; 0: one "
                        "per core)")
    parser.add_argument("--inference-workers", type=int, default=default_workers(), metavar="N",
                        help="inferences run at once, each on its own thread (default: the "
                        "CPUs this process may use, at most 4)")
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES, metavar="N",
                        help=f"images per request (default {MAX_IMAGES})")
    parser.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="PIXELS",
                        help="pixels one image may declare, else 413 before decoding (default "
                        f"{MAX_IMAGE_PIXELS:,}; serving's own cap, below ingest's)")
    parser.add_argument("--max-request-pixels", type=int, default=MAX_REQUEST_PIXELS, metavar="PIXELS",
                        help="pixels the images of one request may declare together, else 413 "
                        f"before decoding (default {MAX_REQUEST_PIXELS:,})")
    parser.add_argument("--max-server-pixels", type=int, default=MAX_SERVER_PIXELS, metavar="PIXELS",
                        help="pixels all inference threads decode at once; an image waits "
                        f"until it fits (default {MAX_SERVER_PIXELS:,}: decoding takes about "
                        "10 bytes of memory a pixel, so about 1 GB)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, metavar="BYTES",
                        help=f"largest request body, else 413 (default {MAX_BODY_BYTES})")


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The server's command-line arguments for parsed ``triview serve`` options."""
    argv = []
    for key in ("model", "name", "port", "host", "threads", "inference_workers", "max_images",
                "max_pixels", "max_request_pixels", "max_server_pixels", "max_body_bytes"):
        value = getattr(args, key, None)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def check_model(spec: str) -> None:
    """Refuse a local model that is not there, before anything asks for the serving
    environment (an ``s3://`` model is fetched by the server itself)."""
    from triview.registry import resolve_model_spec

    if "://" in spec:
        return
    location = spec.rpartition("@")[0] if "@" in spec and not Path(spec).exists() else spec
    if not Path(location).exists():
        raise FileNotFoundError(f"no model at {location!r}: give a `triview run --out` folder, an "
                                f"exported model folder or a registry model (REGISTRY/<name>@champion)")
    resolve_model_spec(spec)   # RegistryError (a ValueError) says what the folder lacks


def serve_command(argv: list[str], python: str | None = None) -> list[str]:
    """The command that starts the predictor with ``argv`` in the serving environment."""
    python = python or serve_python()
    if python is None:
        raise FileNotFoundError(
            f"no serving environment: run `make serve-env` (creates {SERVE_VENV}) or set "
            f"{SERVE_PYTHON_ENV} to a Python with requirements-serve.txt and triview installed")
    return [python, "-m", "triview.serving.server", *argv]
