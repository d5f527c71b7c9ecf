"""Start-up of a process that imports kfp's client, as `triview run`, `compile` and
`submit` and the test process do, with and without the optional ``rfc3987_syntax`` (pulled
into the dev venv by cyclonedx-bom's jsonschema[format-nongpl]; kfp -> kubernetes ->
kubernetes_validate -> jsonschema imports it, and it builds a Lark grammar at import). The
Makefile uninstalls it; this measures what that saves, in the same run. (A DAG task's own
process sets _KFP_RUNTIME=true, skips kfp's client and never paid this.)

    python bench/cli_startup.py [--rounds 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

IMPORT = "import kfp.dsl.executor_main, triview.stages"
BLOCKED = "import sys; sys.modules['rfc3987_syntax'] = None; " + IMPORT
WITH = ("import importlib.util, sys\n"
        "if importlib.util.find_spec('rfc3987_syntax') is None: sys.exit(3)\n" + IMPORT)


def _seconds(code: str) -> float | None:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    if proc.returncode == 3:
        return None
    proc.check_returncode()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    blocked, loaded = [], []
    for _ in range(args.rounds):  # alternate, so that load on the machine hits both alike
        blocked.append(_seconds(BLOCKED))
        loaded.append(_seconds(WITH))
    result = {"rounds": args.rounds, "without_s": round(statistics.median(blocked), 3)}
    if None in loaded:
        result["note"] = "rfc3987_syntax is not installed here (the Makefile removes it)"
    else:
        result["with_s"] = round(statistics.median(loaded), 3)
        result["with_over_without"] = round(result["with_s"] / result["without_s"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
