import ast
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.local import parse_params
from triview.cli import main

REPO = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "calibrate-and-crop", "balance", "augment", "train-branch-view-1",
          "train-branch-view-2", "train-branch-view-3", "train-voter", "evaluate", "export"]


def test_committed_pipeline_yaml_is_identical_to_a_fresh_compile(tmp_path):
    fresh = tmp_path / "triview.yaml"
    assert main(["compile", "-o", str(fresh)]) == 0
    committed = REPO / "pipelines" / "triview.yaml"
    assert committed.read_text() == fresh.read_text(), \
        "pipelines/triview.yaml is stale: run `triview compile -o pipelines/triview.yaml`"


def test_dag_has_the_ten_stages_wired_with_typed_artifacts():
    spec = next(yaml.safe_load_all((REPO / "pipelines" / "triview.yaml").read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    names = sorted(t["taskInfo"]["name"] for t in tasks.values())
    assert names == sorted(STAGES + ["repeats"])  # repeats: the seeds fan-out, when asked for
    by_name = {t["taskInfo"]["name"]: t for t in tasks.values()}
    assert set(by_name["train-voter"]["dependentTasks"]) == {
        k for k, t in tasks.items() if t["taskInfo"]["name"].startswith("train-branch")}
    types = {a["artifactType"]["schemaTitle"]
             for c in spec["components"].values()
             for a in c.get("outputDefinitions", {}).get("artifacts", {}).values()}
    assert {"system.Dataset", "system.Model", "system.Metrics", "system.ClassificationMetrics",
            "system.HTML", "system.Markdown"} <= types
    views = sorted(t["inputs"]["parameters"]["view_index"]["runtimeValue"]["constant"]
                   for n, t in by_name.items() if n.startswith("train-branch"))
    assert views == [0, 1, 2]


def test_repeats_fan_out_over_seeds_only_when_asked_for():
    spec = next(yaml.safe_load_all((REPO / "pipelines" / "triview.yaml").read_text()))
    root = spec["root"]
    assert root["inputDefinitions"]["parameters"]["repeats"]["defaultValue"] == 1
    cond = next(t for t in root["dag"]["tasks"].values() if t["taskInfo"]["name"] == "repeats")
    assert cond["triggerPolicy"]["condition"] == \
        "int(inputs.parameter_values['pipelinechannel--repeats']) > 1"
    inner = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    loop = next(t for t in inner.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].startswith(
        "pipelinechannel--repeat-seeds-Output")
    assert "iteratorPolicy" not in loop  # on a cluster every repeat runs at once
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert sorted(t["taskInfo"]["name"] for t in body.values()) == [
        "evaluate-repeat", "train-branch-view-1-repeat", "train-branch-view-2-repeat",
        "train-branch-view-3-repeat", "train-voter-repeat"]
    for task in body.values():  # the loop item is the seed; repeat=True keeps records apart
        params = task["inputs"]["parameters"]
        assert params["repeat"]["runtimeValue"]["constant"] is True
        if "seed" in params:
            assert params["seed"]["componentInputParameter"].endswith("loop-item")
        assert "registry" not in params  # a repeat is never gated against the champion
    summary = next(t for t in inner.values() if t["taskInfo"]["name"] == "summarize-repeats")
    collected = summary["inputs"]["artifacts"]["repeat_evaluations"]["taskOutputArtifact"]
    assert collected["producerTask"] == next(k for k, t in inner.items() if "parameterIterator" in t)
    assert summary["inputs"]["artifacts"]["evaluation"]  # the main seed's evaluation


def test_library_never_imports_kfp():
    for path in (REPO / "triview").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "kfp" or n.startswith("kfp.") for n in names), path


def test_params_are_typed_from_the_pipeline_signature():
    assert parse_params(["epochs=3", "lr=0.01", "backbone=resnet18", "image-size=48"]) == {
        "epochs": 3, "lr": 0.01, "backbone": "resnet18", "image_size": 48}


def test_bad_params_are_clear_errors(capsys, tmp_path):
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--param", "epoch=3"])
    assert rc == 2 and "unknown pipeline parameter 'epoch'" in capsys.readouterr().err
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--param", "epochs=x"])
    assert rc == 2 and "expects int" in capsys.readouterr().err
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--repeats", "0"])
    assert rc == 2 and "repeats must be at least 1, got 0" in capsys.readouterr().err
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--repeats", "3",
               "--param", "repeats=2"])
    assert rc == 2 and "--repeats 3 contradicts --param repeats=2" in capsys.readouterr().err


def test_cli_entry_point_is_installed():
    out = subprocess.run([str(Path(sys.executable).parent / "triview"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("demo-data", "ingest", "compile", "run"):
        assert command in out


def test_pipeline_and_component_defaults_match_the_library():
    import dataclasses
    import inspect

    from components.train_branch import train_branch
    from pipelines.triview_pipeline import triview_pipeline
    from triview.train import TrainConfig

    pipeline = inspect.signature(triview_pipeline.pipeline_func).parameters
    component = inspect.signature(train_branch.python_func).parameters
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("channels_last", "checkpoint_dir"):  # checkpoint_root + run id in the DAG
            continue
        assert pipeline[f.name].default == f.default, f.name
        assert component[f.name].default == f.default, f.name
