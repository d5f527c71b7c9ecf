"""The docs cannot contradict the code: the site builds strictly (``make docs``: a broken
link or anchor fails), and the docs' examples are checked against the real CLI.

Conventions, for every page of ``docs/``, the README and each command's ``--help`` examples:

- every ``triview ...`` command line (after ``$ `` in a ``console`` block, or a line of a
  ``bash`` block, or an example line) is parsed by the real parser: its command and flags
  exist, its ``--param`` names and values are allowed, its ``--preset`` exists;
- a ``console`` block right after ``<!-- docs-test: run -->`` is run: each ``$ `` command
  in bash, in a scratch folder of its page (the page's run blocks in order, sharing the
  folder), and the lines below a command must appear in its output (stdout and stderr) in
  that order; ``...`` in a line matches anything, a line of only ``...`` stands for any
  lines. The exit status must be 0, or N for ``<!-- docs-test: run exit=N -->``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
_BLOCK = re.compile(r"(?:<!-- docs-test: run(?: exit=(?P<exit>\d+))? -->\n)?"
                    r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```", re.S | re.M)
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ">", ">>", "<", "2>", "2>&1"}


@dataclass
class Block:
    page: Path
    lang: str
    body: str
    run: bool
    exit: int


def blocks(page: Path) -> list[Block]:
    return [Block(page, m["lang"], m["body"], m.group(0).startswith("<!--"), int(m["exit"] or 0))
            for m in _BLOCK.finditer(page.read_text())]


def session(block: Block) -> list[tuple[str, list[str]]]:
    """A console block's ``$ `` commands, each with the output lines below it."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def command_lines(block: Block) -> list[str]:
    if block.lang == "console":
        return [command for command, _ in session(block)]
    if block.lang in ("bash", "sh"):
        return [line for line in block.body.replace("\\\n", " ").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    return []


def triview_argvs(line: str) -> list[list[str]]:
    """The ``triview`` invocations of a shell line (after VAR=value, through && ; |)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    out, words = [], []
    for token in list(lexer) + [";"]:
        if token in _OPERATORS or set(token) <= set("&|;<>()"):
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            if words and Path(words[0]).name == "triview":
                out.append(words[1:])
            words = []
        else:
            words.append(token)
    return out


def parse_error(argv: list[str]) -> str | None:
    """None when ``triview ARGV`` parses and its parameters are allowed, else why not."""
    from triview import params as spec
    from triview.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip()
    try:
        preset = getattr(args, "preset", None)
        if preset and not preset.endswith((".yaml", ".yml")):  # a file the page's run writes
            spec.load_preset(preset)
        spec.parse_pairs(getattr(args, "param", None) or [])
    except ValueError as exc:
        return str(exc)
    return None


def _every_command_line():
    from triview.cli_examples import EXAMPLES, OVERVIEW

    for page in PAGES + [REPO / "README.md"]:
        for block in blocks(page):
            if block.exit == 0:
                for line in command_lines(block):
                    yield f"{page.relative_to(REPO)}", line
    for command, text in {**EXAMPLES, "overview": OVERVIEW}.items():
        for line in text.splitlines():
            if line.strip().startswith("triview "):
                yield f"triview {command} --help", line


def test_every_triview_command_line_in_the_docs_parses():
    """The commands and flags the docs name exist and their values are allowed (the
    examples that show a mistake on purpose are run instead, below)."""
    checked, problems = 0, []
    for where, line in _every_command_line():
        for argv in triview_argvs(line):
            checked += 1
            why = parse_error(argv)
            if why:
                problems.append(f"{where}: {line}\n    {why}")
    assert checked >= 60, checked
    assert problems == [], "\n".join(problems)


def test_a_made_up_flag_in_the_docs_would_fail():
    """The check above is not vacuous: a flag or a parameter that does not exist fails it."""
    assert "unrecognized arguments: --epochs" in parse_error(["run", "--data", "d", "--out", "o",
                                                              "--epochs", "1"])
    assert "unknown parameter 'epoch'" in parse_error(["run", "--data", "d", "--out", "o",
                                                       "--param", "epoch=1"])
    assert triview_argvs("TORCH_HOME=/x .venv/bin/triview run --data d --out o && triview params"
                         " | head") == [["run", "--data", "d", "--out", "o"], ["params"]]


def _pattern(expected: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in expected.rstrip().split("...")))


def missing_lines(expected: list[str], output: str) -> list[str]:
    """The expected lines not found in ``output`` in order (``...``: any text / any lines)."""
    lines = [line.rstrip() for line in output.splitlines()]
    at, missing = 0, []
    for want in expected:
        if not want.strip() or want.strip() == "...":
            continue
        pattern = _pattern(want)
        for k in range(at, len(lines)):
            if pattern.fullmatch(lines[k]):
                at = k + 1
                break
        else:
            missing.append(want)
    return missing


RUN_PAGES = [p for p in PAGES if any(b.run for b in blocks(p))]


@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(DOCS)) for p in RUN_PAGES])
def test_the_docs_examples_run_as_shown(page, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "100", "PYTHONPATH": str(REPO)}
    env.pop("TRIVIEW_SERVE_PYTHON", None)
    ran = 0
    for block in (b for b in blocks(page) if b.run):
        for command, expected in session(block):
            proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
            ran += 1
            assert proc.returncode == block.exit, f"$ {command}\n{proc.stdout}"
            assert missing_lines(expected, proc.stdout) == [], f"$ {command}\n{proc.stdout}"
    assert ran


def test_the_expected_output_is_checked():
    assert missing_lines(["a ... c", "...", "z"], "x\na b c\ny\nz\n") == []
    assert missing_lines(["z", "a ... c"], "a b c\nz\n") == ["a ... c"]


def test_the_site_builds_strictly_without_the_network(tmp_path):
    """``make docs``: mkdocs --strict (broken links, anchors and pages left out of the nav
    fail); the pages ask for no web font or CDN file."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = list((tmp_path / "site").rglob("*.html"))
    assert len(pages) >= 20, len(pages)
    text = "\n".join(p.read_text() for p in pages)
    assert "fonts.googleapis" not in text and "cdn.jsdelivr" not in text
    # the API page is generated from the docstrings, the parameter table from the spec
    from triview import params as spec

    api = (tmp_path / "site" / "reference" / "api.html").read_text()
    assert "source_id_of" in api and "The Wilson score interval" in api
    table = (tmp_path / "site" / "reference" / "parameters.html").read_text()
    assert all(f"<code>{name}</code>" in table for name in spec.PARAMS)
    print(f"mkdocs build --strict: {seconds:.1f} s, {len(pages)} pages")
