"""One trial of a search: the DAG's stages up to the voter, run in this process, each
stage's output kept in a cache folder under a key made of what the stage reads: the keys
of its inputs, the parameters its stage owns (:func:`triview.params.pick`) and, for
ingest, the data's identity. A trial therefore recomputes only the stages whose inputs or
parameters changed, as KFP's cache does for a pipeline run; a trial over head, voter or
class-weighting settings reuses ingest, the crops and augmentation, and its branches
read the frozen backbone's features from a shared store (:mod:`triview.train.features`).

The steps follow the DAG (:data:`triview.params.STAGES`) and stop before evaluate: no
trial scores the test split. A new stage slots in as one more :class:`Step`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import triview
from triview import params as spec
from triview.runinfo import STAGE_FILE

#: Called with (branch index, the epoch's history row) as each training epoch ends.
EpochReport = Callable[[int, dict], None]
BRANCHES = ("train-branch-view-1", "train-branch-view-2", "train-branch-view-3")


@dataclass
class TrialContext:
    """What a step needs besides its input folders and parameters."""
    data: str                         # the data source, as ingest reads it
    data_key: str                     # its identity (see :func:`data_identity`)
    features: Path                    # the frozen-feature store of the study
    on_epoch: EpochReport | None = None


@dataclass(frozen=True)
class Step:
    """One stage of the trial: ``run(inputs, out_dir, params, context)`` writes ``out_dir``
    from the output folders of ``inputs`` (earlier steps) and the ``stage``'s parameters.
    ``keep``: "all" (reused by later trials) or "best" (kept only while its trial is the
    best: a branch's model is not worth keeping for every trial)."""
    name: str
    stage: str
    inputs: tuple[str, ...]
    run: Callable[[dict[str, Path], Path, dict, TrialContext], dict]
    keep: str = "all"


def _ingest(inputs, out, p, ctx):
    from triview.stages import ingest_stage

    return ingest_stage(ctx.data, out, plot=False, progress=False, **p)


def _crop(inputs, out, p, ctx):
    from triview.stages import calibrate_and_crop_stage

    return calibrate_and_crop_stage(inputs["ingest"], out, **p)


def _balance(inputs, out, p, ctx):
    from triview.stages import balance_stage

    return balance_stage(inputs["calibrate-and-crop"], out, **p)


def _augment(inputs, out, p, ctx):
    from triview.stages import augment_stage

    return augment_stage(inputs["calibrate-and-crop"], out, **p)


def _branch(index: int):
    def run(inputs, out, p, ctx):
        from triview.artifacts import CHECKPOINTS_DIR
        from triview.stages import train_branch_stage

        report = None if ctx.on_epoch is None else (lambda row: ctx.on_epoch(index, row))
        record = train_branch_stage(inputs["calibrate-and-crop"], inputs["augment"],
                                    inputs["balance"], index, out, run_id=out.name,
                                    feature_cache=ctx.features, on_epoch=report, **p)
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)  # resuming is the cache's job
        return record
    return run


def _voter(inputs, out, p, ctx):
    from triview.stages import train_voter_stage

    return train_voter_stage([inputs[b] for b in BRANCHES], out, **p)


def trial_steps() -> tuple[Step, ...]:
    """The trial's steps in DAG order: the pipeline up to the voter."""
    crop = "calibrate-and-crop"
    return (Step("ingest", "ingest", (), _ingest),
            Step(crop, crop, ("ingest",), _crop),
            Step("balance", "balance", (crop,), _balance),
            Step("augment", "augment", (crop,), _augment),
            *(Step(name, "train-branch", (crop, "augment", "balance"), _branch(k), keep="best")
              for k, name in enumerate(BRANCHES)),
            Step("train-voter", "train-voter", BRANCHES, _voter, keep="best"))


def searched_stages() -> tuple[str, ...]:
    """The stages a trial runs (whose parameters a search may vary)."""
    return tuple(dict.fromkeys(s.stage for s in trial_steps()))


def data_identity(data: str) -> str:
    """The data's identity for the cache: a local file or folder by the path, size and
    modification time of every file in it; an ``s3://`` prefix by its URI."""
    digest = hashlib.sha256(str(data).encode())
    path = Path(data)
    if not str(data).startswith("s3://") and path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            digest.update(f"{f.relative_to(path) if f != path else f.name}|{st.st_size}|"
                          f"{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


@dataclass
class StepResult:
    key: str
    folder: Path
    record: dict
    reused: bool
    seconds: float


@dataclass
class TrialOutcome:
    """The trial's step outputs, by step name, and its wall time."""
    steps: dict[str, StepResult] = field(default_factory=dict)
    seconds: float = 0.0

    def folder(self, name: str) -> Path:
        return self.steps[name].folder

    @property
    def reused(self) -> list[str]:
        return [n for n, s in self.steps.items() if s.reused]

    @property
    def keys(self) -> dict[str, str]:
        return {n: s.key for n, s in self.steps.items()}


class StageCache:
    """Step outputs under ``root/<step>/<key>``, each written to a temporary folder and
    renamed into place when the step succeeds, so a stopped trial leaves no half output
    where a later trial would take it. A failed step's temporary folder stays, for the
    paths its error names (ingest's quarantine report) until :meth:`sweep`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, step: Step, input_keys: dict[str, str], params: dict[str, Any],
            data_key: str | None) -> str:
        text = json.dumps({"step": step.name, "stage": step.stage, "triview": triview.__version__,
                           "inputs": input_keys, "params": params, "data": data_key},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def folder(self, step_name: str, key: str) -> Path:
        return self.root / step_name / key

    def run(self, step: Step, inputs: dict[str, StepResult], values: dict[str, Any],
            ctx: TrialContext) -> StepResult:
        params = spec.pick(step.stage, values)
        key = self.key(step, {n: r.key for n, r in inputs.items()}, params,
                       ctx.data_key if not step.inputs else None)
        final = self.folder(step.name, key)
        if (final / STAGE_FILE).is_file():
            return StepResult(key, final, json.loads((final / STAGE_FILE).read_text()), True, 0.0)
        tmp = final.with_name(f".{key}{self._mine}")
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        record = step.run({n: r.folder for n, r in inputs.items()}, tmp, params, ctx)
        try:
            os.replace(tmp, final)
        except OSError:
            if (final / STAGE_FILE).is_file():  # another trial finished it first: as good
                record = json.loads((final / STAGE_FILE).read_text())
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # a folder without its stage.json: left by an interruption
                shutil.rmtree(final)
                os.replace(tmp, final)
        return StepResult(key, final, record, False, time.perf_counter() - start)

    @property
    def _mine(self) -> str:
        # unique per process and pod: trials on a shared volume may run one step at once
        return f".{socket.gethostname()}.{os.getpid()}.tmp"

    def sweep(self, everyone: bool = False) -> None:
        """Remove the temporary folders of this process's unfinished steps (``everyone``:
        of every process; only when no other process uses the cache)."""
        pattern = "*.tmp" if everyone else f"*{self._mine}"
        for tmp in self.root.glob(f"*/.{pattern}"):
            shutil.rmtree(tmp, ignore_errors=True)

    def discard(self, step_name: str, key: str) -> None:
        shutil.rmtree(self.folder(step_name, key), ignore_errors=True)


@contextlib.contextmanager
def trial_threads(features: Path, n: int = 0):
    """Run the trials on one intra-op thread, except the frozen-feature extraction, which
    gets ``n`` (0: one per core); restored afterwards. After its features exist a trial is
    many small operations (the head's steps, copies of weights), which extra threads only
    slow down on a busy CPU; the convolutions of the extraction are worth the threads."""
    import torch

    from triview.train.features import FeatureStore

    FeatureStore.open(features, threads=n or os.cpu_count() or 1)
    before_env, before = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"  # the branches keep an explicit setting
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env


def run_trial(values: dict[str, Any], cache: StageCache, ctx: TrialContext,
              outcome: TrialOutcome | None = None) -> TrialOutcome:
    """Run every trial step for ``values`` (a complete, checked set of parameters), filling
    ``outcome`` step by step (so a trial stopped half-way still says what it wrote)."""
    outcome = TrialOutcome() if outcome is None else outcome
    start = time.perf_counter()
    try:
        for step in trial_steps():
            outcome.steps[step.name] = cache.run(
                step, {n: outcome.steps[n] for n in step.inputs}, values, ctx)
    finally:
        outcome.seconds = time.perf_counter() - start
    return outcome
