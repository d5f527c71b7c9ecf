"""Wall time of the whole DAG in containers against the subprocess runner, same run.

Both runners run the same DAG on the same digits subset with the same parameters,
interleaved (subprocess, docker, subprocess, docker, ...) so that noise on this shared
machine hits both alike; each run is `triview run` through the CLI, timed by its own
``dag_seconds``, and every pair must give identical test metrics.

    ratio = median docker dag_seconds / median subprocess dag_seconds

    python bench/docker_runner.py --json results_docker_runner.json [--rounds 2]

Needs a Docker engine and `make images`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PARAMS = ["epochs=1", "image_size=24", "augment_copies=0"]


def run(runner: str, data: Path, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "triview"), "run", "--runner", runner,
           "--data", str(data), "--out", str(out)] + [a for p in PARAMS for a in ("--param", p)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "run_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="triview-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # the tasks' uid 10001 must enter it
        subprocess.run([str(Path(sys.executable).parent / "triview"), "demo-data", str(root / "data"),
                        "--per-class", str(args.per_class)], check=True, stdout=subprocess.DEVNULL)
        seconds: dict[str, list[float]] = {"subprocess": [], "docker": []}
        for i in range(args.rounds):
            pair = {runner: run(runner, root / "data", root / f"{runner}-{i}") for runner in seconds}
            for runner, summary in pair.items():
                seconds[runner].append(summary["dag_seconds"])
            same = all(pair["docker"][k] == pair["subprocess"][k] for k in ("views", "ensemble"))
            print(f"round {i}: subprocess {pair['subprocess']['dag_seconds']} s, docker "
                  f"{pair['docker']['dag_seconds']} s, same metrics: {same}")
            assert same, "the runners disagree on the test metrics"
    ratio = statistics.median(seconds["docker"]) / statistics.median(seconds["subprocess"])
    result = {"params": PARAMS, "per_class": args.per_class, "dag_seconds": seconds,
              "docker_over_subprocess": round(ratio, 3)}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
