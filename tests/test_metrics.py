import urllib.request

import pytest

from triview import metrics
from triview.runinfo import stage_record


def _scrape(url: str) -> str:
    return urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()


def test_stage_metrics_reach_a_real_pushgateway(pushgateway, tmp_path, monkeypatch):
    monkeypatch.setenv("PUSHGATEWAY_URL", pushgateway)
    out = tmp_path / "root" / "run-42" / "ingest" / "dataset"
    with stage_record("ingest", out) as rec:
        rec.update(items_in=12, items_out=10, counts={"quarantined": 2})
    assert metrics.push("train-branch-left", {"epoch": 3, "val_macro_f1": 0.9}, "run-42")
    text = _scrape(pushgateway)
    assert 'triview_items_in{instance="",job="triview",run_id="run-42",stage="ingest"} 12' in text
    assert 'triview_quarantined{instance="",job="triview",run_id="run-42",stage="ingest"} 2' in text
    assert 'triview_stage_duration_seconds{instance="",job="triview",run_id="run-42",stage="ingest"}' in text
    assert 'triview_peak_rss_bytes{instance="",job="triview",run_id="run-42",stage="ingest"}' in text
    assert 'triview_output_files{instance="",job="triview",run_id="run-42",stage="ingest"} 1' in text
    assert 'triview_val_macro_f1{instance="",job="triview",run_id="run-42",stage="train-branch-left"} 0.9' in text


def test_unreachable_pushgateway_warns_and_the_stage_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PUSHGATEWAY_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.warns(RuntimeWarning, match="unreachable"):
        with stage_record("balance", tmp_path / "r" / "balance" / "out") as rec:
            rec["items_out"] = 1
    assert (tmp_path / "r" / "balance" / "out" / "stage.json").is_file()


def test_no_url_means_no_push(monkeypatch):
    monkeypatch.delenv("PUSHGATEWAY_URL", raising=False)
    assert metrics.push("x", {"a": 1}, "r") is False


def test_training_epochs_and_stage_figures_are_read_back(pushgateway, cropped, balanced, tmp_path,
                                                          monkeypatch):
    """Every gauge a training epoch pushes, and a stage's items_out and test figures, as
    the real Pushgateway serves them."""
    import re

    from conftest import digits_train
    from triview.stages import train_branch_stage

    monkeypatch.setenv("PUSHGATEWAY_URL", pushgateway)
    out = tmp_path / "root" / "run-7" / "train" / "model"
    train_branch_stage(cropped, None, balanced, "center", out, **digits_train(epochs=1, batch_size=64))
    with stage_record("evaluate", tmp_path / "root" / "run-7" / "evaluate" / "out") as rec:
        rec.update(items_out=40, ensemble={"macro_f1": 0.75}, views={"left": {"macro_f1": 0.5}})
    text = _scrape(pushgateway)

    def value(name: str, stage: str) -> float:
        found = re.findall(rf'^triview_{name}{{[^}}]*stage="{stage}"[^}}]*}} (\S+)$', text, re.M)
        assert len(found) == 1, (name, stage)
        return float(found[0])

    assert value("epoch", "train-branch-center") == 1
    for name in ("train_loss", "val_loss", "learning_rate", "images_per_second"):
        assert value(name, "train-branch-center") > 0
    assert 0 <= value("val_macro_f1", "train-branch-center") <= 1
    assert value("items_out", "evaluate") == 40
    assert value("test_ensemble_macro_f1", "evaluate") == 0.75
    assert value("test_left_macro_f1", "evaluate") == 0.5


def test_a_stage_record_holds_the_task_process_peak_memory_and_its_output_files(tmp_path):
    """Each KFP task is its own process: the record's peak RSS is that task's (a child it
    waited for, such as a torchrun rank, counts too), and output_files counts the
    objects its artifact folder will upload."""
    import json
    import subprocess
    import sys

    script = """
import subprocess, sys
from pathlib import Path
from triview.runinfo import stage_record
out, mb, child = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with stage_record("probe", out) as rec:
    (out / "crops").mkdir(parents=True)
    for i in range(3):
        (out / "crops" / f"{i}.tar").write_bytes(b"x")
    if child:
        subprocess.run([sys.executable, "-c", f"b = bytearray({mb} << 20); b[::4096] = b'1' * len(b[::4096])"], check=True)
    else:
        block = bytearray(mb << 20)
        block[::4096] = b"1" * len(block[::4096])
"""
    peaks = {}
    for name, mb, child in (("small", 0, 0), ("big", 400, 0), ("child", 400, 1)):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name), str(mb), str(child)], check=True)
        rec = json.loads((tmp_path / name / "stage.json").read_text())
        assert rec["output_files"] == 4  # three crops and stage.json itself
        peaks[name] = rec["peak_rss_bytes"]
    assert peaks["big"] >= peaks["small"] + (350 << 20)
    assert peaks["child"] >= 400 << 20
