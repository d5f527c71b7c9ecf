"""Run an exported ensemble without PyTorch: the model card and the ONNX graph through
ONNX Runtime. ``triview predict`` and the KServe predictor (``triview serve``) load models
through here, so the serving environment needs neither torch nor pandas; only an export
without an ONNX file falls back to TorchScript (and then imports torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from triview.artifacts import CARD_FILE, read_card  # noqa: F401 (the card is the contract)


def onnx_session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_feed(session, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``{"view<k>": inputs[k]}`` for the inputs the graph kept: the exporter prunes the
    views a voter ignores (e.g. ``single``), so inputs are matched by name, never by order."""
    return {i.name: inputs[int(i.name.removeprefix("view"))] for i in session.get_inputs()}


def run_onnx(session, inputs: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
    n = len(inputs[0])
    out = [session.run(None, onnx_feed(session, [x[i:i + batch_size] for x in inputs]))[0]
           for i in range(0, n, batch_size)]
    return np.concatenate(out)


def load_runtime(folder: str | Path, threads: int = 0
                 ) -> tuple[Callable[[list[np.ndarray]], np.ndarray], dict]:
    """A function from per-view float32 NCHW arrays to probabilities, and the card.
    ONNX Runtime when the export has an ONNX file, else TorchScript."""
    folder = Path(folder)
    card = read_card(folder)
    onnx_file = card.get("files", {}).get("onnx")
    if onnx_file and (folder / onnx_file).is_file():
        session = onnx_session(folder / onnx_file, threads)
        return (lambda inputs: run_onnx(session, inputs)), card
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        module = torch.jit.load(str(folder / card["files"]["torchscript"]), map_location="cpu")

    @torch.no_grad()
    def run(inputs: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        tensors = [torch.as_tensor(x) for x in inputs]
        return torch.cat([module(*[t[i:i + batch_size] for t in tensors])
                          for i in range(0, len(tensors[0]), batch_size)]).numpy()
    return run, card
