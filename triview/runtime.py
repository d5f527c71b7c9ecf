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


#: The ONNX graph's first output: the ensemble's probabilities (N x C).
ENSEMBLE_OUTPUT = "probabilities"


def view_output_name(k: int) -> str:
    """The output with view ``k``'s own probabilities (exports since per-view outputs)."""
    return f"view{k}_probabilities"


def run_onnx(session, inputs: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The ensemble's probabilities (the graph's first output) for per-view inputs."""
    n = len(inputs[0])
    first = [session.get_outputs()[0].name]
    out = [session.run(first, onnx_feed(session, [x[i:i + batch_size] for x in inputs]))[0]
           for i in range(0, n, batch_size)]
    return np.concatenate(out)


def run_onnx_views(session, inputs: list[np.ndarray], batch_size: int = 256
                   ) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """The ensemble's probabilities and each view's own, in view order; the views are
    None for a graph exported without per-view outputs."""
    names = {o.name for o in session.get_outputs()}
    wanted = [view_output_name(k) for k in range(len(inputs))]
    if not set(wanted) <= names:
        return run_onnx(session, inputs, batch_size), None
    fetch = [session.get_outputs()[0].name] + wanted
    parts = [session.run(fetch, onnx_feed(session, [x[i:i + batch_size] for x in inputs]))
             for i in range(0, len(inputs[0]), batch_size)]
    joined = [np.concatenate(column) for column in zip(*parts)]
    return joined[0], joined[1:]


class Runtime:
    """An exported ensemble ready to run: called with per-view float32 NCHW arrays it
    returns the probabilities (N x C); :meth:`with_views` also each view's own."""

    def __init__(self, run: Callable[[list[np.ndarray]], np.ndarray],
                 run_views: Callable[[list[np.ndarray]], tuple] | None = None) -> None:
        self._run, self._run_views = run, run_views

    def __call__(self, inputs: list[np.ndarray]) -> np.ndarray:
        return self._run(inputs)

    def with_views(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """``(probabilities, [view probabilities] or None)``: None for a TorchScript-only
        export or an ONNX graph without per-view outputs."""
        if self._run_views is None:
            return self._run(inputs), None
        return self._run_views(inputs)


def load_runtime(folder: str | Path, threads: int = 0) -> tuple[Runtime, dict]:
    """A :class:`Runtime` from per-view float32 NCHW arrays to probabilities, and the card.
    ONNX Runtime when the export has an ONNX file, else TorchScript."""
    folder = Path(folder)
    card = read_card(folder)
    onnx_file = card.get("files", {}).get("onnx")
    if onnx_file and (folder / onnx_file).is_file():
        session = onnx_session(folder / onnx_file, threads)
        return Runtime(lambda inputs: run_onnx(session, inputs),
                       lambda inputs: run_onnx_views(session, inputs)), card
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
    return Runtime(run), card
