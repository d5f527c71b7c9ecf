"""The ``triview`` argument parser: argparse, with answers to the usual mistakes.

Every mistake argparse catches ends in exit 2 with this command's usage, the error and a
hint in the terms of the command that was typed, before any task starts:

- a flag the command does not take: the nearest flag it does take (difflib), or, for a
  pipeline parameter spelt as a flag (``triview run --epochs 1``), ``--param epochs=1``;
  the other way round, ``triview ingest --param min_per_class=3`` points to
  ``--min-per-class 3``;
- ``--param epochs 1`` (two words): ``--param epochs=1``;
- a glob the shell expanded (``triview calibrate --images calib/*.jpg``): quote it;
- a misspelt command or choice: the nearest ones;
- a path given without its flag (``triview run photos``): ``--data photos``.

Each subcommand's ``--help`` has a description (its one-line help unless it has its own)
and the examples of :data:`triview.cli_examples.EXAMPLES` as its epilog. The flag groups
several commands share are here too: a stage's parameters as flags (``triview ingest``),
the connection to Kubeflow Pipelines and the cluster settings.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path



#: Commands the cluster's pods run (a tune OptimizationJob's trial), never suggested for a slip.
INTERNAL_COMMANDS = ("tune-trial",)

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples keep their line breaks; option help is wrapped."""


class _Commands(argparse._SubParsersAction):
    """Subcommands that are :class:`CommandParser` s, described by their one-line help."""

    def add_parser(self, name, **kwargs):
        if kwargs.get("help") and not kwargs.get("description"):
            kwargs["description"] = kwargs["help"][0].upper() + kwargs["help"][1:] + "."
        return super().add_parser(name, **kwargs)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors name the fix (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        from triview.cli_examples import EXAMPLES

        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        if command in EXAMPLES and not self.epilog:
            self.epilog = "examples:\n" + "\n".join(f"  {line}" if line else ""
                                                     for line in EXAMPLES[command].splitlines())

    # ------------------------------------------------------------------ parsing

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", CommandParser)
        return super().add_subparsers(**kwargs)

    def commands(self) -> dict[str, "CommandParser"]:
        """The subcommands' parsers by name ({} for a parser without subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        command = self.commands().get(argv[0]) if argv else None
        if command is not None:
            command.check_common_slips(argv[1:])
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            where = self.commands().get(getattr(parsed, "command", None) or "") or self
            where.error(f"unrecognized arguments: {' '.join(extras)}",
                        hints=where.unrecognized_hints(extras))
        return parsed

    def check_common_slips(self, argv: list[str]) -> None:
        """Slips argparse would answer with a bare "required" or "unrecognized": a path
        without its flag (``triview run photos``: ``--data photos``), and ``--param epochs
        1`` (the value as a word of its own: ``--param epochs=1``)."""
        takes_positional = any(not a.option_strings for a in self._actions)
        if (argv and not argv[0].startswith("-") and not takes_positional
                and "--data" in self._option_string_actions and Path(argv[0]).exists()):
            self.error(f"{argv[0]!r} needs its flag", hints=[f"did you mean --data {argv[0]}?"])
        if "--param" not in self._option_string_actions:
            return
        for i, token in enumerate(argv[:-1]):
            value = argv[i + 1]
            if token == "--param" and "=" not in value and not value.startswith("-"):
                after = argv[i + 2] if i + 2 < len(argv) and not argv[i + 2].startswith("-") else "VALUE"
                self.error(f"--param takes KEY=VALUE as one word, got {value!r}",
                           hints=[f"write: --param {value}={after}"])

    # ------------------------------------------------------------------ errors

    def error(self, message: str, hints: list[str] | None = None):
        """Usage, the error, the hints; exit 2."""
        hints = list(hints or []) + self._choice_hints(message)
        self.print_usage(sys.stderr)
        lines = [f"{self.prog}: error: {message}"] + [f"  {h}" for h in hints]
        if self.commands() == {}:
            lines.append(f"  ({self.prog} --help shows every option, with examples)")
        self.exit(2, "\n".join(lines) + "\n")

    def _choice_hints(self, message: str) -> list[str]:
        found = re.search(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)", message)
        if not found:
            return []
        # commands that only run inside the cluster's pods are never what a person meant
        choices = [c for c in re.findall(r"'([^']*)'", found["choices"])
                   if c not in INTERNAL_COMMANDS]
        near = difflib.get_close_matches(found["given"], choices, n=3, cutoff=0.5)
        return [f"did you mean {' or '.join(near)}?"] if near else []

    def option_names(self) -> list[str]:
        return [s for s in self._option_string_actions if s.startswith("--")]

    def unrecognized_hints(self, extras: list[str]) -> list[str]:
        """What each unrecognized argument probably meant, in this command's terms."""
        from triview import params as spec

        hints, options = [], self.option_names()
        takes_param = "--param" in options
        expanded = [e for e in extras if not e.startswith("-") and Path(e).exists()]
        if expanded and "--images" in options:
            return [glob_hint(expanded, "--images")]
        for i, token in enumerate(extras):
            if not token.startswith("--"):
                continue
            flag, _, value = token.partition("=")
            if not value and i + 1 < len(extras) and not extras[i + 1].startswith("-"):
                value = extras[i + 1]
            name = flag[2:].replace("-", "_")
            if takes_param and name in spec.PARAMS:
                hints.append(f"did you mean --param {name}={value or spec.PARAMS[name].default}? "
                             f"({flag} is a pipeline parameter: `{self.prog}` takes them as "
                             f"--param NAME=VALUE)")
                continue
            if flag == "--param" and "=" in value:  # a command that takes parameters as flags
                key, _, given = value.partition("=")
                own = f"--{key.strip().replace('_', '-')}"
                if own in options:
                    hints.append(f"did you mean {own} {given}? (`{self.prog}` takes the "
                                 f"parameters as flags of their own)")
                    continue
            near = difflib.get_close_matches(flag, options, n=3, cutoff=0.6)
            if near:
                hints.append(f"did you mean {' or '.join(near)}?")
            elif takes_param:
                names = spec.close_names(name)
                if names:
                    hints.append(f"did you mean --param {names[0]}=...? (pipeline parameters: "
                                 f"triview params)")
        return hints


# ----------------------------------------------------------------------------- shared flag groups


def add_kfp_connection_flags(p: argparse.ArgumentParser) -> None:
    """How ``submit``, ``schedule`` and ``runs`` reach the Kubeflow Pipelines API."""
    p.add_argument("--host", metavar="URL", help="KFP API URL, e.g. http://localhost:8080 "
                   "(default: $KF_PIPELINES_ENDPOINT, else in-cluster or kubeconfig, as "
                   "kfp.Client)")
    p.add_argument("--namespace", metavar="NAMESPACE",
                   help="Kubeflow profile namespace (multi-user deployments)")
    p.add_argument("--token", metavar="TOKEN", help="bearer token (default $KFP_TOKEN; prefer "
                   "the variable: command lines show up in ps and shell history)")


def add_cluster_run_flags(p: argparse.ArgumentParser) -> None:
    """What ``submit`` and ``schedule`` start: the data, the experiment, the parameters."""
    p.add_argument("--data", required=True, metavar="PATH|s3://...",
                   help="input folder or ZIP as the ingest pod sees it")
    p.add_argument("--experiment", default="triview", metavar="NAME",
                   help="experiment, created if missing (default triview)")
    p.add_argument("--pipeline-root", metavar="minio://BUCKET/PATH",
                   help="where the run's artifacts go (default: the cluster's)")
    p.add_argument("--service-account", default="triview-pipeline-runner", metavar="NAME",
                   help="Kubernetes service account of the run's pods")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, repeatable (e.g. --param epochs=4; all of them: "
                   "triview params)")
    p.add_argument("--preset", default=None, metavar="NAME|FILE",
                   help="parameter values from a preset or YAML file (--param overrides)")
    p.add_argument("--no-cache", action="store_true",
                   help="disable caching for every task (default: as compiled)")


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """The cluster settings compiled into the IR (``compile``, ``submit``, ``schedule``)."""
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="GPUs per train-branch task (default 1; 0: CPU)")
    p.add_argument("--node-gpus", type=int, default=None, metavar="N",
                   help="GPUs per node of a branch trained on several nodes (--param nodes>1, "
                        "a Kubeflow Trainer TrainJob; default: --gpus). With --gpus 0 the "
                        "task that waits for its TrainJob holds no GPU")
    p.add_argument("--crop-shards", type=int, default=None, metavar="N",
                   help="fan calibrate-and-crop out over N tasks, each cropping 1/N of the "
                        "manifest, merged by collect-views (dsl.ParallelFor; default 1)")
    p.add_argument("--crop-parallelism", type=int, default=None, metavar="P",
                   help="at most P of those tasks at once (default: all)")
    p.add_argument("--gpu-pool", metavar="LABEL=VALUE", help="node label of the GPU node pool")
    p.add_argument("--gpu-toleration", metavar="KEY", help="taint key the GPU nodes carry")
    p.add_argument("--cpu-pool", metavar="LABEL=VALUE", help="node label for the light stages")
    p.add_argument("--minio-secret", metavar="NAME", help="Secret with accesskey/secretkey "
                   "(default triview-minio)")
    p.add_argument("--customvision-secret", metavar="NAME", help="Secret whose key "
                   "training_key becomes $CUSTOMVISION_TRAINING_KEY in the ingest task, for "
                   "--data customvision://... (default triview-customvision; optional)")
    p.add_argument("--image", metavar="REF:TAG", help="image of the light stages "
                   "(default $TRIVIEW_IMAGE or ghcr.io/triview/triview-cpu:0.1.0)")
    p.add_argument("--gpu-image", metavar="REF:TAG", help="image of train-branch "
                   "(default $TRIVIEW_GPU_IMAGE or ghcr.io/triview/triview-gpu:0.1.0)")
    p.add_argument("--serve-image", metavar="REF:TAG", help="predictor image the deploy step "
                   "puts in the InferenceService (default $TRIVIEW_SERVE_IMAGE or "
                   "ghcr.io/triview/triview-serve:0.1.0)")


# ----------------------------------------------------------------------------- stage flags

#: Extra spellings of stage flags (``--validation-split`` as in Keras); repeatable flags
#: (``--remap a->b --remap c->d``) are joined with commas into the parameter's value.
_FLAG_ALIASES = {"val_fraction": ("--validation-split",), "label_remap": ("--remap",),
                 "label_drop": ("--drop",), "allowed_roots": ("--allow-root",)}
_REPEATABLE = ("label_remap", "label_drop", "allowed_roots")


def add_stage_flags(parser: argparse.ArgumentParser, stage: str) -> None:
    """One ``--flag`` per spec parameter of ``stage`` (typed, checked, with the spec's
    default and help): ``triview ingest`` takes ingest's parameters as flags."""
    from triview import params as spec

    for name in spec.names(stage):
        param = spec.PARAMS[name]
        flags = (f"--{name.replace('_', '-')}",) + _FLAG_ALIASES.get(name, ())
        if name in _REPEATABLE:
            parser.add_argument(*flags, dest=name, action="append", default=[], metavar="VALUE",
                                help=f"{spec.help_text(param)} Repeatable.")
        else:
            parser.add_argument(*flags, dest=name, type=_flag_type(param), default=param.default,
                                metavar=param.type.__name__.upper(),
                                help=f"{spec.help_text(param)} Default: {param.default!r}.")


def _flag_type(param):
    def convert(text: str):
        try:
            return param.validate(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = param.type.__name__
    return convert


def stage_flag_values(args: argparse.Namespace, stage: str) -> dict:
    from triview import params as spec

    values = {name: getattr(args, name) for name in spec.names(stage)}
    for name in _REPEATABLE:
        if name in values:
            values[name] = ",".join(values[name])
    return values


def stage_flag(name: str, value: str) -> str:
    """How a command with stage flags spells a parameter's value (``--min-per-class 3``)."""
    import shlex

    return f"--{name.replace('_', '-')} {shlex.quote(value)}"


def glob_hint(paths: list[str], flag: str) -> str:
    """The shell expanded a glob into ``paths``: what the quoted glob would have been."""
    folders = {str(Path(p).parent) for p in paths}
    suffixes = {Path(p).suffix for p in paths}
    folder = folders.pop() if len(folders) == 1 else "DIR"
    pattern = f"{folder}/*{suffixes.pop() if len(suffixes) == 1 else ''}"
    return (f"the shell expanded a glob into {len(paths)} file names before triview saw it: "
            f"quote it, {flag} '{pattern}'")


def quiet_broken_pipe() -> int:
    """After a BrokenPipeError on stdout (``triview params | head``): nothing more is
    written, no traceback; the exit status is what a program killed by SIGPIPE gets."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    return 128 + 13
