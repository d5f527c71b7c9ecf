"""The console of a local run: one line per task, a bar driven by the task's progress
events, warnings, a log file per task, and one clear block when a task fails. The
hook is exercised on kfp.local itself (a two-task pipeline) and through the CLI."""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kfp import dsl, local

from pipelines.console import RunConsole, TaskFailed, describe_stage, error_message
from triview import progress


@dsl.component(base_image="python:3.11")
def chatty(n: int) -> int:
    import warnings

    from triview.progress import Reporter

    print("first line of chatty")
    events = Reporter("batch", n, desc="left", min_interval=0.0)
    for _ in events.track(range(n)):
        pass
    events.note(loss=0.25, val_macro_f1=0.9)
    warnings.warn("the cache is cold", RuntimeWarning)
    return n


@dsl.component(base_image="python:3.11")
def broken(n: int):
    raise ValueError(f"the reason is {n}")


@dsl.pipeline(name="tiny")
def tiny(n: int = 5):
    broken(n=chatty(n=n).output)


@pytest.fixture()
def kfp_local(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "root"), raise_on_error=True)


def test_one_line_per_task_a_bar_from_progress_events_and_a_clear_failure(kfp_local, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    stdout, filters = sys.stdout, list(logging.getLogger().filters)
    with pytest.raises(TaskFailed) as failed:
        with RunConsole(tmp_path / "logs", out=out, err=err, bars=True):
            tiny(n=5)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("triview run:") and str(tmp_path / "logs") in lines[0]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["started", "chatty"], ["warning", "chatty:"], ["done", "chatty"],
        ["started", "broken"], ["FAILED", "broken"]]
    assert lines[2].endswith("RuntimeWarning: the cache is cold")
    assert lines[-1].endswith("ValueError: the reason is 5")
    # the bar followed the task's events: its count, unit, view and fields
    assert "5/5 batch" in err.getvalue() and "chatty (left)" in err.getvalue()
    assert "loss=0.25, val_macro_f1=0.9" in err.getvalue()
    # the failure: which task, the error, its log (which holds the traceback)
    exc = failed.value
    assert (exc.task, exc.message) == ("broken", "ValueError: the reason is 5")
    assert exc.log_path == tmp_path / "logs" / "broken.log"
    assert "Traceback (most recent call last):" in exc.log_path.read_text()
    report = exc.report().splitlines()
    assert "'broken'" in report[1] and str(exc.log_path) in report[3]
    chatty_log = (tmp_path / "logs" / "chatty.log").read_text()
    assert "first line of chatty" in chatty_log and "executor_input" in chatty_log
    assert progress.MARK not in chatty_log
    # everything is put back
    assert sys.stdout is stdout and logging.getLogger().filters == filters
    assert progress.ENV not in os.environ


def test_verbose_streams_everything_and_still_writes_the_logs(kfp_local, tmp_path):
    out = io.StringIO()
    with pytest.raises(TaskFailed):
        with RunConsole(tmp_path / "logs", verbose=True, out=out):
            tiny(n=2)
    text = out.getvalue()
    assert "Executing task 'chatty'" in text.replace("\x1b[96m", "").replace("\x1b[0m", "")
    assert "first line of chatty" in text and "Traceback" in text
    assert progress.MARK not in text   # no progress events without the console's bar
    assert "first line of chatty" in (tmp_path / "logs" / "chatty.log").read_text()


def test_a_failed_cli_run_ends_with_the_task_the_reason_and_the_log(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([str(Path(sys.executable).parent / "triview"), "run", "--data", str(empty),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1
    last = (proc.stdout + proc.stderr).splitlines()[-10:]
    log = tmp_path / "out" / "logs" / "ingest.log"
    assert any("FAILED in task 'ingest'" in line for line in last)
    assert any(f"IngestError: no files in '{empty}'" in line for line in last)
    assert any(str(log) in line for line in last) and log.is_file()
    assert "Traceback" not in proc.stdout + proc.stderr and "Traceback" in log.read_text()


def test_error_message_and_stage_lines():
    tail = ["[KFP Executor INFO]: start", "Traceback (most recent call last):",
            '  File "x.py", line 1, in <module>', "    raise ValueError('inner')",
            "ValueError: inner", "", "During handling of the above exception, another occurred:",
            "", "Traceback (most recent call last):", '  File "y.py", line 2, in f',
            "triview.calibration.CalibrationError: the board was found in only 0 of 2 images",
            "  a.png: board not found (100x100)", "  b.png: undecodable", ""]
    assert error_message(tail) == ("CalibrationError: the board was found in only 0 of 2 images\n"
                                   "  a.png: board not found (100x100)\n  b.png: undecodable")
    assert error_message(["Killed"]).endswith("its last output: Killed")
    assert describe_stage({"stage": "ingest", "counts": {"input": 10, "train": 6, "val": 2,
                                                         "test": 2, "quarantined": 0}}) == \
        "10 files: 6 train / 2 val / 2 test, 0 quarantined"
    assert describe_stage({"stage": "train-branch-top-seed-1", "view": "top", "best_epoch": 3,
                           "epochs_run": 4, "val_macro_f1": 0.91234}) == \
        "seed 1: top: best epoch 3 of 4, val macro-F1 0.9123"
    assert describe_stage({"stage": "evaluate", "ensemble": {"accuracy": 0.9, "macro_f1": 0.89},
                           "blessed": 1, "gate": {"champion_version": 2}, "gate_clean_images": 87,
                           "gate_excluded_images": 0, "drift_embedding_auc": 0.512,
                           "drift_new_images": 200}) == \
        ("ensemble test accuracy 0.9000, macro-F1 0.8900; blessed (vs champion v2 on 87 clean "
         "test images, 0 excluded); drift AUC 0.51 on 200 new images")


def test_stage_lines_in_words_a_newcomer_reads():
    """Epoch 0 is said to be the head phase; no registry is "no champion to compare with",
    not "blessed"; the test figure carries its 95 % interval; small splits are warned of."""
    from pipelines.console import stage_warnings

    head = {"stage": "train-branch-whole", "view": "whole", "best_epoch": 0, "epochs_run": 3,
            "val_macro_f1": 0.96, "head_epochs": 60}
    assert describe_stage(head) == (
        "whole: kept the head phase (epoch 0: 60 epochs of the new head on cached features of "
        "the frozen backbone; 2 fine-tuning epochs did not beat it), val macro-F1 0.9600")
    assert describe_stage({**head, "best_epoch": 2}) == (
        "whole: best fine-tuning epoch 2 of 2 (epoch 0 = the head phase on cached features), "
        "val macro-F1 0.9600")
    assert "1 fine-tuning epoch did" in describe_stage({**head, "epochs_run": 2})
    assert "fine-tuning" not in describe_stage({**head, "epochs_run": 1})
    interval = {"low": 0.21, "high": 0.94, "n": 3, "confidence": 0.95, "trusted": False}
    evaluation = {"stage": "evaluate", "ensemble": {"accuracy": 0.6667, "macro_f1": 0.5},
                  "blessed": 1, "gate": {"comparison": "no_registry"},
                  "accuracy_interval": interval}
    line = describe_stage(evaluation)
    assert line == ("ensemble test accuracy 0.6667 (95 % interval 0.21 to 0.94 on 3 images), "
                    "macro-F1 0.5000; no registry: no champion to compare with")
    assert "blessed" not in line
    assert "first model" in describe_stage({**evaluation, "gate": {"comparison": "first_run"}})
    assert describe_stage({"stage": "export", "registry": "", "blessed": 1, "promoted": 0,
                           "onnx_max_abs_diff": 4e-7}) == \
        "no registry: nothing promoted; ONNX parity 4.0e-07"
    assert stage_warnings(evaluation) == [
        "3 test images: test accuracy lies anywhere in 0.21 to 0.94 (95 % interval); too few "
        "to trust"]
    assert stage_warnings({**evaluation, "accuracy_interval": {**interval, "trusted": True}}) == []
    small = stage_warnings({"stage": "ingest", "counts": {"train": 40, "val": 12, "test": 3}})
    assert len(small) == 2 and "only 3 test images" in small[1]
    assert "--param test_fraction" in small[1] and "--param val_fraction" in small[0]
    assert stage_warnings({"stage": "ingest", "counts": {"train": 400, "val": 60, "test": 60}}) == []


def test_the_summary_says_the_interval_and_the_gate_in_words():
    from triview.scoring import accuracy_interval
    from triview.summary import format_summary

    summary = {"views": {"whole": {"accuracy": 0.9, "macro_f1": 0.9}},
               "ensemble": {"accuracy": 0.925, "macro_f1": 0.92, "method": "vote"},
               "test_interval": accuracy_interval(37, 40),
               "counts": {"train": 205, "val": 153, "test": 40, "quarantined": 0},
               "gate": {"comparison": "no_registry", "blessed": True}, "export": {"promoted": 0},
               "stages": {"ingest": {"seconds": 1.0}}, "dag_seconds": 2.0,
               "artifacts": {"model": "/m", "report": "/o/report.html"}}
    text = format_summary(summary)
    assert "ensemble test accuracy 0.925 on 40 test images: 95% interval 0.801 to 0.974 (Wilson)" in text
    assert "gate:   no registry, so no champion to compare with; nothing promoted" in text
    assert "warning" not in text and text.splitlines()[-1] == "report: /o/report.html"
    few = format_summary({**summary, "test_interval": accuracy_interval(2, 3)})
    assert "warning: 3 test images are too few to trust these figures" in few
    promoted = format_summary({**summary, "gate": {"comparison": "compared", "blessed": True},
                               "export": {"promoted": 1, "registry_version": 4}})
    assert "gate:   blessed; promoted as version 4" in promoted
