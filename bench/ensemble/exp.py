"""Run named recipe configurations over seeds and/or random splits; append JSON lines.

    python exp.py NAME [--splits fixed|random] [--n 3] key=value ...
"""
import argparse
import json
import sys
from pathlib import Path
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402


def parse(v):
    if v in ("true", "false"):
        return v == "true"
    if "," in v or v == "":
        return tuple(x for x in v.split(",") if x)
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--splits", default="fixed")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results_ensemble_recipes.jsonl"))
    ap.add_argument("kv", nargs="*")
    a = ap.parse_intermixed_args()
    kw = {}
    for pair in a.kv:
        k, v = pair.split("=", 1)
        kw[k] = parse(v)
        if k in ("train_passes", "tta", "views") and not isinstance(kw[k], tuple):
            kw[k] = (kw[k],)
    r = H.Recipe(**kw)
    results = []
    t = time.perf_counter()
    for k in range(a.n):
        if a.splits == "fixed":
            res = H.evaluate(r, seed=k)
        else:
            res = H.evaluate(r, seed=k, split=H.random_split(r.dataset, k))
        results.append(res)
    s = H.summarise(results)
    line = {"name": a.name, "splits": a.splits, "n": a.n, "recipe": H.asdict(r), **s,
            "wall": time.perf_counter() - t,
            "per_run": [{"views": {v: x["views"][v]["acc"] for v in x["views"]},
                         "ens": {k2: x["ensemble"][k2]["acc"] for k2 in x["ensemble"]},
                         "l2": x["l2"]} for x in results]}
    with open(a.out, "a") as fh:
        fh.write(json.dumps(line, default=float) + "\n")
    views = " ".join(f"{v} {m['mean']:.3f}±{m['sd']:.3f}" for v, m in s["views"].items())
    print(f"== {a.name} [{a.splits} x{a.n}] {views}  ({line['wall']:.0f} s)")
    for rule, e in s["ensemble"].items():
        print(f"   {rule:13s} {e['mean']:.3f}±{e['sd']:.3f} gap {e['gap_vs_best_view']:+.3f} "
              f"worst {e['worst_gap']:+.3f} ece {e['ece_before']:.3f}->{e['ece']:.3f}  {e['names']}")


if __name__ == "__main__":
    main()
