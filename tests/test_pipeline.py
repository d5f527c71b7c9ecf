import ast
import subprocess
import sys
from pathlib import Path

import yaml

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
    # repeats: the seeds fan-out, when asked for; deploy: the serving step, when asked for
    assert names == sorted(STAGES + ["repeats", "deploy"])
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


def test_deploy_runs_after_export_only_when_asked_for_and_is_never_cached():
    spec = next(yaml.safe_load_all((REPO / "pipelines" / "triview.yaml").read_text()))
    root = spec["root"]
    assert root["inputDefinitions"]["parameters"]["deploy"]["defaultValue"] is False
    cond = next(t for t in root["dag"]["tasks"].values() if t["taskInfo"]["name"] == "deploy")
    assert cond["dependentTasks"] == ["export"]
    assert cond["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--deploy'] == true"
    inner = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    task = inner["deploy"]
    assert task["inputs"]["artifacts"]["model"]["componentInputArtifact"] == \
        "pipelinechannel--export-model"
    assert not task["cachingOptions"].get("enableCache")  # a deploy acts on the cluster
    assert task["inputs"]["parameters"]["serve_image"]["runtimeValue"]["constant"].split(
        "/")[-1].startswith("triview-serve:")


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


def test_bad_params_are_clear_errors(capsys, tmp_path):
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--param", "epoch=3"])
    assert rc == 2 and "unknown parameter 'epoch'" in capsys.readouterr().err
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--param", "epochs=x"])
    assert rc == 2 and "expects int" in capsys.readouterr().err
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--repeats", "0"])
    assert rc == 2 and "parameter 'repeats' must be >= 1; got 0" in capsys.readouterr().err
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--repeats", "3",
               "--param", "repeats=2"])
    assert rc == 2 and "--repeats 3 contradicts --param repeats=2" in capsys.readouterr().err


def test_cli_entry_point_is_installed():
    out = subprocess.run([str(Path(sys.executable).parent / "triview"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("demo-data", "ingest", "compile", "run"):
        assert command in out
