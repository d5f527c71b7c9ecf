"""Export the whole ensemble (three views + voter) as one TorchScript module and
write a JSON model card beside it."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from triview.storage import atomic_path, atomic_write_text
from triview.voter import EPS

ENSEMBLE_FILE = "ensemble.torchscript.pt"
CARD_FILE = "model_card.json"


class VoterModule(nn.Module):
    """The voter of ``triview.voter.apply_voter`` in torch (same maths, same order of views)."""

    def __init__(self, voter: dict, n_classes: int) -> None:
        super().__init__()
        views = list(voter["views"])
        self.method = voter["method"]
        self.single_index = views.index(voter["view"]) if self.method == "single" else 0
        n_features = len(views) * n_classes
        coef = torch.tensor(voter["coef"], dtype=torch.float32) if self.method == "logistic" \
            else torch.zeros(n_classes, n_features)
        intercept = torch.tensor(voter["intercept"], dtype=torch.float32) if self.method == "logistic" \
            else torch.zeros(n_classes)
        self.linear = nn.Linear(n_features, n_classes)
        with torch.no_grad():
            self.linear.weight.copy_(coef)
            self.linear.bias.copy_(intercept)

    def forward(self, probs: list[torch.Tensor]) -> torch.Tensor:
        if self.method == "mean":
            return torch.stack(probs, 0).mean(0)
        if self.method == "single":
            return probs[self.single_index]
        return torch.softmax(self.linear(torch.log(torch.cat(probs, 1) + EPS)), dim=1)


class Ensemble(nn.Module):
    """Three crops in (float RGB in [0, 1], N×3×S×S each, in view order) → class probabilities."""

    def __init__(self, branches: list[nn.Module], voter: dict, n_classes: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.voter = VoterModule(voter, n_classes)

    def forward(self, view0: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        inputs = [view0, view1, view2]
        probs = [torch.softmax(branch(x), dim=1) for branch, x in zip(self.branches, inputs)]
        return self.voter(probs)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def export_ensemble(branches: dict[str, nn.Module], voter: dict, classes: list[str],
                    geometry: dict, metrics: dict, out_dir: str | Path,
                    training: dict | None = None, example: list[torch.Tensor] | None = None) -> dict:
    """Trace the ensemble to TorchScript, check it against eager, write it and the model card."""
    views = list(voter["views"])
    model = Ensemble([branches[v].eval() for v in views], voter, len(classes)).eval()
    size = int(geometry["geometry"]["image_size"])
    if example is None:
        example = [torch.rand(2, 3, size, size) for _ in views]
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is still the format
        # that C++/Java serving stacks load; the ONNX export complements it.
        warnings.filterwarnings("ignore", category=FutureWarning)
        traced = torch.jit.trace(model, tuple(example))
        eager_out, traced_out = model(*example), traced(*example)
    max_diff = float((eager_out - traced_out).abs().max())
    if max_diff > 1e-5:
        raise RuntimeError(f"TorchScript output differs from eager by {max_diff:.2e}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ENSEMBLE_FILE) as tmp:
        traced.save(str(tmp))
    card = {
        "name": "triview",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": classes,
        "views": views,
        "inputs": f"{len(views)} tensors, float32 RGB in [0,1], shape N x 3 x {size} x {size}, "
                  "in the order of 'views'; normalisation is inside the model",
        "output": "class probabilities, N x C, columns in the order of 'classes'",
        "image_size": size,
        "crop_geometry": geometry["geometry"],
        "lens": geometry.get("lens"),
        "voter": {k: voter[k] for k in ("name", "method", "val_macro_f1") if k in voter},
        "test_metrics": metrics,
        "training": training or {},
        "torchscript_max_abs_diff": max_diff,
        "files": {"torchscript": ENSEMBLE_FILE},
        "lineage": {"git_commit": git_commit()},
    }
    atomic_write_text(out / CARD_FILE, json.dumps(card, indent=2, default=_jsonable))
    return card


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def load_ensemble(folder: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    folder = Path(folder)
    card = json.loads((folder / CARD_FILE).read_text())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        module = torch.jit.load(str(folder / card["files"]["torchscript"]), map_location="cpu")
    return module, card
