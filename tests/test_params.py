"""The parameter spec: one definition per parameter, from which the component and
pipeline signatures, the CLI's checking and the docs' parameter table are derived; bad values are
refused before anything starts, and again at the top of the task."""
import ast
import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import digits_train
import yaml

from triview import params as spec
from triview.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_generated_component_signatures_and_docs_reference_pages_are_fresh():
    """The components' parameter blocks, docs/reference/parameters.md and
    docs/reference/cli.md are what python -m components.codegen writes now."""
    from components import codegen

    assert codegen.stale() == [], "run: python -m components.codegen"


def test_every_component_and_the_pipeline_carry_exactly_the_spec():
    from components import codegen
    from pipelines.triview_pipeline import triview_pipeline

    for folder, stage in codegen.COMPONENT_STAGES.items():
        module = __import__(f"components.{folder}.component", fromlist=["x"])
        func = next(v for v in vars(module).values() if hasattr(v, "python_func"))
        signature = inspect.signature(func.python_func).parameters
        for name in spec.names(stage):
            assert signature[name].default == spec.PARAMS[name].default, (folder, name)
            assert signature[name].annotation is spec.PARAMS[name].type, (folder, name)
    pipeline = inspect.signature(triview_pipeline.pipeline_func).parameters
    assert list(pipeline) == ["data"] + list(spec.PARAMS)
    for name, param in spec.PARAMS.items():
        assert pipeline[name].default == param.default and pipeline[name].annotation is param.type


def test_the_kfp_ui_shows_every_pipeline_parameter_with_its_description():
    ir = next(yaml.safe_load_all((REPO / "pipelines" / "triview.yaml").read_text()))
    inputs = ir["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {"data"} | set(spec.PARAMS)
    assert "one of cosine, linear" in inputs["scheduler"]["description"]
    assert inputs["scheduler"]["description"].startswith("[train-branch]")
    assert all(inputs[n].get("description") for n in inputs)


def test_library_configs_are_built_from_the_spec():
    import dataclasses

    from triview.augment import AugmentConfig
    from triview.train import TrainConfig

    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert train == {(spec.PARAMS[n].field or n): spec.PARAMS[n].default
                     for n in spec.names("train-branch")}
    assert AugmentConfig().copies == spec.PARAMS["augment_copies"].default
    with pytest.raises(spec.ParamError, match="'optimizer' must be one of adamw, adam, sgd"):
        TrainConfig(optimizer="lion")


def test_registries_implement_exactly_the_allowed_values():
    from triview import backbones, balance, models
    from triview.augment import BORDER_MODES
    from triview.train.optim import OPTIMIZERS, SCHEDULES

    assert set(OPTIMIZERS) == set(spec.PARAMS["optimizer"].allowed)
    assert set(SCHEDULES) == set(spec.PARAMS["scheduler"].allowed)
    assert set(BORDER_MODES) == set(spec.PARAMS["border_mode"].allowed)
    assert set(balance.WEIGHTINGS) == set(spec.PARAMS["class_weighting"].allowed)
    assert set(balance.RESAMPLING) == set(spec.PARAMS["resample"].allowed)
    assert set(models.NORMALIZATIONS) | {"auto"} == set(spec.PARAMS["normalization"].allowed)
    assert set(backbones.BACKBONES) == set(spec.PARAMS["backbone"].allowed)


@pytest.mark.parametrize("value,message", [
    ("scheduler=cosinee", "'scheduler' must be one of cosine, linear, poly, step, multistep, constant"),
    ("lr=-1", "'lr' must be in (0, 10]"),
    ("epochs=2.5", "'epochs' expects int"),
    ("compile=maybe", "'compile' expects a bool"),
    ("pattern=9by6", "'pattern': expected inner corners like 9x6"),
    ("val_fraction=0.5", "leaves less than 10% of the images for training"),
    ("voter_folds=1", "voter_folds must be 0 (off) or at least 2"),
    ("registry=gs://bucket/x", "expected a local path or an s3:// URI"),
])
def test_bad_values_are_refused_naming_the_parameter(value, message):
    with pytest.raises(spec.ParamError) as err:
        spec.parse_pairs([value, "test_fraction=0.4"] if "val_fraction" in value else [value])
    assert message in str(err.value)


def test_run_and_submit_refuse_a_bad_value_at_once_and_start_nothing(tmp_path):
    """The bar: exit 2 within 5 seconds, naming the parameter and its allowed values; no
    task starts (no pipeline root is written) and KFP is never contacted."""
    triview = str(Path(sys.executable).parent / "triview")
    data = tmp_path / "data"
    data.mkdir()
    for argv in (["run", "--data", str(data), "--out", str(tmp_path / "out")],
                 ["submit", "--data", "/data", "--host", "http://127.0.0.1:9"]):
        start = time.perf_counter()
        proc = subprocess.run([triview, *argv, "--param", "scheduler=cosinee"],
                              capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - start
        assert proc.returncode == 2, proc.stderr
        assert "'scheduler' must be one of cosine, linear" in proc.stderr
        assert seconds < 5, seconds
    assert not (tmp_path / "out").exists()


def test_the_task_checks_its_parameters_too(cropped, augmented, balanced, tmp_path):
    """A run started from the KFP UI bypasses the CLI: the stage refuses the value itself,
    before reading any data."""
    from triview.stages import train_branch_stage

    with pytest.raises(spec.ParamError, match="'scheduler' must be one of"):
        train_branch_stage(cropped, augmented, balanced, "center", tmp_path / "m",
                           **digits_train(scheduler="cosinee"))
    assert not (tmp_path / "m").exists()


def test_cli_params_lists_the_spec(capsys):
    assert main(["params", "--stage", "train-branch"]) == 0
    out = capsys.readouterr().out
    assert "scheduler (str, default 'cosine'; one of cosine" in out and "[ingest]" not in out


# ----------------------------------------------------------------------------- layers

#: The layers of the library, lowest first: a module may import its own layer or lower
#: ones, never a higher one (stages above the stage modules, the CLI on top).
LAYERS = [
    {"backbones", "params", "storage", "demo", "progress"},
    {"manifest", "runinfo", "metrics", "cropcache", "shards"},
    {"scoring", "artifacts", "paired", "temperature"},
    {"calibration", "crop", "validate", "dataroot", "sources", "customvision", "datastats", "ingest", "balance", "augment",
     "models", "weights", "distributed", "registry", "report", "gradcam", "timing", "summary",
     "runtime", "drift"},
    {"train", "voter", "voter_modules", "evaluate", "gate", "export", "predict", "serving",
     "deploy", "preflight", "trainjob"},
    {"stages"},
    {"tune"},
    {"cli", "cli_parser", "cli_examples", "__main__"},
]


def _imports() -> dict[str, set[str]]:
    """Every triview module (packages as one) -> the triview modules it imports, at any
    level of the file (function-level imports included)."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "triview").rglob("*.py"):
        rel = path.relative_to(REPO / "triview").with_suffix("").parts
        name = rel[0] if rel[0] != "__init__" else "__init__"
        if name == "__init__":
            continue
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] == "triview":
                    if len(parts) > 1:
                        targets.add(parts[1])
                    else:
                        targets.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "triview" and len(parts) > 1:
                        targets.add(parts[1])
        targets.discard(name)
    return graph


def test_library_layers_only_point_down():
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    graph = _imports()
    assert set(graph) <= set(layer), f"modules without a layer: {set(graph) - set(layer)}"
    upward = [(m, t) for m, ts in graph.items() for t in ts if layer[t] > layer[m]]
    assert upward == [], f"imports that point up a layer: {upward}"


def test_no_import_circles_in_the_library():
    graph = _imports()
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert cycles == [], f"import circles: {cycles}"


def test_torchrun_reenters_through_the_stage_layer():
    text = (REPO / "triview" / "distributed.py").read_text()
    assert "triview.stages" not in text.replace("``python -m triview.stages``", "")
    assert 'run_under_torchrun(__name__' in (REPO / "triview" / "stages.py").read_text()
