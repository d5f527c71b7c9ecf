"""Export the whole ensemble (three views + voter) as TorchScript and ONNX, with its
weights as safetensors and a model card (JSON + Markdown) beside them.

Both exported forms are checked against eager PyTorch on real test crops before they
are written: TorchScript within 1e-5 and ONNX Runtime within 1e-4 (max abs difference
of the probabilities). Optional INT8 quantization (ONNX Runtime, dynamic or static)
reports its accuracy change on the same test crops.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from triview import artifacts
from triview.artifacts import (CARD_FILE, CARD_MD, ENSEMBLE_FILE, INT8_FILE, ONNX_FILE, VOTER_FILE,
                               WEIGHTS_FILE)
from triview.models import NORMALIZATION_CONSTANTS
# the torch-free loaders live in triview.runtime (the serving environment has no torch)
from triview.runtime import (ENSEMBLE_OUTPUT, onnx_session, run_onnx, run_onnx_views,
                             view_output_name)
from triview.storage import atomic_path, atomic_write_text
from triview.voter import get_method, upgrade

ONNX_OPSET = 17
TORCHSCRIPT_TOLERANCE = 1e-5
ONNX_TOLERANCE = 1e-4
#: the exported model against the probabilities evaluate scored on the same test crops
#: (computed by the branches from cached features: other float paths, same model)
EVALUATED_TOLERANCE = 1e-3
QUANTIZE_MODES = ("none", "dynamic", "static")


class Ensemble(nn.Module):
    """Three crops in (float RGB in [0, 1], N×3×S×S each, in view order) → calibrated class
    probabilities: each branch (a :class:`triview.models.ServedBranch`: its test-time passes
    and temperature inside) through a softmax (a sigmoid per label for
    ``task="multilabel"``), combined by the voter's method as a torch module
    (:meth:`VoterMethod.module`), then the voter's temperature."""

    def __init__(self, branches: list[nn.Module], voter: dict, n_classes: int,
                 task: str = "multiclass") -> None:
        super().__init__()
        from triview.temperature import EPS
        from triview.voter_modules import Temperature

        voter = upgrade(voter)
        method = get_method(voter["method"])
        if task == "multilabel" and not method.multilabel:
            raise ValueError(f"the {method.name} voter is multi-class only")
        self.multilabel = task == "multilabel"
        self.branches = nn.ModuleList(branches)
        self.voter = method.module(voter["params"], len(branches), n_classes, task)
        temperature = voter.get("temperature")
        self.calibrate = (nn.Identity() if temperature is None
                          else Temperature(temperature, self.multilabel, EPS))

    def forward(self, view0: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        return self.combine(self.view_probabilities([view0, view1, view2]))

    def combine(self, probs: list[torch.Tensor]) -> torch.Tensor:
        """The voter over the views' probabilities, then the ensemble's temperature."""
        return self.calibrate(self.voter(probs))

    def view_probabilities(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each branch's own probabilities (N x C), in view order: what the voter combines."""
        if self.multilabel:
            return [torch.sigmoid(branch(x)) for branch, x in zip(self.branches, inputs)]
        return [torch.softmax(branch(x), dim=1) for branch, x in zip(self.branches, inputs)]


class EnsembleWithViews(nn.Module):
    """The module the ONNX graph is exported from: the ensemble's probabilities first
    (output ``probabilities``, what every caller reads, unchanged), then each view's own
    (``view<k>_probabilities``), so that a caller can show what each view saw."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, view0: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        probs = self.ensemble.view_probabilities([view0, view1, view2])
        return (self.ensemble.combine(probs), *probs)


def git_commit() -> str | None:
    """This checkout's commit, else ``TRIVIEW_GIT_COMMIT`` (set in the images at build time)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parent).stdout.strip()
        if commit:
            return commit
    except (OSError, subprocess.CalledProcessError):
        pass
    return os.environ.get("TRIVIEW_GIT_COMMIT") or None


@contextlib.contextmanager
def _quiet_deprecations():
    # TorchScript and the TorchScript-based ONNX exporter are deprecated in favour of
    # torch.export; they are still what C++/Java serving stacks and ONNX Runtime load.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        yield


@torch.no_grad()
def run_torch(module: nn.Module, inputs: list[np.ndarray] | list[torch.Tensor],
              batch_size: int = 256) -> np.ndarray:
    tensors = [torch.as_tensor(x) for x in inputs]
    return torch.cat([module(*[t[i:i + batch_size] for t in tensors])
                      for i in range(0, len(tensors[0]), batch_size)]).numpy()


def _quantize(fp32: Path, out: Path, mode: str, calibration: list[np.ndarray] | None) -> dict:
    """Write the INT8 model of ``fp32`` to ``out``; return how it was quantized.

    ``static``: QDQ with activations calibrated on ``calibration`` (validation crops), and
    the weights quantized both per channel and per tensor; the one whose answers agree more
    often with the fp32 model's on those crops is kept (per tensor on ties: the simpler
    graph). Neither is right for every network: on the digits preset's ShuffleNet v2 x0.5
    per-channel weights cost 8 points of test accuracy (0.974 to 0.896; per tensor 0.970),
    so the choice is measured, never assumed. Test crops are never read here."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    if mode == "dynamic":
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QUInt8)
        return {}
    if calibration is None:
        raise ValueError("static quantization needs calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(calibration[0])
            self.batches = iter([{f"view{k}": x[i:i + 32] for k, x in enumerate(calibration)}
                                 for i in range(0, n, 32)])

        def get_next(self):
            return next(self.batches, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    reference = run_onnx(onnx_session(fp32), calibration).argmax(1)
    # shape inference and graph folding first, as ONNX Runtime recommends for static INT8
    prepared = out.with_name(out.stem + ".pre.onnx")
    candidates = {granularity: out.with_name(f"{out.stem}.{granularity}.onnx")
                  for granularity in ("per_tensor", "per_channel")}
    agreement = {}
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        for granularity, path in candidates.items():
            quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=granularity == "per_channel",
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            answers = run_onnx(onnx_session(path), calibration).argmax(1)
            agreement[granularity] = float((answers == reference).mean())
        chosen = max(agreement, key=lambda g: (agreement[g], g == "per_tensor"))
        os.replace(candidates[chosen], out)
    finally:
        prepared.unlink(missing_ok=True)
        for path in candidates.values():
            path.unlink(missing_ok=True)
    return {"weights": chosen, "calibration_images": len(reference),
            "calibration_agreement": agreement}


def export_ensemble(branches: dict[str, nn.Module], voter: dict, classes: list[str],
                    geometry: dict, metrics: dict, out_dir: str | Path,
                    training: dict | None = None, example: list[torch.Tensor] | None = None, *,
                    test_labels: np.ndarray | None = None, calibration: list[torch.Tensor] | None = None,
                    quantize: str = "none", task: str = "multiclass",
                    lineage: dict | None = None, data_version: str | None = None,
                    data: dict | None = None, evaluated: np.ndarray | None = None) -> dict:
    """Export the ensemble to TorchScript and ONNX, check both against eager on ``example``
    (real test crops, float [0, 1]), write the weights, the voter and the model card.

    ``evaluated``: the ensemble probabilities evaluate scored for the ``example`` crops
    (in their order); the exported model must give the same (test-time augmentation and
    temperatures included) within :data:`EVALUATED_TOLERANCE`, else nothing is written.

    With ``quantize`` "dynamic" or "static" (calibrated on ``calibration`` crops) an INT8
    ONNX model is written too and its accuracy on ``example``/``test_labels`` reported.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    voter = upgrade(voter)
    views = list(voter["views"])
    model = Ensemble([branches[v].eval() for v in views], voter, len(classes), task).eval()
    size = int(geometry["geometry"]["image_size"])
    if example is None:
        example = [torch.rand(2, 3, size, size) for _ in views]
    example = [x.float().contiguous() for x in example]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace_inputs = tuple(x[:4] for x in example)
    with _quiet_deprecations():
        with torch.no_grad():
            # check_trace re-runs the model; the parity check below covers more images
            traced = torch.jit.trace(model, trace_inputs, check_trace=False)
            eager_out = run_torch(model, example)
            traced_out = run_torch(traced, example)
        ts_diff = float(np.abs(eager_out - traced_out).max())
        if ts_diff > TORCHSCRIPT_TOLERANCE:
            raise RuntimeError(f"TorchScript output differs from eager by {ts_diff:.2e}")
        with atomic_path(out / ENSEMBLE_FILE) as tmp:
            traced.save(str(tmp))
        names = [f"view{k}" for k in range(len(views))]
        # Per-view outputs cost nothing where the ensemble computes every view anyway; a
        # voter that reads fewer (single) keeps its pruned graph, and its speed, without them.
        with_views = get_method(voter["method"]).reads_every_view
        outputs = [ENSEMBLE_OUTPUT] + ([view_output_name(k) for k in range(len(views))]
                                       if with_views else [])
        with atomic_path(out / ONNX_FILE) as tmp:
            # eval(): the exporter leaves the module in the mode it found it in
            torch.onnx.export(EnsembleWithViews(model).eval() if with_views else model,
                              trace_inputs, str(tmp), input_names=names,
                              output_names=outputs, opset_version=ONNX_OPSET,
                              dynamic_axes={n: {0: "batch"} for n in names + outputs},
                              dynamo=False)
    arrays = [x.numpy() for x in example]
    onnx_out, onnx_views = run_onnx_views(onnx_session(out / ONNX_FILE), arrays)
    onnx_diff = float(np.abs(eager_out - onnx_out).max())
    if onnx_diff > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX Runtime output differs from eager by {onnx_diff:.2e}")
    evaluated_diff = None
    # rows evaluate did not score (NaN: the branches' own test split lacked those crops) are
    # not compared; every other row must agree
    known = (np.isfinite(np.asarray(evaluated, dtype=np.float64)).all(axis=1)
             if evaluated is not None else None)
    if evaluated is not None and known.any():
        evaluated_diff = float(np.abs(np.asarray(evaluated)[known] - onnx_out[known]).max())
        if evaluated_diff > EVALUATED_TOLERANCE:
            for name in (ENSEMBLE_FILE, ONNX_FILE):
                (out / name).unlink(missing_ok=True)
            raise RuntimeError(
                f"the exported model answers differently from what evaluate scored on the same "
                f"test crops (max abs difference {evaluated_diff:.2e} > {EVALUATED_TOLERANCE:g}): "
                "its test-time augmentation or temperatures are not the branches'")
    if onnx_views is not None:
        with torch.no_grad():
            eager_views = [torch.cat(parts).numpy() for parts in zip(*(
                model.view_probabilities([x[i:i + 256] for x in example])
                for i in range(0, len(example[0]), 256)))]
        views_diff = max(float(np.abs(e - o).max()) for e, o in zip(eager_views, onnx_views))
        if views_diff > ONNX_TOLERANCE:
            raise RuntimeError(f"ONNX Runtime per-view outputs differ from eager by "
                               f"{views_diff:.2e}")

    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "views": ",".join(views)})
    atomic_write_text(out / VOTER_FILE, json.dumps(voter, indent=2))

    files = {"torchscript": ENSEMBLE_FILE, "onnx": ONNX_FILE, "weights": WEIGHTS_FILE,
             "voter": VOTER_FILE, "card_markdown": CARD_MD}
    quant = None
    if quantize != "none":
        calib = [x.numpy() for x in calibration] if calibration is not None else None
        with atomic_path(out / INT8_FILE) as tmp:
            how = _quantize(out / ONNX_FILE, tmp, quantize, calib)
        int8_out = run_onnx(onnx_session(out / INT8_FILE), arrays)
        quant = {"mode": quantize, "file": INT8_FILE, **how,
                 "size_bytes": (out / INT8_FILE).stat().st_size,
                 "fp32_size_bytes": (out / ONNX_FILE).stat().st_size,
                 "max_abs_diff": float(np.abs(int8_out - onnx_out).max()),
                 "n_images": len(onnx_out)}
        if test_labels is not None:
            from triview.scoring import predicted

            cut = voter.get("thresholds") if task == "multilabel" else None

            def accuracy(p):
                return float((predicted(p, task, cut) == test_labels).mean())

            quant.update(fp32_accuracy=accuracy(onnx_out), int8_accuracy=accuracy(int8_out))
            quant["accuracy_delta"] = quant["int8_accuracy"] - quant["fp32_accuracy"]
        files["onnx_int8"] = INT8_FILE

    card = {
        "name": "triview",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task,
        "classes": classes,
        "views": views,
        "inputs": f"{len(views)} tensors view0..view{len(views) - 1}, float32 RGB in [0,1], shape "
                  f"N x 3 x {size} x {size}, in the order of 'views'; normalisation is inside the model",
        "output": ("per-label probabilities" if task == "multilabel" else "class probabilities")
                  + ", N x C, columns in the order of 'classes'",
        "image_size": size,
        "preprocessing": {"decode": "8-bit RGB, EXIF orientation applied (as ingest)",
                          "crop": "calibrate-and-crop with crop_geometry and lens (as training)",
                          "scale": 1.0 / 255.0, "layout": "NCHW", "channel_order": "RGB",
                          "normalization": {v: _normalization_of(training, v) for v in views},
                          "normalisation_inside_model": True},
        "crop_geometry": geometry["geometry"],
        "lens": geometry.get("lens"),
        "voter": {k: voter[k] for k in ("name", "method", "val_macro_f1", "scored_on", "n_scored")
                  if k in voter},
        # calibrated probabilities: per-branch temperatures and the voter's, fitted on
        # held-out predictions; the test-time passes each branch averages
        "calibration": {"temperatures": {v: (training or {}).get(v, {}).get("temperature")
                                         for v in views},
                        "ensemble_temperature": voter.get("temperature"),
                        "ece": (metrics.get("ensemble") or {}).get("ece"),
                        "ece_before": (metrics.get("ensemble") or {}).get("ece_before")},
        "tta": {v: (training or {}).get(v, {}).get("tta") for v in views},
        # multi-label decision thresholds per label, tuned on validation (predict's default)
        "thresholds": voter.get("thresholds") if task == "multilabel" else None,
        "test_metrics": metrics,
        "training": training or {},
        "data_version": data_version,
        # the images the model saw (train + val), so that a later gate scores it only on
        # images it has not seen
        "data": data or {},
        "torchscript_max_abs_diff": ts_diff,
        "onnx_max_abs_diff": onnx_diff,
        "evaluated_max_abs_diff": evaluated_diff,
        "parity_images": int(len(example[0])),
        "onnx_opset": ONNX_OPSET,
        "quantization": quant,
        "files": files,
        "lineage": {"git_commit": git_commit(), **(lineage or {})},
    }
    artifacts.write_card(out, card)
    atomic_write_text(out / CARD_MD, card_markdown(card))
    return card


def _normalization_of(training: dict | None, view: str) -> dict:
    """The input normalisation inside a branch: its mode, and mean/std where it has them."""
    info = (training or {}).get(view, {})
    mode = info.get("normalization") or (info.get("config") or {}).get("normalization", "imagenet")
    mean, std = NORMALIZATION_CONSTANTS.get(mode, (None, None))
    return {"mode": mode, "mean": list(mean) if mean else None, "std": list(std) if std else None}


def _weights_verification(w: dict) -> str:
    """What the SHA-256 check proved about a branch's starting weights (weights.Resolved)."""
    verification = w.get("verification") or ("published" if w.get("published", True) else "own")
    return {"published": " (the published file: full SHA-256 verified)",
            "unverified": " (UNVERIFIED: no full published SHA-256 is pinned for it; only the "
                          "8-digit prefix in its name matched)",
            }.get(verification, " (NOT the published file: your own)")


def card_markdown(card: dict) -> str:
    """The model card for people: what the model is, how to feed it, how good it is."""
    m = card.get("test_metrics") or {}
    lines = [f"# Model card: {card['name']}", "",
             f"Created {card['created']}; task `{card.get('task', 'multiclass')}`; data version "
             f"`{card.get('data_version')}`; git commit `{(card.get('lineage') or {}).get('git_commit')}`; "
             f"run `{(card.get('lineage') or {}).get('run_id')}`.", "",
             "## Labels", "", ", ".join(f"`{c}`" for c in card["classes"]), "",
             "## Inputs", "", card["inputs"] + ".", "",
             f"Views `{', '.join(card['views'])}`, image size {card['image_size']}, crop geometry "
             f"`{json.dumps(card['crop_geometry'])}`, lens "
             f"{'identity' if not (card.get('lens') or {}).get('K') else 'calibrated'}. "
             "Normalisation ("
             + ", ".join(f"{v}: {n['mode']}" for v, n in card["preprocessing"]["normalization"].items())
             + ") is inside the model.", "",
             "## Test metrics", "", "| model | accuracy | macro-F1 | ECE (before scaling) |",
             "|---|---|---|---|"]
    for name, s in {**(m.get("views") or {}), "ensemble": m.get("ensemble") or {}}.items():
        if s:
            ece = (f"{s['ece']:.4f} ({s['ece_before']:.4f})" if s.get("ece") is not None
                   and s.get("ece_before") is not None else "-")
            lines.append(f"| {name} | {s.get('accuracy', float('nan')):.4f} | "
                         f"{s.get('macro_f1', float('nan')):.4f} | {ece} |")
    c = card.get("calibration") or {}
    if c.get("ensemble_temperature") is not None:
        temps = ", ".join(f"{v} {t:.3f}" for v, t in (c.get("temperatures") or {}).items() if t)
        lines += ["", "## Calibration", "",
                  f"The probabilities are temperature-scaled (fitted on held-out predictions, "
                  f"never on test): branch temperatures {temps or '-'}, ensemble "
                  f"{c['ensemble_temperature']:.3f}; test ECE {c.get('ece') or float('nan'):.4f} "
                  f"after, {c.get('ece_before') or float('nan'):.4f} before. Test-time "
                  "augmentation inside the model: "
                  + ", ".join(f"{v} {'+'.join(t)}" for v, t in (card.get("tta") or {}).items() if t)
                  + "."]
    lines += ["", "## Training", "", "| view | backbone | epochs | best epoch | parameters | "
              "pretrained weights (source, SHA-256) |", "|---|---|---|---|---|---|"]
    for view, t in (card.get("training") or {}).items():
        cfg, w = t.get("config", {}), t.get("weights") or {}
        start = (f"{cfg.get('weights')} from {w.get('source')}: `{w.get('file')}` "
                 f"sha256 `{(w.get('sha256') or '')[:16]}`"
                 + _weights_verification(w)
                 if w else "none (random initialisation)")
        lines.append(f"| {view} | {cfg.get('backbone')} | {cfg.get('epochs')} | {t.get('best_epoch')} "
                     f"| {(t.get('parameters') or {}).get('total')} | {start} |")
    lines += ["", "## Files and parity", "",
              f"TorchScript `{card['files']['torchscript']}` (max abs diff to eager "
              f"{card['torchscript_max_abs_diff']:.1e}), ONNX `{card['files']['onnx']}` (opset "
              f"{card['onnx_opset']}, ONNX Runtime max abs diff {card['onnx_max_abs_diff']:.1e}, on "
              f"{card['parity_images']} test images), weights `{card['files']['weights']}`."]
    q = card.get("quantization")
    if q:
        lines += ["", f"INT8 ({q['mode']}): `{q['file']}`, {q['size_bytes']} bytes "
                      f"(fp32 {q['fp32_size_bytes']}); accuracy change "
                      f"{q.get('accuracy_delta', float('nan')):+.4f}, max abs diff {q['max_abs_diff']:.3f}."]
        if q.get("weights"):
            agree = ", ".join(f"{g.replace('_', ' ')} {a:.3f}"
                              for g, a in q["calibration_agreement"].items())
            lines += [f"Weights quantized {q['weights'].replace('_', ' ')}: the granularity whose "
                      f"answers agree more with fp32 on the {q['calibration_images']} validation "
                      f"crops ({agree})."]
    return "\n".join(lines) + "\n"


read_card = artifacts.read_card


def load_ensemble(folder: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    folder = Path(folder)
    card = read_card(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        module = torch.jit.load(str(folder / card["files"]["torchscript"]), map_location="cpu")
    return module, card


def load_eager(folder: str | Path) -> tuple[Ensemble, dict]:
    """Rebuild the eager PyTorch ensemble from the card, the voter and the safetensors weights."""
    from safetensors.torch import load_file

    from triview.models import BranchNet, ServedBranch, create_backbone

    folder = Path(folder)
    card = read_card(folder)
    voter = upgrade(json.loads((folder / card["files"]["voter"]).read_text()))
    branches = []
    for view in card["views"]:
        training = card["training"][view]
        cfg = training["config"]
        net = BranchNet(create_backbone(cfg["backbone"], len(card["classes"]), card["image_size"],
                                        cfg.get("hidden", 0)),
                        training.get("normalization") or cfg.get("normalization", "imagenet"))
        if "tta" in card:  # exports since test-time passes and temperatures are inside the model
            net = ServedBranch(net, tuple(training.get("tta") or ("identity",)),
                               float(training.get("temperature") or 1.0))
        branches.append(net)
    model = Ensemble(branches, voter, len(card["classes"]), card.get("task", "multiclass"))
    model.load_state_dict(load_file(str(folder / card["files"]["weights"])))
    return model.eval(), card
