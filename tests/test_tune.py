"""`triview tune`: the search space checked against the spec, a seeded Optuna study whose
trials reuse cached stages and frozen features, pruning fed by the branches' epochs, the
best trial scored on test once, resume, the results (trials table, self-contained report,
a preset `triview run` takes), a proof that the study never reads test labels, and the same
search as a Kubeflow Trainer OptimizationJob (strictly checked against the CRD, applied to
a stand-in API server, its trial reporting to a stand-in TLS status server)."""
from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import sqlite3
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from triview import params as spec
from triview.cli import main

REPO = Path(__file__).resolve().parents[1]
TRAINER_SCHEMAS = REPO.parent / "shared" / "schemas" / "trainer"

#: Every trial's fixed parameters: the photo defaults at 24 px, a short head phase and one
#: fine-tuning epoch (so both kinds of epoch feed the pruner).
BASE = ("image_size=24", "head_folds=0", "head_epochs=12", "epochs=1")
SPACE = {"head_lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
         "hidden": {"choices": [0, 16]},
         "class_weighting": {"choices": ["inverse_frequency", "none"]}}
TRIALS = 3


def _split_digits(folder: Path) -> Path:
    """120 real digits in given train/val/test folders (6/3/3 per class)."""
    from triview.demo import write_digits

    raw = folder / "raw"
    write_digits(raw, per_class=12)
    data = folder / "data"
    for cls in sorted(p.name for p in raw.iterdir()):
        for i, f in enumerate(sorted((raw / cls).iterdir())):
            split = "train" if i < 6 else "val" if i < 9 else "test"
            (data / split / cls).mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), data / split / cls / f.name)
    shutil.rmtree(raw)
    return data


def _scrambled_copy(data: Path, to: Path) -> Path:
    """``data`` with every test image moved to the next class: the test labels are wrong."""
    shutil.copytree(data, to)
    classes = sorted(p.name for p in (to / "test").iterdir())
    moves = [(f, to / "test" / classes[(k + 1) % len(classes)] / f.name)
             for k, c in enumerate(classes) for f in sorted((to / "test" / c).iterdir())]
    for src, dst in moves:
        shutil.move(str(src), dst)
    return to


def _base_values() -> dict:
    return spec.validate(dict(p.split("=") for p in BASE), complete=True)


@pytest.fixture(scope="module")
def study_a(tmp_path_factory) -> dict:
    """One search through the CLI (3 trials, then the best trial scored on test)."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("tune")
    data = _split_digits(tmp)
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp / "study"
    cmd = [str(Path(sys.executable).parent / "triview"), "tune", "--data", str(data), "--out",
           str(out), "--space", str(space), "--trials", str(TRIALS)]
    cmd += [a for p in BASE for a in ("--param", p)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"tmp": tmp, "data": data, "space": space, "out": out, "stdout": proc.stdout}


def _load(out: Path):
    import optuna

    return optuna.load_study(study_name="triview-tune", storage=f"sqlite:///{out / 'study.db'}")


# ----------------------------------------------------------------------------- the space


@pytest.mark.parametrize("space,message", [
    ({"head_lrr": {"low": 0.001, "high": 0.01}}, "unknown parameter 'head_lrr' (did you mean head_lr"),
    ({"head_lr": {"low": 0.01, "high": 0.001}}, "low 0.01 must be below high 0.001"),
    ({"head_lr": {"low": 0.01, "high": 0.01}}, "to fix a value use --param head_lr=0.01"),
    ({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, "a log scale needs low > 0"),
    ({"head_lr": {"low": 0.001, "high": 20.0}}, "'head_lr' must be in (0, 10]"),
    ({"head_epochs": {"low": 10.5, "high": 20}}, "'head_epochs' expects int"),
    ({"head_lr": {"low": "fast", "high": 0.1}}, "'head_lr' expects float"),
    ({"optimizer": {"choices": ["adamw", "lion"]}}, "'optimizer' must be one of adamw, adam, sgd"),
    ({"optimizer": {"low": 1, "high": 2}}, "'optimizer' is a str: list its choices"),
    ({"hidden": {"choices": [0]}}, "one choice is not a search"),
    ({"hidden": {"choices": [0, 0]}}, "repeated choices"),
    ({"head_lr": {"low": 0.001, "high": 0.01, "scale": "log"}}, "unknown keys ['scale']"),
    ({"head_lr": {"low": 0.001, "high": 0.01, "step": 0.004}}, "not a multiple of step"),
    ({"head_lr": {"low": 0.001, "high": 0.01, "step": 0.001, "log": True}}, "step and log cannot"),
    ({"repeats": {"low": 1, "high": 3}}, "read only by pipeline, which trials do not run"),
    ({"head_lr": {"low": 0.001, "choices": [0.1, 0.2]}}, "either choices or low/high"),
    ({"val_fraction": {"low": 0.1, "high": 0.3}}, "changes which images are validated on"),
    ({"gate_min_delta": {"low": -0.1, "high": 0.1}}, "read only by evaluate, which trials do not run"),
    ({"head_lr": [0.001, 0.01]}, "expected {low, high} or {choices: [...]}"),
    ([], "must be a non-empty mapping"),
])
def test_a_bad_space_is_refused_before_anything_runs(tmp_path, capsys, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = tmp_path / "out"
    assert main(["tune", "--data", str(tmp_path), "--out", str(out), "--space", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_every_problem_of_a_space_is_reported_at_once(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"head_lrr": {"low": 1, "high": 2},
                                    "hidden": {"choices": [0, -1]}}))
    assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--space",
                 str(path), "--emit", "-"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'head_lrr'" in err and "'hidden' must be >= 0" in err


def test_trial_0_must_lie_in_the_space(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"head_epochs": {"low": 100, "high": 200}}))
    assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--space",
                 str(path)]) == 2
    assert "head_epochs=60 is not in the space (100..200)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_shipped_spaces_check_and_hold_the_defaults():
    from triview.tune.runner import searched_stages
    from triview.tune.space import load_space, space_names

    assert {"photos", "photos-finetune"} <= set(space_names())
    for name in ("photos", "photos-finetune"):
        space = load_space(name, searched_stages())
        space.check_point({n: spec.PARAMS[n].default for n in space.names}, "the defaults")
    # the shipped spaces are no run presets
    assert not set(space_names()) & set(spec.preset_names())


def test_trial_steps_follow_the_dag_up_to_the_voter():
    from triview.tune.runner import searched_stages, trial_steps

    stages = [s.stage for s in trial_steps()]
    order = [spec.STAGES.index(s) for s in stages]
    assert order == sorted(order)
    assert set(stages) == set(spec.STAGES[1:spec.STAGES.index("train-voter") + 1])
    assert "evaluate" not in searched_stages()
    names = [s.name for s in trial_steps()]
    assert all(set(s.inputs) <= set(names[:names.index(s.name)]) for s in trial_steps())


# ----------------------------------------------------------------------------- features


def _tiny_net(seed: int = 0):
    import torch

    from triview.models import BranchNet, create_backbone

    torch.manual_seed(seed)
    return BranchNet(create_backbone("shufflenet_v2_x0_5", 3, 24), "imagenet").eval()


def test_the_feature_store_is_addressed_by_network_and_crop(tmp_path):
    import torch

    from triview.train.features import FeatureStore
    from triview.train.loop import head_inputs, predict_proba, predict_proba_with

    images = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    net, calls = _tiny_net(), []

    def compute(n, x):
        calls.append(len(x))
        return head_inputs(n, x)

    store = FeatureStore(tmp_path)
    first = store.features(net, images, compute)
    assert torch.allclose(first, head_inputs(net, images), atol=1e-6)
    assert calls == [6]
    again = FeatureStore(tmp_path).features(net, images[[5, 0, 2]], compute)  # a new process
    assert calls == [6] and torch.equal(again, first[[5, 0, 2]])
    changed = images.clone()
    changed[1, 0, 0, 0] ^= 1
    store.features(net, changed, compute)
    assert calls == [6, 1]  # only the crop whose pixels changed
    store.features(_tiny_net(seed=1), images, compute)
    assert calls == [6, 1, 6]  # other weights: other features
    # the head over stored features is the model's own prediction
    assert abs(predict_proba_with(net, images, store=store) - predict_proba(net, images)).max() < 1e-5
    folders = sorted(p.name for p in tmp_path.iterdir())
    tuned = _tiny_net(seed=2)  # a backbone no head phase met (fine-tuned): predicted, not stored
    assert abs(predict_proba_with(tuned, images, store=store) - predict_proba(tuned, images)).max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == folders


# ----------------------------------------------------------------------------- the study


@pytest.mark.slow
def test_the_study_console_trials_and_reuse(study_a):
    out, lines = study_a["out"], study_a["stdout"].splitlines()
    trial_lines = [l for l in lines if l.startswith("trial ")]
    assert len(trial_lines) == TRIALS
    assert re.match(r"trial +0 +val_macro_f1 0\.\d{4} +best 0\.\d{4} \(trial 0\).*\(the parameters "
                    r"as given\)$", trial_lines[0])
    for line in trial_lines[1:]:  # the searched values that differ from trial 0's
        assert re.search(r"best 0\.\d{4} \(trial \d\)", line) and "=" in line.split(" s  ")[-1]
    assert any(l.startswith("best: trial ") and "(trial 0, the parameters as given: " in l
               for l in lines)
    assert any(l.startswith("test (scored once, for trial ") for l in lines)

    study = _load(out)
    trials = study.trials
    base = _base_values()
    assert trials[0].params == {n: base[n] for n in SPACE} and trials[0].user_attrs["defaults"]
    weightings = set()
    for t in trials:  # a stage is reused when an earlier trial ran it with the same inputs
        reused = set(t.user_attrs["reused"])
        assert ({"ingest", "calibrate-and-crop", "augment"} <= reused) == (t.number > 0)
        assert ("balance" in reused) == (t.params["class_weighting"] in weightings)
        weightings.add(t.params["class_weighting"])
        assert not reused & {"train-branch-view-1", "train-voter"}
    # per-epoch validation figures: 12 head epochs, their end and 1 fine-tuning epoch a branch
    steps = set(trials[0].intermediate_values)
    assert steps == {k * 100_000 + e for k in range(3) for e in (*range(1, 13), 9_999, 10_001)}
    # one frozen-feature network for every trial; branch outputs only for the best trial
    assert len(list((out / "cache" / "features").iterdir())) == 1
    best_steps = study.best_trial.user_attrs["steps"]
    for step in ("train-branch-view-1", "train-voter"):
        assert [p.name for p in (out / "cache" / step).iterdir()] == [best_steps[step]]
    assert all((out / "logs" / f"trial-{t.number}.log").stat().st_size > 0 for t in trials)
    table = __import__("pandas").read_csv(out / "trials.csv")
    assert list(table["trial"]) == list(range(TRIALS))
    assert list(table["val_macro_f1"].round(10)) == [round(t.value, 10) for t in trials]


@pytest.mark.slow
def test_the_report_is_self_contained_with_history_and_importances(study_a):
    text = (study_a["out"] / "report.html").read_text()
    sources = re.findall(r"""src=['"]([^'"]+)""", text)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "optimisation history" in text and "parameter importances" in text
    assert not re.search(r"(src|href)=['\"]?https?:", text)
    assert "Test split, scored once for trial" in text
    assert re.search(r"Pruning: a median pruner .*: \d trial\(s\) pruned", text)
    # trials that gave the pruner nothing (the cluster's, say): the report says so
    from triview.tune import results
    from triview.tune import study as st

    study = st.prepare(str(study_a["data"]), study_a["out"], space=study_a["space"],
                       base=dict(p.split("=") for p in BASE), resume=True)
    table = results.trials_table(study, _load(study_a["out"]))
    assert (table["epochs_reported"] == 3 * 14).all()
    quiet = results.render_html(study, table.assign(epochs_reported=0), (None, "-"), None)
    assert "Pruning did not apply: no trial reported per-epoch figures." in quiet


@pytest.mark.slow
def test_the_best_preset_is_what_triview_run_takes(study_a, monkeypatch, tmp_path):
    import pipelines.local

    study = _load(study_a["out"])
    preset = study_a["out"] / "best.yaml"
    expected = {**_base_values(), **study.best_trial.params}
    assert spec.validate(spec.load_preset(str(preset)), complete=True) == expected
    written = yaml.safe_load(preset.read_text())
    assert all(v != spec.PARAMS[k].default for k, v in written.items())  # only what differs
    seen = {}

    def fake_run_local(data, out, params, **kwargs):
        seen.update(params)
        raise SystemExit(0)
    monkeypatch.setattr(pipelines.local, "run_local", fake_run_local)
    with pytest.raises(SystemExit):
        main(["run", "--data", str(study_a["data"]), "--out", str(tmp_path), "--preset", str(preset)])
    assert spec.validate(seen, complete=True) == expected
    best_test = json.loads((study_a["out"] / "best_test.json").read_text())
    assert best_test["trial"] == study.best_trial.number and best_test["n_test"] == 30


@pytest.mark.slow
def test_the_study_never_reads_test_labels(study_a, tmp_path):
    """The same search on a copy whose test labels are all wrong: every trial's parameters,
    per-epoch figures and value are identical; only the final test figures differ."""
    from triview.tune import study as st

    data = _scrambled_copy(study_a["data"], tmp_path / "scrambled")
    study = st.prepare(str(data), tmp_path / "study", space=study_a["space"],
                       base=dict(p.split("=") for p in BASE))
    st.run(study, trials=TRIALS, say=lambda line: None)
    a, b = _load(study_a["out"]).trials, _load(tmp_path / "study").trials
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.intermediate_values for t in a] == [t.intermediate_values for t in b]
    assert [t.value for t in a] == [t.value for t in b]
    test_a = json.loads((study_a["out"] / "best_test.json").read_text())
    test_b = json.loads((tmp_path / "study" / "best_test.json").read_text())
    assert test_a["trial"] == test_b["trial"]
    assert test_a["ensemble"]["accuracy"] != test_b["ensemble"]["accuracy"]


@pytest.mark.slow
def test_resume_reruns_the_interrupted_trial_and_refuses_other_settings(study_a, tmp_path, capsys):
    out = tmp_path / "study"
    shutil.copytree(study_a["out"], out)
    base_args = ["tune", "--data", str(study_a["data"]), "--out", str(out), "--space",
                 str(study_a["space"])] + [a for p in BASE for a in ("--param", p)]
    # nothing left to run: no trial, and the best trial's test split is not scored again
    scored = (out / "best" / "evaluation" / "stage.json").stat().st_mtime_ns
    assert main(base_args + ["--trials", str(TRIALS), "--resume"]) == 0
    assert "0 to run" in capsys.readouterr().out
    assert (out / "best" / "evaluation" / "stage.json").stat().st_mtime_ns == scored
    assert len(_load(out).trials) == TRIALS
    study = _load(out)
    cut = study.ask()  # a trial the kill left RUNNING
    proposed = {n: cut.suggest_categorical(n, SPACE[n]["choices"]) if "choices" in SPACE[n]
                else cut.suggest_float(n, SPACE[n]["low"], SPACE[n]["high"], log=True) for n in SPACE}
    assert main(base_args + ["--trials", "9"]) == 2
    assert "already holds a study: add --resume" in capsys.readouterr().err
    assert main(base_args + ["--trials", "9", "--resume", "--param", "head_epochs=13"]) == 2
    assert "was started with other base" in capsys.readouterr().err
    # the re-run is the one trial this call runs: the timeout stops the search after it
    assert main(base_args + ["--trials", "9", "--resume", "--timeout", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"trial {cut.number} was interrupted: it runs again" in printed
    trials = _load(out).trials
    assert len(trials) == TRIALS + 2
    assert trials[cut.number].state.name == "FAIL"
    assert trials[-1].params == proposed and trials[-1].user_attrs["rerun_of"] == cut.number
    assert trials[-1].state.name in ("COMPLETE", "PRUNED")
    # its stages came from the cache: the crops and features of the first run
    assert {"ingest", "calibrate-and-crop", "augment"} <= set(trials[-1].user_attrs["reused"])


@pytest.mark.slow
def test_a_study_resumes_only_on_the_data_it_began_with(study_a, tmp_path):
    from triview.tune import study as st

    out = tmp_path / "study"
    out.mkdir()
    settings = json.loads((study_a["out"] / "study.json").read_text())
    (out / "study.json").write_text(json.dumps({**settings, "data_identity": "files changed"}))
    with pytest.raises(st.TuneError, match="started with other data_identity"):
        st.prepare(str(study_a["data"]), out, space=study_a["space"],
                   base=dict(p.split("=") for p in BASE), resume=True)


@pytest.mark.slow
def test_ctrl_c_marks_the_trial_for_a_rerun(study_a, tmp_path, monkeypatch, capsys):
    from triview.tune import study as st

    out = tmp_path / "study"
    shutil.copytree(study_a["out"], out)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(st, "run_trial", stopped)
    assert main(["tune", "--data", str(study_a["data"]), "--out", str(out), "--space",
                 str(study_a["space"]), "--trials", "5", "--resume",
                 *[a for p in BASE for a in ("--param", p)]]) == 130
    assert "stopped; continue with the same command and --resume" in capsys.readouterr().err
    optuna_study = _load(out)
    cut = optuna_study.trials[-1]
    assert cut.state.name == "FAIL" and cut.user_attrs["interrupted"]
    assert st.finished_count(optuna_study) == TRIALS
    assert st._requeue_interrupted(optuna_study) == [cut.number]
    assert st._requeue_interrupted(optuna_study) == []  # queued once
    assert (out / "trials.csv").read_text().count("\n") == TRIALS + 2  # header, every trial


def test_trials_compute_features_on_every_core_and_the_rest_on_one(tmp_path, monkeypatch):
    import os

    import torch

    from triview.train import loop
    from triview.train.features import FeatureStore
    from triview.tune.runner import trial_threads

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    real, seen = loop.head_inputs, []

    def recorded(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "head_inputs", recorded)
    net, images = _tiny_net(), torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    with trial_threads(tmp_path, 3):
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        store = FeatureStore.open(tmp_path)
        assert store.threads == 3
        loop.frozen_features(net, images, store=store)
        assert torch.get_num_threads() == 1
    assert seen == [3] and torch.get_num_threads() == before
    assert os.environ.get("OMP_NUM_THREADS") == env


def test_the_data_identity_follows_every_file(tmp_path):
    from triview.tune.runner import data_identity

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    first = data_identity(str(tmp_path))
    (tmp_path / "a" / "y.jpg").write_bytes(b"2")
    second = data_identity(str(tmp_path))
    (tmp_path / "a" / "x.jpg").write_bytes(b"11")
    assert len({first, second, data_identity(str(tmp_path))}) == 3
    assert data_identity("s3://b/p") == data_identity("s3://b/p") != data_identity("s3://b/q")


@pytest.mark.slow
def test_objectives_read_the_chosen_voter_and_set_the_direction(study_a, tmp_path):
    import pandas as pd

    from triview.tune import study as st
    from triview.tune.objective import OBJECTIVES

    best = _load(study_a["out"]).best_trial
    voter = study_a["out"] / "cache" / "train-voter" / best.user_attrs["steps"]["train-voter"]
    row = pd.read_csv(voter / "candidates.csv").query("chosen")
    for name, objective in OBJECTIVES.items():
        assert objective.value(voter) == float(row[name].iloc[0])
    assert OBJECTIVES["val_macro_f1"].value(voter) == best.value
    assert OBJECTIVES["val_log_loss"].better(0.1, 0.2) and OBJECTIVES["val_accuracy"].better(0.9, 0.8)
    study = st.prepare(str(study_a["data"]), tmp_path / "s", space=study_a["space"],
                       objective="val_log_loss", base=dict(p.split("=") for p in BASE))
    study.out.mkdir()
    assert st.open_study(study).direction.name == "MINIMIZE"


@pytest.mark.slow
def test_a_combination_the_rules_refuse_fails_its_trial_only(study_a, tmp_path):
    """epochs, head_folds and head_epochs all 0 is refused by the spec's rules; the trial says why,
    counts as done, and nothing runs."""
    import optuna

    from triview.tune import study as st

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"epochs": {"choices": [1, 0]}}))
    study = st.prepare(str(study_a["data"]), tmp_path / "s", space=space,
                       base={"epochs": 1, "head_folds": 0, "head_epochs": 0, "image_size": 24})
    optuna_study = optuna.create_study(direction="maximize")
    optuna_study.enqueue_trial({"epochs": 0})
    optuna_study.optimize(st._objective_fn(study), n_trials=1, catch=(st.TrialRefused,))
    (trial,) = optuna_study.trials
    assert trial.state.name == "FAIL" and "nothing would train" in trial.user_attrs["refused"]
    assert st.finished_count(optuna_study) == 1
    assert "refused: epochs, head_folds and head_epochs are all 0" in st.trial_line(study, optuna_study, trial)
    assert not (tmp_path / "s" / "cache").exists()


def test_without_a_status_server_the_objective_is_printed(capsys):
    from triview.tune.cluster import report_status
    from triview.tune.objective import get_objective

    assert report_status(get_objective("val_accuracy"), 0.9375, env={}) is False
    captured = capsys.readouterr()
    assert captured.out == "val_accuracy=0.937500\n" and "TrainJobStatus feature gate" in captured.err


def test_pruning_reports_each_epoch_and_stops_a_trailing_trial():
    import optuna

    from triview.tune.objective import get_objective
    from triview.tune.study import BRANCH_STEP, FINETUNE_STEP, HEAD_DONE, _pruning_report

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=1))
    objective = get_objective("val_macro_f1")

    def trial_with(head: list[float], tuned: list[float]) -> None:
        trial = study.ask()
        report = _pruning_report(trial, objective, head_epochs=len(head))
        for branch in range(2):
            for e, figure in enumerate(head, 1):
                report(branch, {"phase": "head", "head_epoch": e, "val_macro_f1": figure})
            for e, figure in enumerate(tuned, 1):
                report(branch, {"phase": "finetune", "epoch": e, "val_macro_f1": figure})
        study.tell(trial, max(head + tuned))

    trial_with([0.5] * 10 + [0.9] * 10, [0.8, 0.95])
    assert study.trials[0].intermediate_values == {
        **{b * BRANCH_STEP + e: 0.5 if e <= 10 else 0.9 for b in range(2) for e in range(1, 21)},
        **{b * BRANCH_STEP + HEAD_DONE: 0.9 for b in range(2)},
        **{b * BRANCH_STEP + FINETUNE_STEP + e: f for b in range(2) for e, f in ((1, 0.9), (2, 0.95))}}
    # a slower schedule that ends level is not judged on its early epochs
    trial_with([0.3] * 30 + [0.9] * 10, [0.8, 0.95])
    assert study.trials[1].state.name == "COMPLETE"
    with pytest.raises(optuna.TrialPruned, match=r"branch 1, its head phase: 0\.7000"):
        trial_with([0.7] * 20, [0.99])  # below the median where the head phases end
    assert study.trials[2].user_attrs["pruned_at"] == "branch 1, its head phase"
    with pytest.raises(optuna.TrialPruned, match=r"branch 1, epoch 2: 0\.9000"):
        trial_with([0.9] * 20, [0.5, 0.9])  # level after its head, behind after fine-tuning


# ----------------------------------------------------------------------------- the cluster


@functools.lru_cache(maxsize=None)
def _crd_validator():
    from k8s_tools import crd_validator

    return crd_validator(TRAINER_SCHEMAS / "trainer.kubeflow.org_optimizationjobs.yaml",
                         "v1alpha1", "Trainer")


def crd_errors(obj: dict) -> list[str]:
    """Strict schema errors, plus the CRD's CEL rules that the schema cannot express."""
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in _crd_validator().iter_errors(obj)]
    s = obj["spec"]
    if s["parallelTrials"] > s["numTrials"]:
        errors.append("parallelTrials cannot exceed numTrials")
    if len(s["searchAlgorithm"]) != 1:
        errors.append("exactly one search algorithm")
    for p in s["parameters"]:
        if len(p["searchSpace"]) != 1:
            errors.append(f"{p['name']}: exactly one search space")
        for kind, body in p["searchSpace"].items():
            if kind in ("uniform", "logUniform") and not float(body["min"]) < float(body["max"]):
                errors.append(f"{p['name']}: min < max")
            if kind == "logUniform" and float(body["min"]) <= 0:
                errors.append(f"{p['name']}: log min > 0")
    meta = s["trainJobTemplate"].get("metadata", {})
    if "name" in meta or "namespace" in meta:
        errors.append("name and namespace cannot be set in a template")
    return errors


def _emit(tmp_path, *extra) -> dict:
    path = tmp_path / "job.yaml"
    assert main(["tune", "--data", "s3://bucket/photos", "--emit", str(path), *extra]) == 0
    return yaml.safe_load(path.read_text())


def test_the_optimization_job_validates_strictly_and_searches_the_same_space(tmp_path):
    from triview.tune.cluster import space_from_parameters
    from triview.tune.runner import searched_stages
    from triview.tune.space import load_space

    job = _emit(tmp_path, "--trials", "20", "--parallel-trials", "4", "--seed", "7",
                "--param", "image_size=192", "--cache-pvc", "tune-cache")
    assert crd_errors(job) == []
    spec_ = job["spec"]
    local = load_space("photos", searched_stages())
    assert space_from_parameters(spec_["parameters"]) == local.to_mapping()
    assert spec_["objectives"] == [{"metric": "val_macro_f1", "direction": "Maximize"}]
    assert spec_["searchAlgorithm"] == {"random": {"seed": 7}}
    assert (spec_["numTrials"], spec_["parallelTrials"]) == (20, 4)
    trainer = spec_["trainJobTemplate"]["spec"]["trainer"]
    assert trainer["command"] == ["triview", "tune-trial"]
    args = trainer["args"]
    assert json.loads(args[args.index("--space-json") + 1]) == local.to_mapping()
    assert args[args.index("--data") + 1] == "s3://bucket/photos"
    assert args[args.index("--param") + 1] == "image_size=192"
    # secrets by name only
    env = {e["name"]: e for e in trainer["env"]}
    for var, key in (("AWS_ACCESS_KEY_ID", "accesskey"), ("AWS_SECRET_ACCESS_KEY", "secretkey")):
        assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "triview-minio",
                                                                         "key": key}}}
    pod = spec_["trainJobTemplate"]["spec"]["runtimePatches"][0]["trainingRuntimeSpec"][
        "template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert {"name": "tune-cache", "persistentVolumeClaim": {"claimName": "tune-cache"}} in pod["volumes"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    for mutate in (lambda o: o["spec"].update(numTrial=3),
                   lambda o: o["spec"]["parameters"][0]["searchSpace"].update(normal={}),
                   lambda o: o["spec"]["trainJobTemplate"]["spec"]["trainer"].update(gpus=1),
                   lambda o: o["spec"].update(parallelTrials=21)):
        broken = copy.deepcopy(job)
        mutate(broken)
        assert crd_errors(broken), "the strict schema missed a bad field"


def test_grids_become_choices_and_cluster_errors_are_clear(tmp_path, capsys):
    from triview.tune.cluster import search_parameters
    from triview.tune.space import parse_space

    space = parse_space({"head_epochs": {"low": 20, "high": 100, "step": 40},
                         "freeze_bn": {"choices": [True, False]},
                         "lr": {"low": 1e-5, "high": 1e-3, "log": True}}, ("train-branch",))
    assert search_parameters(space) == [
        {"name": "head_epochs", "searchSpace": {"categorical": {"choices": ["20", "60", "100"]}}},
        {"name": "freeze_bn", "searchSpace": {"categorical": {"choices": ["true", "false"]}}},
        {"name": "lr", "searchSpace": {"logUniform": {"min": "1e-05", "max": "0.001",
                                                      "type": "Float"}}}]
    assert main(["tune", "--data", "/local/photos", "--emit", "-"]) == 2
    assert "give --data s3://bucket/prefix" in capsys.readouterr().err
    assert main(["tune", "--data", "s3://b/p", "--emit", "-", "--parallel-trials", "5",
                 "--trials", "3"]) == 2
    assert "parallel trials (5) <= trials (3)" in capsys.readouterr().err


def test_a_trial_reads_its_values_from_the_controller_env():
    from triview.tune.cluster import ClusterError, assignments
    from triview.tune.space import parse_space

    space = parse_space(SPACE, ("train-branch", "balance"))
    others = {"KUBEFLOW_TRAINER_OPT_head_lr": "0.002",
              "KUBEFLOW_TRAINER_OPT_class_weighting": "none", "PATH": "/bin"}
    env = {**others, "KUBEFLOW_TRAINER_OPT_HIDDEN": "16"}  # older controllers write upper case
    assert assignments(space, env) == {"head_lr": 0.002, "hidden": 16, "class_weighting": "none"}
    for broken, message in (
            ({**others, "KUBEFLOW_TRAINER_OPT_hidden": "17"}, "hidden=17 is not in the space"),
            (others, "no KUBEFLOW_TRAINER_OPT_<name> value for hidden"),
            ({**env, "KUBEFLOW_TRAINER_OPT_lr": "0.1"}, r"outside the space: \['lr'\]")):
        with pytest.raises(ClusterError, match=message):
            assignments(space, broken)


@pytest.fixture()
def kube(monkeypatch, tmp_path):
    """test_deploy's stand-in API server, with the Trainer's group added."""
    import tempfile

    from tests.test_deploy import FakeKubeApi as Base

    class Api(Base):
        RESOURCES = {**Base.RESOURCES,
                     ("trainer.kubeflow.org", "v1alpha1"): [("optimizationjobs", "OptimizationJob")]}

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the client's discovery cache
    api = Api()
    yield api
    api.close()


def test_apply_server_side_applies_the_emitted_job(kube, tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": kube.host}}],
        "users": [{"name": "tuner", "user": {"token": "tok-tune"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "tuner"}}]}))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    emitted = _emit(tmp_path, "--namespace", "ml")
    assert main(["tune", "--data", "s3://bucket/photos", "--apply", "--kubeconfig", str(kubeconfig),
                 "--namespace", "ml"]) == 0
    (patch,) = kube.of("PATCH")
    assert patch["path"] == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/optimizationjobs/triview-tune"
    assert patch["content_type"] == "application/apply-patch+yaml"
    assert patch["authorization"] == "Bearer tok-tune"
    assert patch["body"] == emitted


def _tls_status_server(tmp_path: Path):
    """A stand-in TrainJob status server on 127.0.0.1 over TLS with its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(
                "127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    received = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "auth": self.headers["Authorization"],
                             "body": json.loads(body)})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "ca.crt", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


@pytest.mark.slow
def test_a_cluster_trial_reports_the_same_value_as_the_local_trial(study_a, tmp_path):
    """``triview tune-trial`` as its TrainJob runs it: trial 0's values from the controller's
    env, the study's cache as the shared volume, the objective posted over TLS with the
    projected token, and equal to the local search's value for the same parameters."""
    from triview.tune.cluster import ENV_PREFIX, STATUS_CA, STATUS_TOKEN, STATUS_URL
    from triview.tune.cluster import run_cluster_trial
    from triview.tune.objective import get_objective
    from triview.tune.space import load_space
    from triview.tune.runner import searched_stages

    server, received = _tls_status_server(tmp_path)
    (tmp_path / "token").write_text("projected-token\n")
    study = _load(study_a["out"])
    trial0 = study.trials[0]
    env = {STATUS_URL: f"https://127.0.0.1:{server.server_address[1]}/status",
           STATUS_CA: str(tmp_path / "ca.crt"), STATUS_TOKEN: str(tmp_path / "token"),
           **{f"{ENV_PREFIX}{k}": str(v) for k, v in trial0.params.items()}}
    space = load_space(study_a["space"], searched_stages())
    try:
        value = run_cluster_trial(str(study_a["data"]), json.dumps(space.to_mapping()),
                                  get_objective("val_macro_f1"), _base_values(),
                                  str(study_a["out"] / "cache"), env)
    finally:
        server.shutdown()
        server.server_close()
    assert value == trial0.value
    (post,) = received
    assert post["path"] == "/status" and post["auth"] == "Bearer projected-token"
    status = post["body"]["trainerStatus"]
    assert status["metrics"] == [{"name": "val_macro_f1", "value": f"{trial0.value:.6f}"}]
    assert status["progressPercentage"] == 100 and status["lastUpdatedTime"]
    assert sqlite3.connect(study_a["out"] / "study.db").execute(
        "select count(*) from trials").fetchone()[0] >= TRIALS  # the local study is untouched
