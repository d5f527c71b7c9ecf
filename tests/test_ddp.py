"""DistributedDataParallel: the train-branch stage re-launches itself under torchrun and
two CPU processes (gloo) train one branch together."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import digits_train
import torch

from triview import distributed as ddp
from triview.train.loop import _shard


def test_shards_cover_the_epoch_with_equal_lengths():
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    parts = [_shard(order, r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 6           # padded, as DistributedSampler does
    assert set(torch.cat(parts).tolist()) == set(range(11))
    assert torch.equal(_shard(order, 0, 1), order)


def test_single_process_defaults():
    assert ddp.rank_and_world() == (0, 1)
    gpus = torch.cuda.device_count()
    assert ddp.processes_wanted(0) == (gpus if gpus > 1 else 1)
    assert ddp.processes_wanted(3) == 3
    assert ddp.broadcast({"a": 1}) == {"a": 1} and ddp.sum_across(2.5) == 2.5


def test_two_process_gloo_training(cropped, balanced, tmp_path, monkeypatch):
    from triview.stages import train_branch_stage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "branch"
    rec = train_branch_stage(cropped, None, balanced, "center", out, **digits_train(epochs=2, batch_size=32,
                             seed=0, ddp_procs=2))
    assert rec["world_size"] == 2 and rec["stage"] == "train-branch-center"
    ranks = [json.loads((out / "ddp" / f"rank-{r}.json").read_text()) for r in range(2)]
    # both ranks end with the same weights (DDP averaged every gradient)...
    assert ranks[0]["parameter_digest"] == ranks[1]["parameter_digest"] == rec["parameter_digest"]
    # ...after each drew its own half of the epoch: together every training image, and
    # no image on both ranks except the wrap-round padding of an odd count
    train_ids = (pd.read_csv(cropped / "views.csv", dtype={"image_id": str})
                 .query("view == 'center' and split == 'train'")["image_id"])
    n_train = len(train_ids)
    drawn = [ranks[r]["last_epoch_image_ids"] for r in range(2)]
    assert len(drawn[0]) == len(drawn[1]) == ranks[0]["images_per_epoch"] == -(-n_train // 2)
    assert set(drawn[0]) | set(drawn[1]) == set(train_ids)
    assert len(drawn[0]) + len(drawn[1]) - n_train == n_train % 2
    assert len(set(drawn[0]) & set(drawn[1])) <= n_train % 2
    meta = json.loads((out / "model.json").read_text())
    assert meta["world_size"] == 2
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 2 and history["val_macro_f1"].iloc[-1] > 0.2
    preds = np.load(out / "predictions.npz")
    assert np.allclose(preds["test_prob"].sum(1), 1, atol=1e-5)
    assert (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_without_precise_bn_the_ranks_end_with_rank_0s_batchnorm_statistics(cropped, balanced,
                                                                             tmp_path, monkeypatch):
    """precise_bn=0: each rank's running statistics follow its own last batches; the epoch
    ends with rank 0's on every rank, so that every rank holds the same model."""
    from triview.stages import train_branch_stage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "branch"
    rec = train_branch_stage(cropped, None, balanced, "center", out, **digits_train(
        epochs=1, batch_size=32, seed=0, ddp_procs=2, precise_bn=0))
    ranks = [json.loads((out / "ddp" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["parameter_digest"] == ranks[1]["parameter_digest"] == rec["parameter_digest"]
