"""Checkpoint and resume: a training process killed mid-run resumes from its last
checkpoint, loses at most one epoch and ends exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import digits_train
import torch
from s3_server import BUCKET, moto_server, s3_endpoint  # noqa: F401  (fixtures)

from triview.artifacts import CHECKPOINT_BEST, CHECKPOINT_LAST, load_predictions
from triview.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5
TRAIN = """
import sys, time
from triview.params import load_preset, names
from triview.train import loop
from triview.stages import train_branch_stage
DIGITS = {k: v for k, v in load_preset("digits").items() if k in names("train-branch")}
slow = float(sys.argv[6])
if slow:  # stretch each epoch so that the test can kill the process in the middle of one
    original = loop.recalibrate_batchnorm
    def recalibrate(*a, **k):
        time.sleep(slow)
        return original(*a, **k)
    loop.recalibrate_batchnorm = recalibrate
rec = train_branch_stage(sys.argv[1], sys.argv[2], sys.argv[3], "center", sys.argv[4],
                         **{**DIGITS, "epochs": %d, "batch_size": 32, "seed": 0, "precise_bn": 1024,
                            "checkpoint_root": sys.argv[5]}, run_id="run")
print("RESUMED_FROM", rec["resumed_from_epoch"])
""" % EPOCHS


def _train(cropped, augmented, balanced, out: Path, ckpt: Path, slow: float = 0.0):
    return subprocess.Popen([sys.executable, "-c", TRAIN, str(cropped), str(augmented),
                             str(balanced), str(out), str(ckpt), str(slow)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _epoch_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt / "run" / "center" / CHECKPOINT_LAST, weights_only=True)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


@pytest.mark.slow
def test_killed_training_resumes_and_matches_an_uninterrupted_run(cropped, augmented, balanced,
                                                                   tmp_path):
    reference = _train(cropped, augmented, balanced, tmp_path / "ref", tmp_path / "ref_ckpt")
    out_ref = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, out_ref

    ckpt = tmp_path / "ckpt"
    victim = _train(cropped, augmented, balanced, tmp_path / "run", ckpt, slow=1.5)
    deadline = time.time() + 600
    while _epoch_of(ckpt) < 2 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "training finished before it could be killed"
    time.sleep(0.5)  # well inside epoch 3
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    killed_at = _epoch_of(ckpt)
    assert 2 <= killed_at < EPOCHS
    assert not (tmp_path / "run" / "model.pt").exists()  # no final model from the killed run

    resumed = _train(cropped, augmented, balanced, tmp_path / "run", ckpt)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert f"RESUMED_FROM {killed_at}" in out and f"resuming from the checkpoint of epoch {killed_at}" in out
    # at most the epoch in progress was lost; the history is complete and has no repeats
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))

    ref_history = pd.read_csv(tmp_path / "ref" / "history.csv")
    for col in ("train_loss", "val_loss", "val_macro_f1", "lr"):
        np.testing.assert_allclose(history[col], ref_history[col], rtol=1e-5, atol=1e-6)
    ref_meta = json.loads((tmp_path / "ref" / "model.json").read_text())
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["best_epoch"] == ref_meta["best_epoch"]
    a, b = load_predictions(tmp_path / "ref"), load_predictions(tmp_path / "run")
    np.testing.assert_allclose(a["test_prob"], b["test_prob"], atol=1e-5)
    # best and last are both kept
    assert (ckpt / "run" / "center" / CHECKPOINT_BEST).is_file() and _epoch_of(ckpt) == EPOCHS


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    torch.save({"key": "other", "epoch": 3}, tmp_path / CHECKPOINT_LAST)
    with pytest.warns(RuntimeWarning, match="different configuration"):
        assert load_checkpoint(tmp_path, key="mine") is None
    assert load_checkpoint(tmp_path, key="other")["epoch"] == 3
    assert load_checkpoint(tmp_path / "empty", key="mine") is None


def test_checkpoints_live_in_s3_and_a_rerun_resumes_from_there(s3_endpoint, cropped, augmented,
                                                                 balanced, tmp_path):
    from triview import storage
    from triview.stages import train_branch_stage

    root = f"s3://{BUCKET}/checkpoints/run-1/center"
    first = train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "a", **digits_train(epochs=2,
                               batch_size=32, checkpoint_root=f"s3://{BUCKET}/checkpoints",
                               run_id="run-1"))
    assert first["resumed_from_epoch"] == 0
    store = storage.default_store()
    assert store.exists(f"{root}/{CHECKPOINT_LAST}") and store.exists(f"{root}/{CHECKPOINT_BEST}")
    assert not (tmp_path / "a" / "checkpoints").exists()  # nothing local when the root is S3
    assert load_checkpoint(root)["epoch"] == 2
    # the retried task (a fresh pod: new output folder) finds the finished epochs in S3
    again = train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "b", **digits_train(epochs=2,
                               batch_size=32, checkpoint_root=f"s3://{BUCKET}/checkpoints",
                               run_id="run-1"))
    assert again["resumed_from_epoch"] == 2 and again["best_epoch"] == first["best_epoch"]
    np.testing.assert_allclose(load_predictions(tmp_path / "a")["test_prob"],
                               load_predictions(tmp_path / "b")["test_prob"], atol=1e-6)
