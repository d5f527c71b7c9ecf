"""Optimisers, schedules with warmup, early stopping, accumulation, clipping, AMP choice."""
import math

import pandas as pd
import pytest

from conftest import digits_train
import torch

from triview.params import ParamError
from triview.train import TrainConfig
from triview.train.optim import amp_dtype, lr_factor, make_optimizer


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "poly", "step", "multistep"])
def test_every_schedule_goes_from_lr_to_lr_times_lrf(scheduler):
    config = TrainConfig(epochs=12, lrf=0.01, scheduler=scheduler)
    f = lr_factor(config, steps_per_epoch=10)
    values = [f(s) for s in range(121)]
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.01, rel=1e-6)  # the old tool's lr0 -> lr0 * lrf
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # never increases


def test_cosine_midpoint_warmup_and_step_drops():
    config = TrainConfig(epochs=10, lrf=0.0, scheduler="cosine", warmup_epochs=2)
    f = lr_factor(config, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(10) == pytest.approx(0.55)  # linear warmup from lr/10
    assert f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    multistep = lr_factor(TrainConfig(epochs=10, lrf=0.01, scheduler="multistep",
                                      milestones="4,8"), 10)
    assert multistep(39) == 1.0 and multistep(40) == pytest.approx(0.1)
    assert multistep(80) == pytest.approx(0.01)
    step = lr_factor(TrainConfig(epochs=9, lrf=0.001, scheduler="step", milestones="3"), 1)
    assert [round(step(e), 6) for e in range(9)] == [1, 1, 1, 0.031623, 0.031623, 0.031623,
                                                      0.001, 0.001, 0.001]
    assert lr_factor(TrainConfig(scheduler="constant"), 5)(17) == 1.0
    with pytest.raises(ParamError, match="'scheduler' must be one of cosine"):
        TrainConfig(scheduler="exp")


def test_optimizers_and_amp_modes():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer(TrainConfig(optimizer="adamw"), params), torch.optim.AdamW)
    assert isinstance(make_optimizer(TrainConfig(optimizer="adam"), params), torch.optim.Adam)
    sgd = make_optimizer(TrainConfig(optimizer="sgd", momentum=0.8), params)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    with pytest.raises(ParamError, match="'optimizer' must be one of adamw, adam, sgd"):
        TrainConfig(optimizer="lion")
    cpu = torch.device("cpu")
    assert amp_dtype(TrainConfig(amp="auto"), cpu) is None  # CPU trains in full precision
    assert amp_dtype(TrainConfig(amp="bf16"), cpu) is None
    with pytest.raises(ParamError, match="amp"):
        TrainConfig(amp="int8")


def test_patience_stops_early_and_sgd_step_schedule_with_accumulation(cropped, augmented,
                                                                      balanced, tmp_path):
    from triview.stages import train_branch_stage

    # lr = 0: validation never improves after epoch 1, so patience 2 stops after epoch 3
    rec = train_branch_stage(cropped, augmented, balanced, "left", tmp_path / "a", **digits_train(epochs=8,
                             batch_size=32, lr=1e-12, patience=2, optimizer="sgd"))
    history = pd.read_csv(tmp_path / "a" / "history.csv")
    assert rec["stopped_early"] and len(history) == 3 and rec["best_epoch"] == 1
    assert (tmp_path / "a" / "history.png").stat().st_size > 5000

    rec = train_branch_stage(cropped, augmented, balanced, "left", tmp_path / "b", **digits_train(epochs=3,
                             batch_size=16, accumulate=2, clip_grad_norm=1.0, scheduler="linear",
                             lrf=0.1, lr=0.01, warmup_epochs=0.5))
    history = pd.read_csv(tmp_path / "b" / "history.csv")
    assert not rec["stopped_early"] and len(history) == 3
    # the lr logged after the last epoch is the schedule's end: lr * lrf
    assert history["lr"].iloc[-1] == pytest.approx(0.001)
    assert rec["device"] == "cpu"


def test_pretrained_weights_from_safetensors_skip_the_foreign_head(tmp_path):
    from safetensors.torch import save_file

    from triview.models import create_backbone, load_pretrained

    source = create_backbone("resnet18", 7)  # another class count: its head does not fit
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "r18.safetensors")
    target = create_backbone("resnet18", 10)
    report = load_pretrained(target, str(tmp_path / "r18.safetensors"))
    assert report["skipped"] == 2 and report["missing"] == 2  # fc.weight, fc.bias
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert target.fc.out_features == 10
    torch.save(create_backbone("densenet121", 10).state_dict(), tmp_path / "d121.pt")
    with pytest.raises(ValueError, match="right architecture"):
        load_pretrained(create_backbone("resnet18", 10), str(tmp_path / "d121.pt"))


def test_normalizations():
    from triview.models import Normalize

    x = torch.rand(4, 3, 8, 8) * 0.5 + 0.2
    z = Normalize("per_sample")(x)
    assert torch.allclose(z.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std(dim=(1, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.equal(Normalize("unit")(x), x)
    with pytest.raises(ValueError, match="normalization"):
        Normalize("zca")


def test_linear_probe_trains_only_the_head_until_unfrozen(cropped, augmented, balanced, tmp_path):
    from safetensors.torch import save_file

    from triview.models import create_backbone
    from triview.stages import train_branch_stage
    from triview.train import load_branch

    torch.manual_seed(123)
    source = create_backbone("shufflenet_v2_x1_0", 10, 32)
    weights = tmp_path / "pre.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    conv = "conv1.0.weight"

    rec = train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "probe", **digits_train(epochs=2,
                             batch_size=32, weights=str(weights), finetune="linear_probe",
                             normalization="per_sample"))
    assert rec["parameters"]["frozen"] > 10 * rec["parameters"]["trainable"]
    model, meta = load_branch(tmp_path / "probe")
    assert meta["pretrained"]["loaded"] > 100 and meta["config"]["normalization"] == "per_sample"
    assert model.normalize.mode == "per_sample"
    assert torch.equal(model.backbone.state_dict()[conv], source.state_dict()[conv])
    assert not torch.equal(model.backbone.fc.weight, source.fc.weight)

    train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "thaw", **digits_train(epochs=2,
                       batch_size=32, weights=str(weights), finetune="linear_probe",
                       unfreeze_epoch=2))
    from triview.train.checkpoint import load_checkpoint

    last = load_checkpoint(str(tmp_path / "thaw" / "checkpoints"))  # the state after epoch 2
    assert last["epoch"] == 2
    assert not torch.equal(last["model"][f"backbone.{conv}"], source.state_dict()[conv])
