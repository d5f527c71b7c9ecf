"""The console of a local run (``triview run``, ``make run``).

By default a run shows one line per task as it starts and as it ends (its duration
and the counts of its ``stage.json``), a live tqdm bar while it works (on a terminal),
and warnings; each task's full output goes to ``<out>/logs/<task>.log``. ``verbose``
streams everything as kfp.local prints it. A failed run raises :class:`TaskFailed`:
the task, the error message its traceback ends with, and its log file.

Where kfp.local (2.17) reports a run, and where this module listens (nothing in kfp
is patched):

- its own records ("Executing task 'x'", "Task 'x' finished with status ...", the
  task's outputs) are logged on the root logger through a stdout handler that it
  swaps in around each task (``logging_utils.local_logger_context``). A filter on the
  root logger, which that swap leaves alone, sees every record first.
- SubprocessRunner reads the task process's stdout and stderr line by line and
  ``print()`` s each line, indented by four spaces, to ``sys.stdout``
  (``subprocess_task_handler.run_local_subprocess``). While the run lasts,
  ``sys.stdout`` is the :class:`RunConsole`, which files each line in the task's log.

Lines that start with :data:`triview.progress.MARK` are progress events that the task
emits (ingest over files, training over batches) because the console sets
``TRIVIEW_PROGRESS``; they drive the bar and are not logged.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from triview import progress

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"^Executing task '(?P<task>[^']+)'")
_FINISHED = re.compile(r"^Task '(?P<task>[^']+)' finished with status (?P<status>\w+)")
_OUTPUT_FILE = re.compile(r'"outputFile": "(?P<path>[^"]+)"')
_PY_WARNING = re.compile(r"^(?:\S.*?:\d+: )?(?P<kind>[A-Z]\w*Warning): (?P<text>.+)$")
_EXECUTOR_WARNING = re.compile(r"^\[KFP Executor [^\]]* WARNING\]: (?P<text>.+)$")
_TRACEBACK = "Traceback (most recent call last):"
# Expected locally: the cluster settings (resources, display names) do nothing here.
_KFP_NOOP_WARNING = r"Task '.*': settings \[.*\] have no effect in the current local runner"
_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]{postfix}"
_WAITING = "{desc}: {elapsed}"
_NAME_WIDTH = 22


class TaskFailed(RuntimeError):
    """A task of a local run failed: which one, why (the last line(s) of its
    traceback), and the log file that holds its whole output."""

    def __init__(self, task: str, message: str, log_path: Path) -> None:
        super().__init__(f"task {task!r} failed: {message}")
        self.task, self.message, self.log_path = task, message, Path(log_path)

    def report(self) -> str:
        """The block a failed run ends with."""
        lines = ["", f"triview run FAILED in task {self.task!r}:"]
        lines += [f"  {line}" for line in self.message.splitlines()]
        lines += [f"  full log: {self.log_path}",
                  "  (--verbose streams every task's output, tracebacks included)"]
        return "\n".join(lines)


@dataclass
class _Task:
    name: str
    log: TextIO
    log_path: Path
    started: float
    tail: deque = field(default_factory=lambda: deque(maxlen=400))
    task_dir: Path | None = None
    warned: set = field(default_factory=set)


class RunConsole(io.TextIOBase):
    """``with RunConsole(out / "logs"): run the pipeline`` (see the module docstring)."""

    def __init__(self, log_dir: str | Path, verbose: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None, bars: bool | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.verbose = verbose
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.bars = (not verbose and _isatty(self.err)) if bars is None else bars
        self.failed: _Task | None = None
        self._task: _Task | None = None
        self._buffer = ""
        self._bar = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._runs: dict[str, int] = {}   # a task of a ParallelFor runs once per iteration

    # ------------------------------------------------------------------- context

    def __enter__(self) -> "RunConsole":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._pipeline_log = open(self.log_dir / "pipeline.log", "w", encoding="utf-8",
                                  buffering=1)
        self._saved_stdout, self._saved_env = sys.stdout, os.environ.get(progress.ENV)
        if not self.verbose:
            os.environ[progress.ENV] = "1"   # inherited by the task processes
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=_KFP_NOOP_WARNING)
        logging.getLogger().addFilter(self._on_record)
        sys.stdout = self
        if not self.verbose:
            self._echo(f"triview run: the DAG's tasks run one by one (kfp.local); each task's "
                       f"full log goes to {self.log_dir}/")
        if self.bars:
            self._heartbeat = threading.Thread(target=self._beat, daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        with self._lock:
            if self._buffer:
                self._line(self._buffer)
                self._buffer = ""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        self._close_bar()
        sys.stdout = self._saved_stdout
        logging.getLogger().removeFilter(self._on_record)
        self._warnings.__exit__(None, None, None)
        if self._saved_env is None:
            os.environ.pop(progress.ENV, None)
        else:
            os.environ[progress.ENV] = self._saved_env
        self._close_task()
        self._pipeline_log.close()
        if isinstance(exc, RuntimeError) and not isinstance(exc, TaskFailed) and self.failed:
            raise TaskFailed(self.failed.name, error_message(self.failed.tail),
                             self.failed.log_path) from exc
        return False

    # ------------------------------------------------------------------- stream

    @property
    def encoding(self) -> str:
        return getattr(self.out, "encoding", None) or "utf-8"

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                self._line(line)
        return len(text)

    def flush(self) -> None:
        if self.verbose:
            self.out.flush()

    def _line(self, line: str) -> None:
        if self.verbose:
            self.out.write(line + "\n")
        task = self._task
        if task is None:
            self._pipeline_log.write(line + "\n")
            return
        try:
            text = line[4:] if line.startswith("    ") else line   # kfp indents the task's lines
            event = progress.parse(text)
            if event is not None:
                self._progress(event)
                return
            task.log.write(text + "\n")
            task.tail.append(text)
            found = _OUTPUT_FILE.search(text)
            if found and task.task_dir is None:
                task.task_dir = Path(found["path"]).parent
            self._maybe_warn(task, text)
        except Exception as exc:  # the console must never break the run it shows
            self._pipeline_log.write(f"console: {exc!r} on {line!r}\n")

    def _on_record(self, record: logging.LogRecord) -> bool:
        """Root-logger filter: kfp.local's records drive the task lines; they reach
        kfp's own stdout handler only in verbose mode."""
        with self._lock:
            try:
                message = _ANSI.sub("", record.getMessage())
                started = _EXECUTING.match(message)
                if started:
                    self._start(started["task"])
                if not self.verbose:   # verbose: kfp's own handler writes it, through _line
                    log = self._task.log if self._task else self._pipeline_log
                    log.write(f"{record.levelname} {message}\n")
                finished = _FINISHED.match(message)
                if finished and self._task is not None:
                    self._finish(finished["status"])
                elif record.levelno >= logging.WARNING and not self.verbose:
                    self._echo(f"  warning  kfp: {message.splitlines()[0]}")
            except Exception as exc:  # the console must never break the run it shows
                self._pipeline_log.write(f"console: {exc!r}\n")
        return self.verbose

    # ------------------------------------------------------------------- tasks

    def _start(self, name: str) -> None:
        self._close_task()
        self._runs[name] = self._runs.get(name, 0) + 1
        path = self.log_dir / (f"{name}.log" if self._runs[name] == 1 else
                               f"{name}.{self._runs[name]}.log")
        self._task = _Task(name, open(path, "w", encoding="utf-8", buffering=1), path,
                           time.monotonic())   # line-buffered: tail -f shows the task live
        self._echo(f"  started  {name}")
        if self.bars:
            from tqdm import tqdm

            self._bar = tqdm(total=None, desc=f"  {name}", file=self.err, leave=False,
                             bar_format=_WAITING, dynamic_ncols=True)

    def _finish(self, status: str) -> None:
        task = self._task
        seconds = time.monotonic() - task.started
        self._close_bar()
        if status == "SUCCESS":
            record = stage_record(task.task_dir)
            self._echo(f"  done     {task.name:<{_NAME_WIDTH}} {_duration(seconds):>10}  "
                       f"{_describe(record)}".rstrip())
            for warning in stage_warnings(record or {}):
                self._echo(f"  warning  {task.name}: {warning}")
        else:
            self.failed = task
            first = error_message(task.tail).splitlines()[0]
            self._echo(f"  FAILED   {task.name:<{_NAME_WIDTH}} {_duration(seconds):>10}  {first}")

    def _close_task(self) -> None:
        if self._task is not None:
            self._task.log.close()
            self._task = None

    def _maybe_warn(self, task: _Task, text: str) -> None:
        found = _PY_WARNING.match(text) or _EXECUTOR_WARNING.match(text)
        if found is None:
            return
        kind = found.groupdict().get("kind")
        message = f"{kind}: {found['text']}" if kind else found["text"]
        if message not in task.warned:
            task.warned.add(message)
            self._echo(f"  warning  {task.name}: {message}")

    # ------------------------------------------------------------------- output

    def _echo(self, line: str) -> None:
        """A console line (none in verbose mode: kfp's own stream is the console)."""
        if self.verbose:
            return
        if self._bar is not None:
            self._bar.clear()
        self.out.write(line + "\n")
        self.out.flush()
        if self._bar is not None:
            self._bar.refresh()

    def _progress(self, event: dict) -> None:
        bar = self._bar
        if bar is None:
            return
        total = int(event.get("total") or 0)
        if total and bar.total != total:
            bar.reset(total=total)
            bar.bar_format = _BAR
        bar.unit = str(event.get("unit") or "it")
        if event.get("desc"):
            bar.set_description_str(f"  {self._task.name} ({event['desc']})", refresh=False)
        bar.n = int(event.get("n") or 0)
        bar.set_postfix(event.get("fields") or {}, refresh=False)
        bar.refresh()

    def _close_bar(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _beat(self) -> None:
        """Keep the elapsed time moving while a task prints nothing."""
        while not self._stop.wait(1.0):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()


def error_message(lines) -> str:
    """What a failed task's output ends with: the exception line(s) of its last
    traceback, without the module path of the exception class."""
    lines = list(lines)
    starts = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK]
    if not starts:
        last = [line.strip() for line in lines if line.strip()]
        return (f"the task exited without a Python traceback; its last output: {last[-1]}"
                if last else "the task exited without any output")
    exception: list[str] = []
    for line in lines[starts[-1] + 1:]:
        if not exception:
            if line and not line.startswith(" "):   # frames are indented, the exception is not
                exception.append(line)
        elif not line.strip() or line.startswith("[KFP Executor"):
            break
        else:
            exception.append(line)
    text = "\n".join(exception[:12]) or lines[-1]
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )", "", text)


def stage_record(task_dir: Path | None) -> dict | None:
    """The ``stage.json`` a task wrote (None when there is none)."""
    if task_dir is None:
        return None
    for path in sorted(Path(task_dir).glob("*/stage.json")):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def stage_summary(task_dir: Path | None) -> str:
    """The key counts of the ``stage.json`` a task wrote ("" when there is none)."""
    return _describe(stage_record(task_dir))


def _describe(record: dict | None) -> str:
    try:
        return describe_stage(record) if record else ""
    except (KeyError, TypeError, ValueError):
        return ""


#: Fewer images than this in the validation or test split: the console warns.
SMALL_SPLIT = 30


def stage_warnings(rec: dict) -> list[str]:
    """What a newcomer should know about a finished stage: a validation or test split too
    small to trust, a test figure whose 95 % interval is too wide."""
    stage = str(rec.get("stage", ""))
    out = []
    if stage == "ingest":
        counts = rec.get("counts") or {}
        for split, chooses in (("val", "the best epoch and the voter are chosen on"),
                               ("test", "every test figure rests on")):
            n = counts.get(split)
            if n is not None and n < SMALL_SPLIT:
                out.append(f"only {n} {split} images ({chooses} them): too few to trust; add "
                           f"photos or raise --param {'val' if split == 'val' else 'test'}_fraction")
    if stage.startswith("evaluate"):
        ci = rec.get("accuracy_interval") or {}
        if ci and not ci.get("trusted", True):
            out.append(f"{ci['n']} test images: test accuracy lies anywhere in {ci['low']:.2f} to "
                       f"{ci['high']:.2f} (95 % interval); too few to trust")
    return out


def describe_stage(rec: dict) -> str:
    """One line of what a stage did, from its record."""
    stage = str(rec.get("stage", ""))
    if stage == "ingest":
        c = rec["counts"]
        return (f"{c['input']} files: {c['train']} train / {c['val']} val / {c['test']} test, "
                f"{c['quarantined']} quarantined")
    if stage == "calibrate-and-crop":
        text = f"{rec['items_in']} images -> {rec['items_out']} crops, {rec['lens']} lens"
        calibration = rec.get("calibration")
        if calibration:
            text += (f" (rms {calibration['rms']:.3f} px from {calibration['used']} photos, "
                     f"{len(calibration.get('rejected') or {})} rejected)")
        return text
    if stage == "balance":
        return f"imbalance ratio {rec['imbalance_ratio']:.2f}"
    if stage == "augment":
        return f"{rec['items_out']} crops ({rec['mode']}, copies={rec['copies']})"
    seed = re.search(r"-seed-(\d+)$", stage)
    repeat = f"seed {seed[1]}: " if seed else ""
    if stage.startswith("train-branch"):
        return f"{repeat}{rec['view']}: " + _best_epoch_words(rec) + (
            ", stopped early" if rec.get("stopped_early") else "")
    if stage.startswith("train-voter"):
        on = (f"macro-F1 {rec['val_macro_f1']:.4f} on {rec['n_scored']} held-out images "
              f"({rec['voter_inputs']})" if rec.get("n_scored") else f"val macro-F1 {rec['val_macro_f1']:.4f}")
        return f"{repeat}voter {rec['method']}, {on}"
    if stage.startswith("evaluate"):
        ensemble = rec["ensemble"]
        ci = rec.get("accuracy_interval")
        interval = (f" (95 % interval {ci['low']:.2f} to {ci['high']:.2f} on {ci['n']} images)"
                    if ci else "")
        comparison = (rec.get("gate") or {}).get("comparison")
        verdict = ("no registry: no champion to compare with" if comparison == "no_registry"
                   else "blessed" if rec.get("blessed") else "not blessed")
        if comparison == "first_run":
            verdict += " (no champion yet: the first model)"
        text = (f"{repeat}ensemble test accuracy {ensemble['accuracy']:.4f}{interval}, macro-F1 "
                f"{ensemble['macro_f1']:.4f}; {verdict}")
        if "gate_clean_images" in rec:
            text += (f" (vs champion v{(rec.get('gate') or {}).get('champion_version')} on "
                     f"{rec['gate_clean_images']} clean test images, "
                     f"{rec['gate_excluded_images']} excluded)")
        if rec.get("drift_embedding_auc") is not None:
            text += f"; drift AUC {rec['drift_embedding_auc']:.2f} on {rec['drift_new_images']} new images"
        if rec.get("versus_best_view"):
            text += f"; {rec['versus_best_view']['statement']}"
        return text
    if stage == "export":
        if "registry" in rec and not rec["registry"]:
            where = "no registry: nothing promoted"
        else:
            where = (f"{'blessed' if rec.get('blessed') else 'not blessed'}, "
                     f"{'promoted' if rec.get('promoted') else 'not promoted'} in the registry")
        return f"{where}; ONNX parity {rec['onnx_max_abs_diff']:.1e}"
    if stage == "repeats":
        return f"mean ± SD over seeds {rec['repeats'].get('seeds')}"
    if "items_out" in rec:
        return f"{rec.get('items_in', '?')} in, {rec['items_out']} out"
    return ""


def _best_epoch_words(rec: dict) -> str:
    """The best epoch, with the head phase said in words: epoch 0 is the head fitted on
    cached features of the frozen backbone (cross-fitted over ``head_folds`` folds, or
    trained for ``head_epochs``), fine-tuning counts from 1."""
    head, folds = int(rec.get("head_epochs") or 0), int(rec.get("head_folds") or 0)
    best, f1 = int(rec["best_epoch"]), rec["val_macro_f1"]
    scored = "out-of-fold" if str(rec.get("scored_on", "")).startswith("out-of-fold") else "val"
    if not head and not folds:
        return f"best epoch {best} of {rec['epochs_run']}, val macro-F1 {f1:.4f}"
    phase = (f"the new head cross-fitted over {folds} folds" if folds
             else f"{head} epochs of the new head")
    tuned = int(rec["epochs_run"]) - 1
    if best == 0:
        kept = (f"; {tuned} fine-tuning epoch{'s' if tuned != 1 else ''} did not beat it"
                if tuned else "")
        return (f"kept the head phase (epoch 0: {phase} on cached features of the frozen "
                f"backbone{kept}), {scored} macro-F1 {f1:.4f}")
    return (f"best fine-tuning epoch {best} of {tuned} (epoch 0 = the head phase on cached "
            f"features), val macro-F1 {f1:.4f}")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
