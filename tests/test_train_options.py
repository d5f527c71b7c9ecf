"""Optimisers, schedules with warmup, early stopping, accumulation, clipping, AMP choice."""
import math

import pandas as pd
import pytest

from conftest import digits_train
import torch

from triview.params import ParamError
from triview.train import TrainConfig
from triview.train.optim import amp_dtype, kernel, lr_factor, make_optimizer


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


def test_optimizers_take_the_fused_kernel_on_cpu_and_step_like_the_default():
    """One fused update kernel per step on CPU/CUDA (bench/optimizer_kernel.py: the
    default is a Python loop over the tensors); the same update up to float rounding."""
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(4, 3))], "lr": 1e-2},
              {"params": [torch.nn.Parameter(torch.randn(5))], "lr": 1e-3}]
    assert kernel(groups) == {"fused": True}
    assert kernel([torch.zeros(2, device="meta", requires_grad=True)]) == {}  # no fused kernel there
    for name, plain in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                        ("sgd", torch.optim.SGD)):
        config = TrainConfig(optimizer=name, lr=1e-2, momentum=0.9)
        fused_params = [torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)))]
        plain_params = [torch.nn.Parameter(fused_params[0].detach().clone())]
        fused = make_optimizer(config, fused_params)
        assert fused.defaults["fused"] is True
        kwargs = ({"momentum": 0.9, "nesterov": True} if name == "sgd" else {})
        reference = plain(plain_params, lr=1e-2, weight_decay=config.weight_decay, **kwargs)
        for step in range(5):
            for params, opt in ((fused_params, fused), (plain_params, reference)):
                opt.zero_grad()
                (params[0] ** 2).sum().mul(step + 1).backward()
                opt.step()
        torch.testing.assert_close(fused_params[0], plain_params[0], rtol=1e-5, atol=1e-6)


def test_patience_stops_early_and_sgd_step_schedule_with_accumulation(cropped, augmented,
                                                                      balanced, tmp_path):
    from triview.stages import train_branch_stage

    # lr = 0 and frozen BatchNorm statistics: validation never improves after epoch 1, so
    # patience 2 stops after epoch 3
    rec = train_branch_stage(cropped, augmented, balanced, "left", tmp_path / "a", **digits_train(epochs=8,
                             batch_size=32, lr=1e-12, patience=2, optimizer="sgd", freeze_bn=True))
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
    source = create_backbone(digits_train()["backbone"], 10, 32)  # the architecture trained below
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


def _tiny_epoch(dtype, scaler_enabled):
    """One real training epoch of a small conv net through ``train_one_epoch``; returns the
    dtypes its layers computed in, the weight change, the loss and the scaler."""
    from triview.train.loop import train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 4))
    seen = []
    for layer in (model[0], model[3]):
        layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled, init_scale=2.0 ** 10)
    batches = [(torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]
    loss = train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, scheduler,
                           scaler, TrainConfig(clip_grad_norm=1.0), torch.device("cpu"), dtype)
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    return set(seen), change, loss, scaler


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_modes_train_in_the_reduced_precision_they_name(amp, dtype, monkeypatch):
    """What `amp` does on a GPU, exercised through the same training step on the CPU (CPU
    autocast runs the same code path; the GPU itself is not available to tests)."""
    cuda = torch.device("cuda")
    assert amp_dtype(TrainConfig(amp=amp), cuda) is dtype
    assert amp_dtype(TrainConfig(amp="off"), cuda) is None
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert amp_dtype(TrainConfig(amp="auto"), cuda) is expected

    full, full_change, full_loss, _ = _tiny_epoch(None, scaler_enabled=False)
    assert full == {torch.float32} and full_change > 0
    # fp16 trains with the gradient scaler, as `fit` enables it (GradScaler(enabled=fp16))
    seen, change, loss, scaler = _tiny_epoch(dtype, scaler_enabled=dtype == torch.float16)
    assert seen == {dtype}  # the conv and the linear layer really ran in reduced precision
    assert change > 0 and math.isfinite(loss)  # and the optimiser stepped on finite gradients
    assert loss == pytest.approx(full_loss, rel=0.05)  # the same model, to reduced precision
    if dtype == torch.float16:
        assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 10  # no overflow: no backoff


def test_deterministic_turns_on_deterministic_algorithms_and_repeats_exactly(
        cropped, augmented, balanced, tmp_path):
    from triview.stages import train_branch_stage

    assert not torch.are_deterministic_algorithms_enabled()
    try:
        outputs = []
        for run in ("a", "b"):
            train_branch_stage(cropped, augmented, balanced, "left", tmp_path / run,
                               **digits_train(epochs=1, deterministic=True))
            assert torch.are_deterministic_algorithms_enabled()
            outputs.append(pd.read_csv(tmp_path / run / "history.csv"))
        timing = [c for c in outputs[0].columns if c in ("seconds", "images_per_s")]
        assert {"train_loss", "val_loss"} <= set(outputs[0].columns)
        pd.testing.assert_frame_equal(outputs[0].drop(columns=timing),
                                      outputs[1].drop(columns=timing))
    finally:
        torch.use_deterministic_algorithms(False)


def test_precise_bn_recomputes_batchnorm_statistics_over_that_many_images_or_none(
        cropped, augmented, balanced, tmp_path):
    """precise_bn=N: after each epoch every BatchNorm layer's statistics are the exact
    average over N training images (ceil(N / batch) recalibration batches counted since the
    reset); precise_bn=0: the running averages of the training steps stand."""
    from triview.stages import train_branch_stage

    def trained(name, **overrides):
        out = tmp_path / name
        rec = train_branch_stage(cropped, augmented, balanced, "left", out, **digits_train(
            **{"epochs": 1, "batch_size": 16, "freeze_bn": False, **overrides}))
        state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
        counts = {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
        return rec, counts, state

    _, counts, recalibrated = trained("precise", precise_bn=40)
    assert counts == {3}  # 40 images in batches of 16: 16 + 16 + 8
    _, counts, kept = trained("kept", precise_bn=0)
    # every layer counted every training step of the epoch, and nothing was reset
    assert len(counts) == 1 and counts.pop() > 3
    # the same training (seed, weights) with other statistics
    bn_means = [k for k in kept if k.endswith("running_mean")]
    assert bn_means and any(not torch.allclose(kept[k], recalibrated[k]) for k in bn_means)
    # freeze_bn keeps the loaded statistics whatever precise_bn says
    _, counts, _ = trained("frozen", precise_bn=40, freeze_bn=True)
    assert counts == {0}
