"""Run the compiled DAG on this machine with kfp.local (the embedded default).

This is the same ``triview_pipeline`` that is compiled for Kubeflow; kfp.local's
SubprocessRunner runs each task as a subprocess of this Python environment and
keeps every artifact under ``<out>/pipeline_root``. With ``runner="docker"`` each task
runs in its image instead (pipelines/runners.py).
"""
import contextlib
import shutil
import time
import warnings
from pathlib import Path

from kfp import local

from pipelines.console import RunConsole
from pipelines.platform import PlatformOptions
from pipelines.triview_pipeline import make_pipeline
from triview import params as spec
from triview.artifacts import REPORT_HTML
from triview.customvision import is_customvision
from triview.storage import atomic_path
from triview.summary import build_summary, write_summary
from triview.weights import resolve as resolve_weights

RUNNERS = ("subprocess", "docker")


def run_local(data: str, out_dir: str, params: dict | None = None, verbose: bool = False,
              runner: str = "subprocess") -> dict:
    """Run the whole DAG locally; write and return ``<out_dir>/run_summary.json``.
    ``params`` are checked against the spec before anything starts.

    ``runner``: ``subprocess`` (tasks in this venv) or ``docker`` (each task in the image
    the IR names, as a restricted pod: pipelines/runners.py). The console shows one line
    per task and keeps each task's output in ``<out_dir>/logs/<task>.log`` (``verbose``:
    everything streams as kfp.local prints it); a failed task raises
    :class:`pipelines.console.TaskFailed`.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    params = spec.validate(params or {})
    full = {**spec.defaults(), **params}
    if runner == "subprocess":
        # here, not minutes later in a training task: the weights resolve on this machine
        resolve_weights(full["backbone"], full["weights"], full["weights_root"])
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if is_customvision(data):   # read by the ingest task, the key from this environment
        if runner == "docker":
            raise ValueError("a customvision:// source needs the network, which the docker "
                             "runner's tasks do not have: use --runner subprocess")
        data_path = data
    else:
        data_path = str(Path(data).resolve())
        if not Path(data_path).exists():
            raise FileNotFoundError(f"input {data!r} does not exist")
    # The same DAG; locally a failed task fails the run at once instead of retrying
    # with the cluster's minutes of backoff (the retry policy is for pod evictions).
    # One repeat at a time: each training task uses every core of this machine.
    options = PlatformOptions(retries=0, repeat_parallelism=1)
    if runner == "docker":
        from pipelines.runners import docker_session

        session = docker_session(out, data_path, params, options)
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(out / "pipeline_root"), raise_on_error=True)
        session = contextlib.nullcontext(params)
    start = time.perf_counter()
    with warnings.catch_warnings(), session as run_params:
        # kfp.local warns that our cluster images are not Python images; locally it uses this venv.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        local_pipeline = make_pipeline(options)
        with RunConsole(out / "logs", verbose=verbose):
            result = local_pipeline(data=data_path, **run_params)
    seconds = time.perf_counter() - start
    model_dir = Path(result.outputs["model"].path)
    run_dir = model_dir.parent.parent  # <root>/<run>/<task>/<output>
    # KFP's HTML artifact is a file without a suffix: a copy beside the summary opens in a browser
    report = out / REPORT_HTML
    with atomic_path(report) as tmp:
        shutil.copyfile(result.outputs["report"].path, tmp)
    summary = build_summary(run_dir, model_dir, report)
    summary["dag_seconds"] = round(seconds, 1)
    summary["parameters"] = {"data": data_path, **params}
    summary["runner"] = runner
    write_summary(summary, out)
    return summary
