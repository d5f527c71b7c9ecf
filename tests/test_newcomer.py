"""A newcomer's first hour, through the real ``triview`` executable: each usual mistake
ends in exit 2 and a message that names the fix in the terms of the command typed, before
any task starts (no output folder is made, nothing is trained), and the same photos as a
folder, a ZIP of its contents and a ZIP of the folder get identical splits."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

TRIVIEW = str(Path(sys.executable).parent / "triview")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from triview.demo import write_digits

    folder = tmp_path_factory.mktemp("newcomer") / "photos"
    write_digits(folder, per_class=8, size=32)
    return folder


def triview(*argv, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([TRIVIEW, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def refused(proc: subprocess.CompletedProcess, *fixes: str) -> str:
    """Exit 2, no traceback, and every one of ``fixes`` in the message."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for fix in fixes:
        assert fix in proc.stderr, (fix, proc.stderr)
    return proc.stderr


def test_one_class_is_refused_with_the_layout_that_works(photos, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(photos / "3", one / "3")
    for command in ("run", "ingest"):
        refused(triview(command, "--data", one, "--out", tmp_path / "out"),
                "only one class, '3'", "needs at least two", f"{one}/<class>/<image>")
    assert not (tmp_path / "out").exists()


def test_a_label_option_that_leaves_one_class_is_refused_before_training(photos, tmp_path):
    keep = ",".join(str(d) for d in range(2, 10))
    refused(triview("run", "--data", photos, "--out", tmp_path / "out", "--param",
                    f"label_drop={keep}", "--param", "label_remap=1->0"),
            "only one class, '0'")
    assert not (tmp_path / "out").exists()


def test_out_inside_data_is_refused(photos, tmp_path):
    for command in ("run", "ingest"):
        refused(triview(command, "--data", photos, "--out", photos / "runs"),
                "is inside the data folder", "Give an --out outside it")
    assert not (photos / "runs").exists()


def test_a_class_too_small_to_split_names_the_fix_in_the_typed_commands_terms(photos, tmp_path):
    small = tmp_path / "small"
    for label, n in (("a", 5), ("b", 5), ("c", 2)):
        (small / label).mkdir(parents=True)
        for k, src in enumerate(sorted((photos / "1").iterdir())[:n]):
            (small / label / f"{k}.jpg").write_bytes(src.read_bytes() + label.encode())
    run = refused(triview("run", "--data", small, "--out", tmp_path / "o1"),
                  "'c' (2)", "--param label_drop=c", "--param min_per_class=3",
                  "--param 'label_remap=c->OTHER'")
    assert "--drop" not in run and "--min-per-class" not in run
    refused(triview("ingest", "--data", small, "--out", tmp_path / "o2"),
            "'c' (2)", "--label-drop c", "--min-per-class 3")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("argv,fixes", [
    (["--epochs", "1"], ["unrecognized arguments: --epochs 1", "did you mean --param epochs=1?"]),
    (["--param", "epochs", "1"], ["--param takes KEY=VALUE as one word", "--param epochs=1"]),
    (["--param", "epoch=1"], ["unknown parameter 'epoch'", "did you mean epochs", "triview params"]),
    (["--pram", "epochs=1"], ["did you mean --param?"]),
    (["--param", "lr=-1"], ["'lr' must be in (0, 10]"]),
])
def test_run_mistakes_name_the_fix(photos, tmp_path, argv, fixes):
    refused(triview("run", "--data", photos, "--out", tmp_path / "out", *argv), *fixes)
    assert not (tmp_path / "out").exists()


def test_other_commands_mistakes(photos, tmp_path):
    refused(triview("ingest", "--data", photos, "--out", tmp_path / "o", "--param",
                    "min_per_class=3"), "did you mean --min-per-class 3?")
    refused(triview("run", photos, "--out", tmp_path / "o"), f"did you mean --data {photos}?")
    refused(triview("trian", "--data", photos), "did you mean run?")
    stages = refused(triview("params", "--stage", "nope"), "invalid choice: 'nope'")
    assert "'train-branch'" in stages and "'calibrate-and-crop'" in stages
    assert "train-branch" in triview("params", "--help").stdout
    assert not (tmp_path / "o").exists()


def test_an_unquoted_glob_is_answered_with_the_quoted_one(photos, tmp_path):
    shots = sorted((photos / "0").iterdir())[:3]
    refused(triview("calibrate", "--images", *shots, "--out", tmp_path / "c.json"),
            "the shell expanded a glob", f"--images '{photos / '0'}/*.jpg'")
    assert not (tmp_path / "c.json").exists()


def test_serve_names_a_missing_model_before_the_serving_environment(tmp_path):
    env = {**os.environ, "TRIVIEW_SERVE_PYTHON": str(tmp_path / "no-such-python")}
    refused(triview("serve", "--model", tmp_path / "missing", env=env),
            "no model at", "triview run --out")


def test_compile_outside_the_checkout_names_a_file(tmp_path):
    refused(triview("compile", cwd=tmp_path), "triview compile -o triview.yaml")
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_ends_quietly():
    """``triview params | true``: the reader is gone before the first write; no traceback,
    and the status a program stopped by SIGPIPE gets."""
    for argv in ("params", "params --format json", "params --stage ingest"):
        proc = subprocess.run(f"set -o pipefail; {TRIVIEW} {argv} | true; echo $?", shell=True,
                              capture_output=True, text=True, timeout=60, executable="/bin/bash")
        assert proc.stdout.strip() == "141" and proc.stderr == "", (argv, proc.stdout, proc.stderr)


def _splits(out: Path) -> pd.Series:
    table = pd.read_csv(out / "manifest.csv")
    return table.set_index("source_id")["split"].sort_index()


def test_a_folder_a_zip_and_a_wrapped_zip_give_identical_splits(photos, tmp_path):
    flat, wrapped = tmp_path / "flat.zip", tmp_path / "wrapped.zip"
    with zipfile.ZipFile(flat, "w") as zf, zipfile.ZipFile(wrapped, "w") as wf:
        for path in sorted(photos.rglob("*.jpg")):
            zf.write(path, path.relative_to(photos).as_posix())
            wf.write(path, (Path("my photos") / path.relative_to(photos)).as_posix())
    splits = {}
    for name, data in (("folder", photos), ("zip", flat), ("wrapped", wrapped)):
        proc = triview("ingest", "--data", data, "--out", tmp_path / name, "--no-plot")
        assert proc.returncode == 0, proc.stderr
        splits[name] = _splits(tmp_path / name)
    assert len(splits["folder"]) == 80 and set(splits["folder"]) == {"train", "val", "test"}
    assert splits["folder"].index[0] == "0/digit_0000"   # relative to the root, no wrapper
    pd.testing.assert_series_equal(splits["folder"], splits["zip"])
    pd.testing.assert_series_equal(splits["folder"], splits["wrapped"])


def test_every_commands_help_has_a_description_an_example_and_placeholders():
    """``triview <command> --help``: what the command does, an example, and a placeholder
    name for every argument that takes a value; ``run --help`` points to ``triview params``."""
    import argparse

    from triview.cli import build_parser

    commands = build_parser().commands()
    assert len(commands) >= 13
    for name, parser in commands.items():
        text = parser.format_help()
        assert parser.description, name
        assert "examples:\n  triview " + name in text, name
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.nargs == 0:
                continue
            assert action.metavar, (name, action.option_strings or action.dest)
            assert action.help, (name, action.option_strings or action.dest)
    run = commands["run"].format_help()
    assert "triview params" in run and "--param NAME=VALUE" in run
