"""Progress events from inside a DAG task, for the console of a local run.

A task's output goes to its log file, so the console of ``triview run``
(:mod:`pipelines.console`) draws the live bar itself, from these events: one line
``##triview-progress {json}`` on stdout, at most every ``min_interval`` seconds and
once at the end, and only when ``TRIVIEW_PROGRESS`` is set (the local console sets
it for its tasks). On a cluster nothing is written.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

MARK = "##triview-progress "
ENV = "TRIVIEW_PROGRESS"

T = TypeVar("T")


class Reporter:
    """Counts ``unit`` s of work towards ``total`` and emits events about it.

    ``fields`` (and :meth:`note`) are shown beside the bar, e.g. the epoch, the last
    loss and validation metric. A disabled reporter costs one attribute check.
    """

    def __init__(self, unit: str, total: int, desc: str = "", enabled: bool = True,
                 min_interval: float = 0.5, **fields) -> None:
        self.enabled = enabled and bool(os.environ.get(ENV))
        self.unit, self.total, self.desc = unit, int(total), desc
        self.fields = dict(fields)
        self.n = 0
        self.min_interval = min_interval
        self._last = 0.0

    def advance(self, k: int = 1) -> None:
        if not self.enabled:
            return
        self.n += k
        now = time.monotonic()
        if now - self._last >= self.min_interval or self.n >= self.total:
            self._last = now
            self._emit()

    def note(self, **fields) -> None:
        """Update the fields shown beside the bar (emitted at once)."""
        if not self.enabled:
            return
        self.fields.update(fields)
        self._emit()

    def track(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable``, counting one unit per item."""
        for item in iterable:
            yield item
            self.advance()

    def _emit(self) -> None:
        event = {"unit": self.unit, "n": self.n, "total": self.total, "desc": self.desc,
                 "fields": self.fields}
        sys.stdout.write(MARK + json.dumps(event, default=str) + "\n")
        sys.stdout.flush()


def parse(line: str) -> dict | None:
    """The event of a progress line, or None for any other line."""
    if not line.startswith(MARK):
        return None
    try:
        event = json.loads(line[len(MARK):])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
