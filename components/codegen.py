"""Generate the parameter part of every component's signature and docstring from the
parameter spec (:mod:`triview.params`), and the docs' reference pages that come from the
code: the parameter table (``docs/reference/parameters.md``) and every command's ``--help``
(``docs/reference/cli.md``).

KFP embeds a Lightweight Python Component's source in the compiled IR and runs it in the
container, so a component's parameters must be written out in its ``component.py``. Each
file holds a generated block in its signature (between ``# params: <stage>`` and
``# end params``) and generated ``Args:`` entries for those parameters at the end of its
docstring; everything else in the file is written by hand.

    python -m components.codegen           # rewrite stale files
    python -m components.codegen --check   # exit 1 and name them (what the tests run)
"""
from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

from triview import params as spec

REPO = Path(__file__).resolve().parents[1]
#: component folder -> the stage whose parameters its signature carries
COMPONENT_STAGES = {
    "ingest": "ingest",
    "calibrate_and_crop": "calibrate-and-crop",
    "balance": "balance",
    "augment": "augment",
    "train_branch": "train-branch",
    "train_voter": "train-voter",
    "evaluate": "evaluate",
    "export": "export",
    "deploy": "deploy",
}
PARAMS_PAGE = REPO / "docs" / "reference" / "parameters.md"
PARAMS_BEGIN = "<!-- params:begin (generated from triview/params.py: python -m components.codegen) -->"
PARAMS_END = "<!-- params:end -->"
CLI_PAGE = REPO / "docs" / "reference" / "cli.md"
CLI_BEGIN = "<!-- cli:begin (generated from triview/cli.py: python -m components.codegen) -->"
CLI_END = "<!-- cli:end -->"
#: The terminal width the generated --help text is wrapped to.
HELP_COLUMNS = 100
_SIGNATURE = re.compile(r"(?P<head>^    # params: (?P<stage>[a-z-]+)\b.*\n)(?P<body>(?:.*\n)*?)"
                        r"(?P<tail>^    # end params\n)", re.MULTILINE)
_ARG_INDENT, _WIDTH = 8, 96


def _default(param: spec.Param) -> str:
    return json.dumps(param.default) if param.type is str else repr(param.default)


def signature_block(stage: str) -> str:
    """The stage's parameters as signature lines, filled to the line width (the source is
    embedded in the compiled IR; the docstring below documents each one)."""
    lines, line = [], "   "
    for p in (spec.PARAMS[n] for n in spec.names(stage)):
        item = f" {p.name}: {p.type.__name__} = {_default(p)},"
        if len(line) + len(item) > _WIDTH and line.strip():
            lines.append(line)
            line = "   "
        line += item
    return "\n".join(lines + [line]) + "\n"


def docstring_entries(stage: str) -> list[str]:
    lines = []
    for name in spec.names(stage):
        text = f"{name}: {spec.help_text(spec.PARAMS[name])}"
        lines += textwrap.wrap(text, _WIDTH, initial_indent=" " * _ARG_INDENT,
                               subsequent_indent=" " * (_ARG_INDENT + 4),
                               break_on_hyphens=False)
    return lines


def _rewrite_args(doc_lines: list[str], stage: str) -> list[str]:
    """Drop the Args entries of ``stage``'s parameters and append fresh ones at the end of
    the Args block (the hand-written entries keep their place)."""
    own = set(spec.names(stage))
    start = doc_lines.index("    Args:") + 1
    end = start
    while end < len(doc_lines) and (doc_lines[end].startswith(" " * _ARG_INDENT)
                                    or not doc_lines[end].strip() and end + 1 < len(doc_lines)
                                    and doc_lines[end + 1].startswith(" " * _ARG_INDENT)):
        end += 1
    kept, skipping = [], False
    for line in doc_lines[start:end]:
        if line.startswith(" " * _ARG_INDENT) and not line.startswith(" " * (_ARG_INDENT + 1)):
            skipping = line.strip().split(":", 1)[0] in own
        if not skipping:
            kept.append(line)
    return doc_lines[:start] + kept + docstring_entries(stage) + doc_lines[end:]


def render_component(text: str, stage: str) -> str:
    """``text`` of a component.py with its generated parts brought up to date."""
    match = _SIGNATURE.search(text)
    if match is None or match["stage"] != stage:
        raise ValueError(f"no '# params: {stage}' ... '# end params' block in the signature")
    text = text[:match.start("body")] + signature_block(stage) + text[match.end("body"):]
    doc_start = text.index('    """', match.start()) + 7
    doc_end = text.index('    """', doc_start)
    doc = text[doc_start:doc_end].split("\n")
    return text[:doc_start] + "\n".join(_rewrite_args(doc, stage)) + text[doc_end:]


def _between(text: str, begin_mark: str, end_mark: str, body: str) -> str:
    begin, end = text.index(begin_mark) + len(begin_mark), text.index(end_mark)
    return text[:begin] + "\n" + body + "\n" + text[end:]


def render_params_page(text: str) -> str:
    return _between(text, PARAMS_BEGIN, PARAMS_END, spec.markdown_table())


def cli_help_markdown() -> str:
    """``triview --help`` and every command's ``--help``, as the terminal shows them."""
    import os

    from triview.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    try:
        parser = build_parser()
        parts = ["## triview", "", "```text", parser.format_help().rstrip(), "```"]
        for name, command in parser.commands().items():
            parts += ["", f"## triview {name}", "", "```text", command.format_help().rstrip(), "```"]
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)


def render_cli_page(text: str) -> str:
    return _between(text, CLI_BEGIN, CLI_END, cli_help_markdown())


def targets() -> dict[Path, str]:
    """Every generated file and what it should hold now."""
    out = {}
    for folder, stage in COMPONENT_STAGES.items():
        path = REPO / "components" / folder / "component.py"
        out[path] = render_component(path.read_text(), stage)
    out[PARAMS_PAGE] = render_params_page(PARAMS_PAGE.read_text())
    out[CLI_PAGE] = render_cli_page(CLI_PAGE.read_text())
    return out


def stale() -> list[Path]:
    return [path for path, text in targets().items() if path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        old = stale()
        for path in old:
            print(f"stale: {path.relative_to(REPO)} (run: python -m components.codegen)")
        return 1 if old else 0
    for path, text in targets().items():
        if path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
