"""``triview tune``: a seeded Optuna study over a search space of pipeline parameters.

Trial 0 is the parameters as given (the spec's defaults, a ``--preset``, ``--param``);
TPE proposes the rest. Each trial runs the DAG up to the voter in this process
(:mod:`triview.tune.runner`) and is worth the chosen voter's validation figure
(:mod:`triview.tune.objective`); the branches report their per-epoch validation figures, so
a median pruner stops trials that trail the others. The study lives in ``OUT/study.db``
(Optuna's RDB storage on SQLite), so a stopped search resumes with ``resume=True``: an
interrupted trial runs again. At the end, and only then, the best trial is scored on the
test split, once. ``OUT`` holds:

- ``study.db``, ``study.json`` (the settings a resume must match);
- ``trials.csv``, ``report.html`` (optimisation history and parameter importances);
- ``best.yaml``: the best settings as a preset for ``triview run --preset``;
- ``best/evaluation``: the best trial's test evaluation, ``best_test.json`` its figures;
- ``cache/`` (stage outputs and frozen features the trials share), ``logs/trial-N.log``.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from triview import params as spec
from triview.storage import atomic_write_text
from triview.tune import results
from triview.tune.objective import Objective, get_objective
from triview.tune.runner import (BRANCHES, StageCache, TrialContext, TrialOutcome, data_identity,
                                 run_trial, searched_stages, trial_steps, trial_threads)
from triview.tune.space import SearchSpace, load_space

STUDY_NAME = "triview-tune"
STUDY_DB, SETTINGS, BEST_PRESET, BEST_TEST = "study.db", "study.json", "best.yaml", "best_test.json"
CACHE, LOGS, BEST_DIR = "cache", "logs", "best"
#: Steps of the pruner's intermediate values (each branch's best validation figure so far):
#: branch k reports head epoch e at k * BRANCH_STEP + e, the end of its head phase at
#: k * BRANCH_STEP + HEAD_DONE and fine-tuning epoch e at k * BRANCH_STEP + FINETUNE_STEP + e.
#: The pruner looks at the end of each head phase (trials with other head_epochs compared on
#: what their head reached, not on an early epoch of a slower schedule) and after every
#: fine-tuning epoch.
BRANCH_STEP, HEAD_DONE, FINETUNE_STEP = 100_000, 9_999, 10_000


class TuneError(ValueError):
    """The search cannot start as asked (the message says why); nothing was run."""


class TrialRefused(ValueError):
    """A proposed combination that the spec's rules refuse: the trial fails, the study goes on."""


@dataclass
class Study:
    """Where a study lives and what it searches; see :func:`prepare`."""
    out: Path
    data: str
    space: SearchSpace
    objective: Objective
    base: dict[str, Any]          # complete, checked values of trial 0
    seed: int

    @property
    def cache(self) -> StageCache:
        return StageCache(self.out / CACHE)

    @property
    def features(self) -> Path:
        return self.out / CACHE / "features"

    def context(self, on_epoch=None) -> TrialContext:
        return TrialContext(self.data, self._data_key, self.features, on_epoch)

    def settings(self) -> dict:
        defaults = spec.defaults()
        return {"study_name": STUDY_NAME, "storage": STUDY_DB, "data": self.data,
                "data_identity": self._data_key, "space": self.space.to_mapping(),
                "space_source": self.space.source, "objective": self.objective.name,
                "direction": self.objective.direction, "seed": self.seed,
                "base": {k: v for k, v in self.base.items() if v != defaults[k]}}

    def __post_init__(self) -> None:
        self._data_key = data_identity(self.data)


def prepare(data: str, out: str | Path, *, space: str | Path = "photos",
            objective: str = "val_macro_f1", seed: int = 0, base: dict | None = None,
            resume: bool = False) -> Study:
    """Check everything a search needs before anything runs: the data, the space against
    the spec, the base parameters, trial 0 inside the space, and ``out`` (a new study, or
    with ``resume`` the same study as before). Raises :class:`TuneError` or
    :class:`triview.params.ParamError` (a :class:`SpaceError` for the space)."""
    if not str(data).startswith("s3://"):
        if not Path(data).exists():
            raise TuneError(f"input {str(data)!r} does not exist")
        data = str(Path(data).resolve())
    try:
        obj = get_objective(objective)
    except ValueError as exc:
        raise TuneError(str(exc)) from None
    searched = load_space(space, searched_stages())
    checked = spec.validate(base or {}, complete=True)
    searched.check_point({n: checked[n] for n in searched.names}, "trial 0 (the parameters as "
                         "given) has")
    study = Study(Path(out).resolve(), data, searched, obj, checked, seed)
    settings_file = study.out / SETTINGS
    if settings_file.is_file() and not resume:
        raise TuneError(f"{study.out} already holds a study: add --resume to continue it, or "
                        "choose another --out")
    if resume:
        if not settings_file.is_file():
            raise TuneError(f"--resume: no study in {study.out} ({SETTINGS} is missing)")
        before = json.loads(settings_file.read_text())
        now = json.loads(json.dumps(study.settings(), default=str))
        changed = [k for k in ("data", "data_identity", "space", "objective", "seed", "base")
                   if before.get(k) != now[k]]
        if changed:
            raise TuneError(f"--resume: the study in {study.out} was started with other "
                            f"{', '.join(changed)}; resume it with the same settings, or start a "
                            "new study in another --out")
    return study


# ----------------------------------------------------------------------------- storage


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # the pruner's reports commit once per epoch: WAL without a sync per commit keeps that
    # cheap, and a killed process still loses nothing committed (a power cut could)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def open_study(study: Study):
    """The Optuna study in ``OUT/study.db`` (created if missing): TPE seeded with ``seed``,
    a median pruner."""
    import optuna
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(f"sqlite:///{study.out / STUDY_DB}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    event.listen(storage.engine, "connect", _sqlite_pragmas)
    storage.engine.dispose()  # the connection made while creating the tables lacks the pragmas
    sampler = optuna.samplers.TPESampler(seed=study.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5)
    return optuna.create_study(storage=storage, study_name=STUDY_NAME, sampler=sampler,
                               pruner=pruner, direction=study.objective.direction,
                               load_if_exists=True)


def _requeue_interrupted(optuna_study) -> list[int]:
    """Trials a stop cut short (still RUNNING in the storage, or FAIL marked interrupted)
    are closed and queued again with their parameters; returns their numbers."""
    from optuna.trial import TrialState

    rerun = {t.user_attrs.get("rerun_of") for t in optuna_study.get_trials(deepcopy=False)}
    queued = []
    for t in optuna_study.get_trials(deepcopy=False):
        cut = t.state == TrialState.RUNNING or (t.state == TrialState.FAIL
                                                and t.user_attrs.get("interrupted"))
        if not cut or t.number in rerun:
            continue
        if t.state == TrialState.RUNNING:
            optuna_study.tell(t.number, state=TrialState.FAIL)
        optuna_study.enqueue_trial(t.params, user_attrs={**_carried(t.user_attrs),
                                                         "rerun_of": t.number})
        queued.append(t.number)
    return queued


def _carried(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k == "defaults"}


def finished_count(optuna_study) -> int:
    """Trials that count towards ``--trials``: complete, pruned or refused (not those a stop
    cut short)."""
    from optuna.trial import TrialState

    return sum(1 for t in optuna_study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.user_attrs.get("refused")))


# ----------------------------------------------------------------------------- trials


@contextlib.contextmanager
def _trial_log(path: Path):
    """The stages' own output (one block per branch, warnings) goes to the trial's log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh), \
            warnings.catch_warnings():
        warnings.simplefilter("default")
        yield


def _pruning_report(trial, objective: Objective, head_epochs: int):
    """The per-epoch callback of a trial's branches: report each branch's best figure so
    far to the pruner, and stop the trial when the pruner says so."""
    import optuna

    best: dict[int, float] = {}

    def on_epoch(branch: int, row: dict) -> None:
        figure = float(row[objective.epoch_column])
        if branch not in best or objective.better(figure, best[branch]):
            best[branch] = figure
        head = row.get("phase") == "head"
        epoch = int(row["head_epoch"] if head else row["epoch"])
        step = branch * BRANCH_STEP + (0 if head else FINETUNE_STEP) + epoch
        trial.report(best[branch], step)
        if head and epoch == head_epochs:
            trial.report(best[branch], branch * BRANCH_STEP + HEAD_DONE)
        if (not head or epoch == head_epochs) and trial.should_prune():
            where = f"branch {branch + 1}, " + ("its head phase" if head else f"epoch {epoch}")
            trial.set_user_attr("pruned_at", where)
            raise optuna.TrialPruned(f"{where}: {best[branch]:.4f}")
    return on_epoch


def _objective_fn(study: Study):
    def objective(trial) -> float:
        values = {**study.base, **study.space.suggest(trial)}
        try:
            values = spec.validate(values, complete=True)
        except spec.ParamError as exc:
            trial.set_user_attr("refused", str(exc))
            raise TrialRefused(str(exc)) from None
        outcome = TrialOutcome()
        try:
            with _trial_log(study.out / LOGS / f"trial-{trial.number}.log"):
                run_trial(values, study.cache, study.context(
                    _pruning_report(trial, study.objective, values["head_epochs"])), outcome)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        finally:  # a pruned trial's finished steps too: _keep_best_only needs their keys
            trial.set_user_attr("seconds", round(outcome.seconds, 2))
            trial.set_user_attr("steps", outcome.keys)
            trial.set_user_attr("reused", outcome.reused)
        return study.objective.value(outcome.folder("train-voter"))
    return objective


def _keep_best_only(study: Study, optuna_study, finished) -> None:
    """Outputs of ``keep="best"`` steps survive only while their trial is the best one."""
    from optuna.trial import TrialState

    try:
        best = optuna_study.best_trial
    except ValueError:  # no complete trial yet
        best = None
    keep = (best.user_attrs.get("steps", {}) if best else {})
    for step in trial_steps():
        if step.keep != "best":
            continue
        key = finished.user_attrs.get("steps", {}).get(step.name)
        if key and keep.get(step.name) != key:
            study.cache.discard(step.name, key)
    if best is not None and best.number == finished.number:
        for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number == best.number:
                continue
            for step in trial_steps():
                key = t.user_attrs.get("steps", {}).get(step.name)
                if step.keep == "best" and key and keep.get(step.name) != key:
                    study.cache.discard(step.name, key)


# ----------------------------------------------------------------------------- console


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_line(study: Study, optuna_study, trial) -> str:
    """One console line per finished trial: number, outcome, best so far, time, and the
    parameters that differ from trial 0's."""
    from optuna.trial import TrialState

    changed = [f"{k}={_number(v)}" for k, v in trial.params.items() if v != study.base.get(k)]
    what = " ".join(changed) or "(the parameters as given)"
    seconds = trial.user_attrs.get("seconds")
    took = f"{seconds:6.1f} s" if seconds is not None else "       "
    if trial.state == TrialState.COMPLETE:
        outcome = f"{study.objective.name} {trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        outcome = f"pruned at {trial.user_attrs.get('pruned_at', '?')}"
    elif trial.user_attrs.get("refused"):
        outcome = f"refused: {trial.user_attrs['refused']}"
    else:
        outcome = "failed"
    try:
        best = optuna_study.best_trial
        so_far = f"best {best.value:.4f} (trial {best.number})"
    except ValueError:
        so_far = "best -"
    return f"trial {trial.number:3d}  {outcome:<36}  {so_far}  {took}  {what}"


# ----------------------------------------------------------------------------- the search


def run(study: Study, *, trials: int = 30, timeout: float | None = None, resume: bool = False,
        threads: int = 0, say: Callable[[str], None] | None = None) -> dict:
    """Run the search until the study holds ``trials`` finished trials (or ``timeout``
    seconds pass), then write the results and score the best trial on test, once.
    ``threads``: for computing frozen features (:func:`trial_threads`)."""
    import optuna

    say = say or (lambda line, _out=sys.stdout: print(line, file=_out, flush=True))
    study.out.mkdir(parents=True, exist_ok=True)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the console has one line per trial
    try:
        with trial_threads(study.features, threads):
            return _search(study, trials, timeout, resume, say)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _search(study: Study, trials: int, timeout: float | None, resume: bool,
            say: Callable[[str], None]) -> dict:
    from optuna.trial import TrialState

    study.cache.sweep(everyone=True)  # what an earlier, stopped run of this study left
    optuna_study = open_study(study)
    if not optuna_study.trials:  # trial 0: the parameters as given
        optuna_study.enqueue_trial({n: study.base[n] for n in study.space.names},
                                   user_attrs={"defaults": True})
    if not resume:
        atomic_write_text(study.out / SETTINGS, json.dumps(study.settings(), indent=2, default=str))
    for number in _requeue_interrupted(optuna_study):
        say(f"trial {number} was interrupted: it runs again")
    todo = max(0, trials - finished_count(optuna_study))
    say(f"triview tune: {len(study.space.names)} parameters from {study.space.source}, objective "
        f"{study.objective.name} ({study.objective.direction}, held out, never test), TPE seed {study.seed}, "
        f"median pruner; {finished_count(optuna_study)} trials done, {todo} to run -> {study.out}")

    def progress(s, trial) -> None:
        if trial.state == TrialState.PRUNED:
            study.cache.sweep()  # the step the pruner stopped
        _keep_best_only(study, s, trial)
        say(trial_line(study, s, trial))

    start = time.perf_counter()
    try:
        if todo:
            optuna_study.optimize(_objective_fn(study), n_trials=todo, timeout=timeout,
                                  catch=(TrialRefused,), callbacks=[progress])
    finally:  # a stopped search still leaves its table and report
        results.write_results(study, optuna_study)
    summary = finish(study, optuna_study, say)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


def finish(study: Study, optuna_study, say: Callable[[str], None]) -> dict:
    """Write the best settings as a preset and score the best trial on the test split."""
    defaults_trial = next((t for t in optuna_study.trials
                           if t.user_attrs.get("defaults") and t.value is not None), None)
    try:
        best = optuna_study.best_trial
    except ValueError:
        raise TuneError("no trial completed: see the logs in "
                        f"{study.out / LOGS}") from None
    values = {**study.base, **best.params}
    preset = results.write_best_preset(study, best, values, study.out / BEST_PRESET)
    test = score_on_test(study, best, values)
    results.write_results(study, optuna_study, test)
    summary = {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
               "defaults_value": None if defaults_trial is None else defaults_trial.value,
               "preset": str(preset), "test": test, "trials": len(optuna_study.trials),
               "report": str(study.out / results.REPORT)}
    versus = ""
    if defaults_trial is not None:
        versus = f" (trial 0, the parameters as given: {defaults_trial.value:.4f})"
    say(f"best: trial {best.number}, {study.objective.name} {best.value:.4f}{versus} -> {preset}")
    ens = test["ensemble"]
    say(f"test (scored once, for trial {best.number}): ensemble accuracy {ens['accuracy']:.4f} "
        f"macro-F1 {ens['macro_f1']:.4f}; views " + ", ".join(
            f"{v} {m['accuracy']:.4f}" for v, m in test["views"].items()))
    say(f"report: {study.out / results.REPORT}  trials: {study.out / results.TRIALS_CSV}")
    return summary


def score_on_test(study: Study, best, values: dict) -> dict:
    """The best trial's branches and voter (recomputed from the cache if they are gone)
    scored on the test split by the evaluate stage; written to ``best_test.json``."""
    from triview.stages import evaluate_stage

    done = study.out / BEST_TEST
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("trial") == best.number and previous.get("params") == best.params:
            return previous  # this trial was scored already: a test split is scored once
    with _trial_log(study.out / LOGS / "best-test.log"):
        outcome = run_trial(values, study.cache, study.context())
        out = study.out / BEST_DIR / "evaluation"
        record = evaluate_stage([outcome.folder(b) for b in BRANCHES],
                                outcome.folder("train-voter"), out,
                                views_dir=outcome.folder("calibrate-and-crop"),
                                **{**spec.pick("evaluate", values), "registry": ""})
    test = {"trial": best.number, "params": best.params, "ensemble": record["ensemble"],
            "views": record["views"], "n_test": record["n_test"], "evaluation": str(out),
            "report": str(out / "report.html")}
    atomic_write_text(done, json.dumps(test, indent=2, default=str))
    return test
