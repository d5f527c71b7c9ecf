import json

import numpy as np
import pandas as pd
import pytest

from conftest import digits_train
import torch

from triview import manifest as mf
from triview.artifacts import load_predictions
from triview.backbones import BACKBONES
from triview.models import MAX_PARAMS, count_parameters, create_backbone
from triview.train import load_branch


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x1_0", "densenet121",
                                  "efficientnet_v2_s", "vit_b_32"])
def test_registry_builds_backbones_with_a_fresh_head(name):
    model = create_backbone(name, num_classes=7, image_size=32 if "vit" not in name else 64)
    x = torch.rand(2, 3, 32 if "vit" not in name else 64, 32 if "vit" not in name else 64)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    assert count_parameters(model)["total"] < MAX_PARAMS


def test_hidden_head_and_unknown_backbone():
    model = create_backbone("resnet18", 10, hidden=256)
    assert isinstance(model.fc, torch.nn.Sequential) and model.fc[0].out_features == 256
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet1000", 10)
    assert "densenet121" in BACKBONES and "vit_b_16" in BACKBONES


def test_trained_branch_outputs(trained, cropped):
    views = mf.read_views(cropped)
    for view, folder in trained.items():
        meta = json.loads((folder / "model.json").read_text())
        history = pd.read_csv(folder / "history.csv")
        assert meta["view"] == view and len(history) == 3
        assert meta["best_epoch"] == int(history["val_macro_f1"].idxmax()) + 1
        assert meta["val_macro_f1"] == pytest.approx(history["val_macro_f1"].max())
        assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds"} <= set(history)
        assert history["lr"].iloc[-1] < history["lr"].iloc[0]  # cosine decay
        preds = load_predictions(folder)
        n_val = ((views["split"] == "val") & (views["view"] == view)).sum()
        assert preds["val_prob"].shape == (n_val, 10)
        assert np.allclose(preds["test_prob"].sum(1), 1, atol=1e-5)
        # the branch learned something: better than chance on validation
        assert meta["val_macro_f1"] > 0.3


def test_saved_branch_reloads_to_the_same_predictions(trained, cropped):
    from triview.train import load_view

    from triview.temperature import scale_logits
    from triview.train import load_served_branch, predict_logits

    folder = trained["center"]
    served, meta = load_served_branch(folder)
    classes = mf.read_classes(cropped)
    test = load_view([(cropped, mf.read_views(cropped))], "center", "test", classes)
    preds = load_predictions(folder)
    assert list(preds["test_ids"]) == test.image_ids
    # the served branch (its tta passes, divided by its temperature) answers what was saved
    assert served.temperature == meta["temperature"] != 1.0
    assert np.allclose(scale_logits(predict_logits(served, test.images), 1.0), preds["test_prob"],
                       atol=1e-5)
    model, _ = load_branch(folder)
    raw = predict_logits(model, test.images)
    assert np.allclose(scale_logits(raw, meta["temperature"]), preds["test_prob"], atol=1e-5)


def test_online_augmentation_trains_through_the_loader(cropped, balanced, tmp_path, monkeypatch):
    """Every training image of every epoch reaches the model augmented, drawn afresh per
    epoch (the loader's batches are recorded on their way to the model)."""
    import triview.train.data as data
    from triview.augment import AugmentConfig, augment
    from triview.stages import train_branch_stage

    seen = []  # (epoch, image ids, share of each image's pixels the augmentation changed)
    real = data.augment_batch

    def recording(images, ids, config, epoch):
        out = real(images, ids, config, epoch)
        seen.append((epoch, list(ids), (out != images).mean(axis=(1, 2, 3))))
        return out

    monkeypatch.setattr(data, "augment_batch", recording)
    augment(cropped, tmp_path / "aug", AugmentConfig(mode="online", shift=0.1))
    rec = train_branch_stage(cropped, tmp_path / "aug", balanced, "center", tmp_path / "m",
                             **digits_train(epochs=2, batch_size=64))
    assert rec["epochs_run"] == 2 and (tmp_path / "m" / "model.pt").is_file()
    train_ids = set(mf.read_views(cropped).query("view == 'center' and split == 'train'")["image_id"])
    assert {e for e, _, _ in seen} == {1, 2}
    for epoch in (1, 2):
        assert {i for e, ids, _ in seen if e == epoch for i in ids} == train_ids
    changed = np.concatenate([c for _, _, c in seen])
    assert np.median(changed) > 0.2  # most pixels of a typical image move


def test_a_backbone_over_100m_parameters_is_refused():
    """vit_b_16 (86M) with a 20,000-class head crosses the 100M bar."""
    with pytest.raises(ValueError, match=r"vit_b_16 has 101\.\dM parameters \(> 100M\)"):
        create_backbone("vit_b_16", 20_000, 224)


def test_the_head_phase_keeps_every_epoch_for_the_report(cropped, augmented, balanced, tmp_path):
    """With head_epochs > 0 the branch writes one row per head epoch (head_history.csv,
    what the report draws), history.csv keeps the head phase's best as epoch 0, and the
    record says how many head epochs ran."""
    from pipelines.console import describe_stage
    from triview.artifacts import HEAD_HISTORY_FILE, HISTORY_FILE
    from triview.stages import train_branch_stage

    rec = train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "b",
                             **digits_train(head_epochs=4, epochs=1, seed=0))
    head = pd.read_csv(tmp_path / "b" / HEAD_HISTORY_FILE)
    history = pd.read_csv(tmp_path / "b" / HISTORY_FILE)
    assert head["head_epoch"].tolist() == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "val_macro_f1", "lr"} <= set(head.columns)
    best = history.iloc[0]
    assert best["epoch"] == 0 and best["phase"] == "head"
    assert best["val_macro_f1"] == pytest.approx(head["val_macro_f1"].max())
    assert history["epoch"].tolist() == [0, 1] and rec["head_epochs"] == 4
    assert "epoch 0" in describe_stage(rec) and "head phase" in describe_stage(rec)
