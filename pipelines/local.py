"""Run the compiled DAG on this machine with kfp.local (the embedded default).

This is the same ``triview_pipeline`` that is compiled for Kubeflow; kfp.local's
SubprocessRunner runs each task as a subprocess of this Python environment and
keeps every artifact under ``<out>/pipeline_root``.
"""
import inspect
import time
import warnings
from pathlib import Path

from kfp import local

from pipelines.platform import PlatformOptions
from pipelines.triview_pipeline import make_pipeline, triview_pipeline
from triview.summary import build_summary, write_summary


def pipeline_parameters() -> dict[str, inspect.Parameter]:
    """The pipeline's parameters with their defaults and annotated types."""
    return dict(inspect.signature(triview_pipeline.pipeline_func).parameters)


def parse_params(pairs: list[str]) -> dict:
    """Turn ``k=v`` strings into pipeline arguments of the declared types."""
    params = pipeline_parameters()
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--param expects key=value, got {pair!r}")
        if key not in params or key == "data":
            raise ValueError(f"unknown pipeline parameter {key!r}; known: "
                             f"{sorted(k for k in params if k != 'data')}")
        kind = params[key].annotation
        try:
            out[key] = kind(value) if kind is not bool else value.lower() in ("1", "true", "yes")
        except ValueError:
            raise ValueError(f"parameter {key!r} expects {kind.__name__}, got {value!r}") from None
    return out


def run_local(data: str, out_dir: str, params: dict | None = None) -> dict:
    """Run the whole DAG locally; write and return ``<out_dir>/run_summary.json``."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_path = str(Path(data).resolve())
    if not Path(data_path).exists():
        raise FileNotFoundError(f"input {data!r} does not exist")
    if int((params or {}).get("repeats", 1)) < 1:
        raise ValueError(f"repeats must be at least 1, got {params['repeats']}")
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(out / "pipeline_root"), raise_on_error=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # kfp.local warns that our cluster images are not Python images; locally it uses this venv.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # The same DAG; locally a failed task fails the run at once instead of retrying
        # with the cluster's minutes of backoff (the retry policy is for pod evictions).
        # One repeat at a time: each training task uses every core of this machine.
        local_pipeline = make_pipeline(PlatformOptions(retries=0, repeat_parallelism=1))
        result = local_pipeline(data=data_path, **(params or {}))
    seconds = time.perf_counter() - start
    model_dir = Path(result.outputs["model"].path)
    report = Path(result.outputs["report"].path)
    run_dir = model_dir.parent.parent  # <root>/<run>/<task>/<output>
    summary = build_summary(run_dir, model_dir, report)
    summary["dag_seconds"] = round(seconds, 1)
    summary["parameters"] = {"data": data_path, **(params or {})}
    write_summary(summary, out)
    return summary
