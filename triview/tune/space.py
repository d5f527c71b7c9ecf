"""The search space of ``triview tune``: a YAML file over the pipeline's own parameters
(:mod:`triview.params`), checked against the spec before anything runs.

The file is one mapping, a parameter name to either a range or a list of choices::

    head_lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float, sampled on a log scale
    head_epochs: {low: 20, high: 200, step: 20}         # int on a grid
    hidden: {choices: [0, 128, 512]}                    # any type; str and bool need choices

Every value must be one the parameter allows (its type, range and choices in the spec);
``low < high``; ``log`` needs ``low > 0`` and no ``step``. Parameters the trials do not
read (evaluate, export, deploy, the DAG's own) and those that change which images are
validated on (ingest) cannot be searched: trials would not measure them, or would be scored
on different images. One :class:`SearchSpace` serves both the local search (its Optuna
suggestions) and the cluster's OptimizationJob (its ``parameters``).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triview import params as spec

#: Search spaces shipped with triview (``--space NAME``).
SPACES_DIR = Path(__file__).with_name("spaces")
KEYS = {"low", "high", "log", "step", "choices"}


class SpaceError(spec.ParamError):
    """The search space file is not usable; the message names every problem."""


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: a range (``low``..``high``, optionally ``log`` or on a
    ``step`` grid) or a set of ``choices``, typed as the spec types the parameter."""
    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    @property
    def param(self) -> spec.Param:
        return spec.PARAMS[self.name]

    @property
    def categorical(self) -> bool:
        return bool(self.choices)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this dimension (on its grid, for a step)."""
        if self.categorical:
            return value in self.choices
        if not self.low <= value <= self.high:
            return False
        if self.step:
            k = (value - self.low) / self.step
            return math.isclose(k, round(k), abs_tol=1e-9)
        return True

    def describe(self) -> str:
        if self.categorical:
            return "one of " + ", ".join(map(str, self.choices))
        text = f"{self.low}..{self.high}"
        return text + (" (log)" if self.log else "") + (f" step {self.step}" if self.step else "")

    def to_mapping(self) -> dict:
        """The entry as the space file writes it."""
        if self.categorical:
            return {"choices": list(self.choices)}
        out = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    source: str = ""

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def __getitem__(self, name: str) -> Dimension:
        return next(d for d in self.dimensions if d.name == name)

    def to_mapping(self) -> dict:
        return {d.name: d.to_mapping() for d in self.dimensions}

    def suggest(self, trial) -> dict[str, Any]:
        """One value per dimension from an Optuna trial, typed as the spec types it."""
        values = {}
        for d in self.dimensions:
            if d.categorical:
                value = trial.suggest_categorical(d.name, list(d.choices))
            elif d.param.type is int:
                value = trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1),
                                          log=d.log)
            else:
                value = trial.suggest_float(d.name, float(d.low), float(d.high), step=d.step,
                                            log=d.log)
            values[d.name] = d.param.coerce(value)
        return values

    def check_point(self, values: dict[str, Any], what: str) -> None:
        """Refuse ``values`` (name -> typed value) that are not a point of this space."""
        problems = [f"{what} {name}={value!r} is not in the space ({self[name].describe()})"
                    for name, value in values.items()
                    if name in self.names and not self[name].contains(value)]
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            problems.append(f"{what} names parameters outside the space: {', '.join(unknown)}")
        if problems:
            raise SpaceError("; ".join(problems))


def space_names() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str | Path, searched_stages: tuple[str, ...]) -> SearchSpace:
    """The search space of a file, or of a shipped space by name (``photos``), checked
    against the spec; ``searched_stages``: the stages a trial runs."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        path = SPACES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SpaceError(f"no search space {str(name_or_path)!r}: not a file, and not one of "
                         f"{space_names()}")
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"search space {path} is not valid YAML: {exc}") from None
    return parse_space(mapping, searched_stages, source=str(path))


def parse_space(mapping: Any, searched_stages: tuple[str, ...], source: str = "") -> SearchSpace:
    """A :class:`SearchSpace` from the file's mapping; every problem is reported at once."""
    where = f"search space {source}" if source else "search space"
    if not isinstance(mapping, dict) or not mapping:
        raise SpaceError(f"{where} must be a non-empty mapping of parameter: {{low, high}} or "
                         "{choices}")
    problems, dims = [], []
    for name, entry in mapping.items():
        try:
            dims.append(_dimension(str(name), entry, searched_stages))
        except SpaceError as exc:
            problems.append(str(exc))
    if problems:
        raise SpaceError(f"{where}: " + "; ".join(problems))
    return SearchSpace(tuple(dims), source)


def _dimension(name: str, entry: Any, searched_stages: tuple[str, ...]) -> Dimension:
    param = spec.PARAMS.get(name)
    if param is None:
        close = difflib.get_close_matches(name, list(spec.PARAMS), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else " (`triview params` lists them)"
        raise SpaceError(f"unknown parameter {name!r}{hint}")
    if "ingest" in param.stages:
        raise SpaceError(f"{name!r} changes which images are validated on (ingest): trials "
                         "would be scored on different images; fix it with --param instead")
    if not set(param.stages) & set(searched_stages):
        raise SpaceError(f"{name!r} is read only by {', '.join(param.stages)}, which trials do "
                         "not run: searching it would change nothing they measure")
    if not isinstance(entry, dict):
        raise SpaceError(f"{name!r}: expected {{low, high}} or {{choices: [...]}}, got {entry!r}")
    extra = set(entry) - KEYS
    if extra:
        raise SpaceError(f"{name!r}: unknown keys {sorted(extra)} (allowed: {sorted(KEYS)})")
    if "choices" in entry:
        if set(entry) - {"choices"}:
            raise SpaceError(f"{name!r}: give either choices or low/high, not both")
        return _choices(name, param, entry["choices"])
    return _range(name, param, entry)


def _checked(param: spec.Param, value: Any, what: str) -> Any:
    if isinstance(value, (dict, list)) or value is None:
        raise SpaceError(f"{param.name!r}: {what} must be a single value, got {value!r}")
    try:
        return param.validate(value)
    except spec.ParamError as exc:
        raise SpaceError(f"{what}: {exc}") from None


def _choices(name: str, param: spec.Param, choices: Any) -> Dimension:
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{name!r}: choices must be a non-empty list, got {choices!r}")
    typed = [_checked(param, c, "a choice") for c in choices]
    if len(set(typed)) != len(typed):
        raise SpaceError(f"{name!r}: repeated choices {choices!r}")
    if len(typed) < 2:
        raise SpaceError(f"{name!r}: one choice is not a search; fix it with --param {name}={typed[0]}")
    return Dimension(name, choices=tuple(typed))


def _range(name: str, param: spec.Param, entry: dict) -> Dimension:
    if param.type not in (int, float):
        raise SpaceError(f"{name!r} is a {param.type.__name__}: list its choices "
                         f"({{choices: [...]}}) instead of a range")
    missing = [k for k in ("low", "high") if k not in entry]
    if missing:
        raise SpaceError(f"{name!r}: a range needs low and high (missing {', '.join(missing)})")
    low = _checked(param, entry["low"], "low")
    high = _checked(param, entry["high"], "high")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{name!r}: log must be true or false, got {log!r}")
    if low >= high:
        raise SpaceError(f"{name!r}: low {low} must be below high {high}"
                         + (f" (to fix a value use --param {name}={low})" if low == high else ""))
    if log and low <= 0:
        raise SpaceError(f"{name!r}: a log scale needs low > 0, got {low}")
    step = entry.get("step")
    if step is not None:
        if log:
            raise SpaceError(f"{name!r}: step and log cannot be combined")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 \
                or (param.type is int and not float(step).is_integer()):
            raise SpaceError(f"{name!r}: step must be a positive {param.type.__name__}, got {step!r}")
        step = param.type(step)
        if not math.isclose((high - low) / step, round((high - low) / step), abs_tol=1e-9):
            raise SpaceError(f"{name!r}: high - low ({high - low}) is not a multiple of step {step}")
    return Dimension(name, low=low, high=high, log=log, step=step)
