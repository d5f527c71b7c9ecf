"""Infra validation before promotion (TFX InfraValidator style): the exported model is
served by the real predictor in the serving environment and its answers are compared
with ONNX Runtime; the export stage promotes only what passed, and says why not."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from triview.predict import Predictor
from triview.registry import ModelRegistry
from triview.serving import infra


@pytest.fixture(scope="module")
def sample(cropped) -> list[bytes]:
    return infra.sample_images(cropped, n=6)


def test_a_good_export_passes(exported, serve_python, sample):
    verdict = infra.infra_validate(exported, sample, python=serve_python)
    assert verdict["passed"], verdict
    assert set(verdict) >= {"passed", "reason", "max_abs_diff", "n", "startup_seconds"}
    assert verdict["n"] == 6 and 0 <= verdict["max_abs_diff"] <= 1e-5
    assert 0 < verdict["startup_seconds"] < 120


def test_answers_that_differ_from_onnx_runtime_fail(exported, serve_python, sample,
                                                   monkeypatch):
    """The reference side is shifted by 1e-3 here; the server (a subprocess) is untouched."""
    original = Predictor.probabilities
    monkeypatch.setattr(Predictor, "probabilities", lambda self, views: original(self, views) + 1e-3)
    verdict = infra.infra_validate(exported, sample, python=serve_python)
    assert not verdict["passed"]
    assert "differ from ONNX Runtime" in verdict["reason"] and verdict["max_abs_diff"] > 1e-5


def test_a_server_that_does_not_come_up_fails(exported, sample, tmp_path):
    # an export without its ONNX file: this process falls back to TorchScript, the serving
    # environment (no torch) cannot load it and exits
    broken = tmp_path / "model"
    shutil.copytree(exported, broken)
    (broken / "ensemble.onnx").unlink()
    verdict = infra.infra_validate(broken, sample[:2], timeout=60)
    if infra.serve_python() is None:
        assert "no serving environment" in verdict["reason"]
    assert not verdict["passed"] and "did not come up" in verdict["reason"] or \
        "no serving environment" in verdict["reason"]
    # an interpreter without KServe cannot serve at all
    verdict = infra.infra_validate(exported, sample[:2], python=sys.executable, timeout=60)
    assert not verdict["passed"] and "did not come up" in verdict["reason"]
    assert "kserve" in verdict["reason"].lower()  # the server's own error, from its log


def test_sample_images_are_real_test_images(ingested, cropped):
    crops = infra.sample_images(cropped, n=4)
    photos = infra.sample_images(cropped, n=4, dataset_dir=ingested)
    assert len(crops) == len(photos) == 4
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(crops[0])).size == (32, 32)
    assert Image.open(io.BytesIO(photos[0])).size[0] > 32
    assert infra.sample_images(cropped, n=4) == crops  # deterministic


@pytest.mark.slow
def test_export_promotes_only_what_the_predictor_served_correctly(trained, cropped, voted,
                                                                  evaluated, serve_python,
                                                                  tmp_path, monkeypatch):
    from triview.stages import export_stage

    dirs = list(trained.values())
    voter_dir, eval_dir = voted, evaluated
    registry = str(tmp_path / "registry")

    rec = export_stage(dirs, voter_dir, cropped, eval_dir, tmp_path / "good",
                       registry=registry, model_name="digits", infra_images=4)
    assert rec["promoted"] == 1 and rec["infra_validation"]["passed"], rec
    blessing = json.loads((tmp_path / "good" / "blessing.json").read_text())
    assert blessing["blessed"] and blessing["infra_validation"]["passed"]
    assert ModelRegistry(registry, "digits").champion()["version"] == 1

    # the serving environment cannot run this export: the model is not promoted, and why
    monkeypatch.setenv("TRIVIEW_SERVE_PYTHON", sys.executable)  # no KServe here
    rec = export_stage(dirs, voter_dir, cropped, eval_dir, tmp_path / "bad",
                       registry=registry, model_name="digits", infra_images=2)
    assert rec["promoted"] == 0 and not rec["infra_validation"]["passed"]
    assert "infra validation failed: the predictor did not come up" in rec["refused"]
    blessing = json.loads((tmp_path / "bad" / "blessing.json").read_text())
    assert blessing["blessed"] is False
    assert any(r.startswith("infra validation failed") for r in blessing["reasons"])
    assert json.loads((tmp_path / "bad" / "infra_validation.json").read_text())["passed"] is False
    assert ModelRegistry(registry, "digits").champion()["version"] == 1  # unchanged
    assert ModelRegistry(registry, "digits").versions() == [1]
