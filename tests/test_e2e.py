"""End-to-end: the real kfp.local DAG, through the CLI, on real digits."""
import json
import os
import urllib.request
import subprocess
import sys
from pathlib import Path

import pytest

from triview.demo import write_digits

STAGES = {"ingest", "calibrate-and-crop", "balance", "augment", "train-branch-left",
          "train-branch-center", "train-branch-right", "train-voter", "evaluate", "export"}


def _run(data: Path, out: Path, *params: str, env: dict | None = None, repeats: int = 1) -> dict:
    cmd = [str(Path(sys.executable).parent / "triview"), "run", "--data", str(data),
           "--out", str(out), "--repeats", str(repeats)] + [a for p in params for a in ("--param", p)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ensemble" in proc.stdout
    return json.loads((out / "run_summary.json").read_text())


def _check_contract(summary: dict, n_images: int) -> None:
    assert set(summary["views"]) == {"left", "center", "right"}
    for scores in list(summary["views"].values()) + [summary["ensemble"]]:
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["macro_f1"] <= 1.0
    assert summary["ensemble"]["method"]
    c = summary["counts"]
    assert c["train"] + c["val"] + c["test"] + c["quarantined"] == n_images
    assert set(summary["stages"]) == STAGES
    assert all(s["seconds"] > 0 for s in summary["stages"].values())
    model = Path(summary["artifacts"]["model"])
    assert (model / "ensemble.torchscript.pt").is_file() and (model / "model_card.json").is_file()
    assert Path(summary["artifacts"]["report"]).is_file()


@pytest.mark.slow
def test_small_run_with_params_through_the_cli(tmp_path, pushgateway):
    write_digits(tmp_path / "data", per_class=40)
    (tmp_path / "data" / "0" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    summary = _run(tmp_path / "data", tmp_path / "out", "epochs=3", "batch_size=32",
                   "image_size=24", "augment_copies=0", env={"PUSHGATEWAY_URL": pushgateway},
                   repeats=2)
    # two seeds, each its own run of the DAG; mean and SD over both
    seeds = [json.loads((tmp_path / "out" / f"seed-{s}" / "run_summary.json").read_text())
             for s in (0, 1)]
    assert [s["parameters"]["seed"] for s in seeds] == [0, 1]
    values = [s["ensemble"]["macro_f1"] for s in seeds]
    rep = summary["repeats"]
    assert rep["seeds"] == [0, 1] and rep["ensemble"]["macro_f1"]["values"] == pytest.approx(values)
    assert rep["ensemble"]["macro_f1"]["mean"] == pytest.approx(sum(values) / 2)
    assert set(rep["views"]) == {"left", "center", "right"}
    _check_contract(summary, 401)
    assert summary["counts"]["quarantined"] == 1
    card = json.loads((Path(summary["artifacts"]["model"]) / "model_card.json").read_text())
    assert card["image_size"] == 24 and card["training"]["left"]["config"]["epochs"] == 3
    assert summary["ensemble"]["macro_f1"] > 0.3  # well above chance (0.1) after 3 epochs

    # every stage pushed its metrics to the real Pushgateway, grouped by run and stage
    text = urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5).read().decode()
    run_id = Path(summary["artifacts"]["run_dir"]).name
    for stage in STAGES:
        assert f'triview_stage_duration_seconds{{instance="",job="triview",run_id="{run_id}",stage="{stage}"}}' in text, stage
    assert f'triview_quarantined{{instance="",job="triview",run_id="{run_id}",stage="ingest"}} 1' in text
    for view in ("left", "center", "right"):
        assert f'triview_epoch{{instance="",job="triview",run_id="{run_id}",stage="train-branch-{view}"}} 3' in text
    ensemble = f'triview_test_ensemble_macro_f1{{instance="",job="triview",run_id="{run_id}",stage="evaluate"}}'
    line = next(l for l in text.splitlines() if l.startswith(ensemble))
    assert float(line.split()[-1]) == pytest.approx(summary["ensemble"]["macro_f1"])
    second = Path(seeds[1]["artifacts"]["run_dir"]).name  # the other seed's run, its own group
    assert second != run_id
    assert f'triview_test_ensemble_macro_f1{{instance="",job="triview",run_id="{second}",stage="evaluate"}}' in text


@pytest.mark.slow
def test_full_digits_demo_meets_the_accuracy_bar(tmp_path):
    """The `make run` job: all 1,797 digits with default parameters."""
    write_digits(tmp_path / "data")
    summary = _run(tmp_path / "data", tmp_path / "out")
    _check_contract(summary, 1797)
    best_view = max(s["macro_f1"] for s in summary["views"].values())
    assert summary["ensemble"]["macro_f1"] >= 0.95
    assert summary["ensemble"]["macro_f1"] > best_view


def test_repeats_aggregate_mean_and_sd():
    from triview.summary import aggregate_repeats

    runs = [{"views": {"left": {"macro_f1": f, "accuracy": 0.5}}, "ensemble": {"macro_f1": f + 0.1,
                                                                           "method": "mean"}}
            for f in (0.6, 0.7, 0.8)]
    rep = aggregate_repeats(runs, [0, 1, 2])
    assert rep["n"] == 3 and rep["seeds"] == [0, 1, 2]
    assert rep["views"]["left"]["macro_f1"]["mean"] == pytest.approx(0.7)
    assert rep["views"]["left"]["macro_f1"]["sd"] == pytest.approx(0.1)
    assert rep["views"]["left"]["accuracy"]["sd"] == 0.0
    assert rep["ensemble"]["macro_f1"]["values"] == pytest.approx([0.7, 0.8, 0.9])
    assert "method" not in rep["ensemble"]
