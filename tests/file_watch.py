"""Which files a command touches, seen from the kernel: the command runs under
``strace -f`` (every process and thread it starts, C libraries included), tracing
every system call that takes a file name (open, stat, lstat, statx, access,
readlink, execve, ...), with ``-y`` so that a call relative to an open folder shows
that folder's path. Test modules import what they use from here.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?(\w+)")


def traced(argv: list[str], log: Path, **run_kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` under strace, writing every file-name system call to ``log``."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (.ci/run installs it)")
    return subprocess.run([strace, "-f", "-qq", "-y", "-s", "4096", "-e", "trace=%file",
                           "-o", str(log), *argv], capture_output=True, text=True, **run_kwargs)


def touching(log: Path, *needles: str) -> list[str]:
    """The traced calls whose file names (or the folders/files of their descriptors)
    contain one of ``needles``. What a call only *returns* as data is not a touch: the
    target text readlink reads out of a link, the argument list execve passes on."""
    hits = []
    for line in log.read_text(errors="replace").splitlines():
        call = _CALL.match(line)
        name = call.group(1) if call else ""
        text = line
        if name.startswith("readlink"):
            strings = _QUOTED.findall(line)
            if len(strings) > 1:
                text = line.replace(strings[-1], '""')
        elif name.startswith("execve"):
            text = line.split(", [", 1)[0]
        if any(n in text for n in needles):
            hits.append(line)
    return hits
