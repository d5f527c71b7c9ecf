"""CPU inference latency of an exported ensemble: ONNX Runtime against eager PyTorch.

Both run the whole ensemble (three views + voter) at batch 1 on the same inputs, in
the same process, with the same number of threads, alternating in rounds so that load
from other processes hits both alike. Writes
``{"onnx_ms", "eager_ms", "onnx_over_eager", "max_abs_diff", ...}``.

    python bench/inference.py --model runs/demo/.../model --json bench/results_inference.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from triview.evaluate import device_name  # noqa: E402
from triview.export import load_eager  # noqa: E402
from triview.runtime import onnx_feed, onnx_session  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported model folder (model_card.json, ...)")
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per engine (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="threads for both engines (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    eager, card = load_eager(args.model)
    session = onnx_session(Path(args.model) / card["files"]["onnx"], threads=args.threads)
    n_views = len(card["views"])
    rng = np.random.default_rng(args.seed)
    size = card["image_size"]
    samples = [[rng.random((1, 3, size, size), dtype=np.float32) for _ in range(n_views)]
               for _ in range(16)]

    def run_eager(inputs):
        with torch.no_grad():
            return eager(*[torch.from_numpy(x) for x in inputs]).numpy()

    def run_onnx(inputs):
        return session.run(None, onnx_feed(session, inputs))[0]

    diff = max(float(np.abs(run_eager(s) - run_onnx(s)).max()) for s in samples)
    for _ in range(5):  # warm-up (allocators, oneDNN primitives, ORT arenas)
        run_eager(samples[0])
        run_onnx(samples[0])
    times: dict[str, list[float]] = {"eager": [], "onnx": []}
    rounds = 10
    per_round = max(1, args.runs // rounds)
    for r in range(rounds):  # alternate engines so background load is shared fairly
        for name, fn in (("eager", run_eager), ("onnx", run_onnx)):
            for i in range(per_round):
                start = time.perf_counter()
                fn(samples[(r * per_round + i) % len(samples)])
                times[name].append(time.perf_counter() - start)
    eager_ms = 1000 * statistics.median(times["eager"])
    onnx_ms = 1000 * statistics.median(times["onnx"])
    figures = {"onnx_ms": round(onnx_ms, 4), "eager_ms": round(eager_ms, 4),
               "onnx_over_eager": round(onnx_ms / eager_ms, 4), "max_abs_diff": diff,
               "batch": 1, "threads": args.threads, "runs": per_round * rounds,
               "device": device_name(), "views": card["views"], "image_size": size,
               "backbones": sorted({t["config"]["backbone"] for t in card["training"].values()})}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
