"""End-to-end: the real kfp.local DAG, through the CLI, on real digits."""
import json
import os
import urllib.request
import subprocess
import sys
from pathlib import Path

import pytest

from triview.demo import write_digits
from triview.runinfo import read_stage_records

VIEWS = ("top", "center", "bottom")  # the DAG's default layout is vertical
STAGES = {"ingest", "calibrate-and-crop", "balance", "augment", "train-branch-top",
          "train-branch-center", "train-branch-bottom", "train-voter", "evaluate", "export"}


def _run(data: Path, out: Path, *params: str, env: dict | None = None,
         repeats: int | None = None) -> dict:
    cmd = [str(Path(sys.executable).parent / "triview"), "run", "--data", str(data),
           "--out", str(out), "--preset", "digits"] + [a for p in params for a in ("--param", p)]
    cmd += [] if repeats is None else ["--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ensemble" in proc.stdout
    _check_console(proc.stdout, out)
    return json.loads((out / "run_summary.json").read_text())


def _check_console(stdout: str, out: Path) -> None:
    """What the user sees: a short console, one line per task as it starts and ends,
    none of kfp.local's executor output, each task's whole output in its log file."""
    lines = stdout.splitlines()
    assert len(lines) <= 60, stdout
    started = [line.split()[1] for line in lines if line.startswith("  started  ")]
    done = [line.split()[1] for line in lines if line.startswith("  done     ")]
    assert len(started) >= 10 and started == done
    assert "KFP Executor" not in stdout and "executor_input" not in stdout
    for task in started:
        assert "Executing task" in (out / "logs" / f"{task}.log").read_text()


def _check_contract(summary: dict, n_images: int, extra_stages: set = frozenset()) -> None:
    assert set(summary["views"]) == set(VIEWS)
    for scores in list(summary["views"].values()) + [summary["ensemble"]]:
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["macro_f1"] <= 1.0
    assert summary["ensemble"]["method"]
    c = summary["counts"]
    assert c["train"] + c["val"] + c["test"] + c["quarantined"] == n_images
    assert set(summary["stages"]) == STAGES | extra_stages
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
    # one run of the DAG; its repeat fan-out trained seed 1 beside the main seed 0
    rep = summary["repeats"]
    assert rep["n"] == 2 and rep["seeds"] == [0, 1]
    stages = read_stage_records(summary["artifacts"]["run_dir"])
    repeat = stages["evaluate-seed-1"]
    assert repeat["seed"] == 1 and stages["evaluate"]["seed"] == 0
    values = [summary["ensemble"]["macro_f1"], repeat["ensemble"]["macro_f1"]]
    assert rep["ensemble"]["macro_f1"]["values"] == pytest.approx(values)
    assert rep["ensemble"]["macro_f1"]["mean"] == pytest.approx(sum(values) / 2)
    assert set(rep["views"]) == set(VIEWS)
    assert {f"train-branch-{v}-seed-1" for v in VIEWS} <= set(stages)
    assert summary["parameters"]["repeats"] == 2
    repeat_stages = {f"{s}-seed-1" for s in STAGES if s.startswith(("train-", "evaluate"))}
    _check_contract(summary, 401, repeat_stages | {"repeats"})
    assert summary["counts"]["quarantined"] == 1
    card = json.loads((Path(summary["artifacts"]["model"]) / "model_card.json").read_text())
    assert card["image_size"] == 24 and card["training"]["top"]["config"]["epochs"] == 3
    assert card["training"]["top"]["config"]["seed"] == 0  # the export is the main seed's
    assert summary["ensemble"]["macro_f1"] > 0.3  # well above chance (0.1) after 3 epochs

    # every stage pushed its metrics to the real Pushgateway, grouped by run and stage;
    # the repeat's tasks under the same run id, as stages of their own
    text = urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5).read().decode()
    run_id = Path(summary["artifacts"]["run_dir"]).name
    for stage in STAGES | {"train-voter-seed-1", "evaluate-seed-1", "repeats"}:
        assert f'triview_stage_duration_seconds{{instance="",job="triview",run_id="{run_id}",stage="{stage}"}}' in text, stage
    assert f'triview_quarantined{{instance="",job="triview",run_id="{run_id}",stage="ingest"}} 1' in text
    for view in VIEWS:
        for stage in (f"train-branch-{view}", f"train-branch-{view}-seed-1"):
            assert f'triview_epoch{{instance="",job="triview",run_id="{run_id}",stage="{stage}"}} 3' in text
    for stage, value in (("evaluate", values[0]), ("evaluate-seed-1", values[1]),
                         ("repeats", None)):
        name = "test_ensemble_macro_f1" + ("_mean" if value is None else "")
        line = next(l for l in text.splitlines()
                    if l.startswith(f'triview_{name}{{instance="",job="triview",run_id="{run_id}",stage="{stage}"}}'))
        assert float(line.split()[-1]) == pytest.approx(sum(values) / 2 if value is None else value)


@pytest.mark.slow
def test_full_digits_demo_meets_the_accuracy_bar(tmp_path):
    """The `make run` job: all 1,797 digits with the digits preset."""
    write_digits(tmp_path / "data")
    summary = _run(tmp_path / "data", tmp_path / "out")
    _check_contract(summary, 1797)
    best_view = max(s["macro_f1"] for s in summary["views"].values())
    assert summary["ensemble"]["macro_f1"] >= 0.95
    assert summary["ensemble"]["macro_f1"] > best_view
