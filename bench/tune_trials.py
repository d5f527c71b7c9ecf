"""`triview tune` against one full DAG, in the same run on the same machine: the search's
wall time, its median trial time (the trials after the first reuse the cached stages and
frozen features) as a share of one `triview run` of the same data, and how the best
validation figure compares with trial 0's (the parameters as given). With `--seeds N`, also
the best preset's test figures over N seeds next to the defaults' (`triview run --repeats N`
for each).

    python bench/tune_trials.py --data ../shared/data/hymenoptera --trials 30 \
        --out /tmp/tune-bench [--seeds 3] [--objective val_macro_f1]
        [--json bench/results_tune_trials.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRIVIEW = str(Path(sys.executable).parent / "triview")


#: CPU seconds (user + system) of each command, beside its wall time: on a shared machine
#: the wall time depends on the other work, the CPU time much less.
CPU: dict[str, float] = {}


def _timed(cmd: list[str], log: Path) -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[log.stem] = round(after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime, 1)
    return time.perf_counter() - start


def _seeds(summary: dict) -> dict:
    rep = summary["repeats"]
    out = {"ensemble": {m: rep["ensemble"][m] for m in ("accuracy", "macro_f1")}}
    out["views"] = {v: {"accuracy": m["accuracy"]} for v, m in rep["views"].items()}
    out["seeds"] = rep["seeds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=0, help="also compare best vs defaults "
                        "over this many seeds (0: no)")
    parser.add_argument("--objective", default="val_macro_f1",
                        help="the study's objective (triview tune --objective)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--defaults-summary", default=None,
                        help="run_summary.json of a `triview run --repeats N` of the same data and "
                        "commit with the defaults: its figures stand for the defaults' seeds "
                        "(saves that run; recorded as defaults_summary_from)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())

    from triview.tune.objective import get_objective

    objective = get_objective(args.objective)
    tune_s = _timed([TRIVIEW, "tune", "--data", args.data, "--out", str(out / "tune"),
                     "--trials", str(args.trials), "--objective", objective.name], out / "tune.log")
    dag_s = _timed([TRIVIEW, "run", "--data", args.data, "--out", str(out / "dag")], out / "dag.log")
    dag = json.loads((out / "dag" / "run_summary.json").read_text())

    import pandas as pd

    trials = pd.read_csv(out / "tune" / "trials.csv")
    later = trials[(trials["trial"] > 0) & trials["state"].isin(["complete", "pruned"])]
    first = float(trials.loc[trials["trial"] == 0, "seconds"].iloc[0])
    done = trials[trials["state"] == "complete"]
    column = objective.name
    best = done.loc[done[column].idxmax() if objective.direction == "maximize" else done[column].idxmin()]
    result = {
        "data": args.data, "trials": int(len(trials)), "complete": int(len(done)),
        "pruned": int((trials["state"] == "pruned").sum()),
        "tune_wall_s": round(tune_s, 1), "dag_wall_s": round(dag_s, 1),
        "dag_summary_s": dag.get("dag_seconds"),
        "trial0_s": first, "median_trial_s": float(statistics.median(later["seconds"])),
        "median_trial_over_dag": round(float(statistics.median(later["seconds"])) / dag_s, 4),
        "trial0_over_dag": round(first / dag_s, 3),
        "objective": column, "best_trial": int(best["trial"]), f"best_{column}": float(best[column]),
        f"trial0_{column}": float(trials.loc[trials["trial"] == 0, column].iloc[0]),
        "best_test_once": json.loads((out / "tune" / "best_test.json").read_text())["ensemble"],
        "dag_defaults_test": dag["ensemble"],
        "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
    }
    if args.seeds > 1:
        preset = str(out / "tune" / "best.yaml")
        for name, extra in (("best", ["--preset", preset]), ("defaults", [])):
            if name == "best" and result["best_trial"] == 0:
                result["best_over_seeds"] = "= defaults_over_seeds (trial 0 was best: best.yaml is empty)"
                continue
            if name == "defaults" and args.defaults_summary:
                summary = json.loads(Path(args.defaults_summary).read_text())
                result["defaults_summary_from"] = args.defaults_summary
                result["defaults_over_seeds"] = _seeds(summary)
                continue
            result[f"{name}_seeds_wall_s"] = round(_timed(
                [TRIVIEW, "run", "--data", args.data, "--out", str(out / f"seeds-{name}"),
                 "--repeats", str(args.seeds), *extra], out / f"seeds-{name}.log"), 1)
            summary = json.loads((out / f"seeds-{name}" / "run_summary.json").read_text())
            result[f"{name}_over_seeds"] = _seeds(summary)
    result["cpu_s"] = CPU
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
