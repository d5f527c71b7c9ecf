"""``triview`` command line: a thin layer over the library and the pipeline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from triview.demo import write_digits

    counts = write_digits(args.dir, size=args.size, per_class=args.per_class)
    print(f"wrote {sum(counts.values())} digit images in {len(counts)} class folders to {args.dir}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from triview.stages import ingest_stage

    rec = ingest_stage(args.data, args.out, seed=args.seed, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, min_size=args.min_size)
    c = rec["counts"]
    print(f"{c['input']} files: {c['train']} train, {c['val']} val, {c['test']} test, "
          f"{c['quarantined']} quarantined -> {args.out}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from triview.calibration import calibrate_glob, parse_pattern

    cal = calibrate_glob(args.images, pattern=parse_pattern(args.pattern), square=args.square)
    cal.save(args.out)
    used = len(cal.per_view_error)
    print(f"calibrated from {used} images ({len(cal.rejected)} without a board): "
          f"rms {cal.rms:.4f} px, fx {cal.K[0][0]:.1f} fy {cal.K[1][1]:.1f} "
          f"cx {cal.K[0][2]:.1f} cy {cal.K[1][2]:.1f} -> {args.out}")
    return 0


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected LABEL=VALUE, got {text!r}")
    return key, value


def _cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.platform import PlatformOptions
    from pipelines.triview_pipeline import compile_pipeline

    custom = any(v is not None for v in (args.gpu_pool, args.gpu_toleration, args.gpus,
                                         args.cpu_pool, args.minio_secret))
    options = None
    if custom:
        defaults = PlatformOptions()
        options = PlatformOptions(
            gpus=defaults.gpus if args.gpus is None else args.gpus,
            gpu_pool=_label(args.gpu_pool) if args.gpu_pool else None,
            gpu_toleration=args.gpu_toleration,
            cpu_pool=_label(args.cpu_pool) if args.cpu_pool else None,
            minio_secret=args.minio_secret or defaults.minio_secret)
    compile_pipeline(args.output, options)
    print(f"compiled pipeline IR to {args.output}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.local import parse_params, run_local

    summary = run_local(args.data, args.out, parse_params(args.param))
    print(format_summary(summary))
    print(f"summary: {Path(args.out) / 'run_summary.json'}")
    return 0


def format_summary(summary: dict) -> str:
    lines = ["", "view        accuracy  macro-F1"]
    for view, s in summary["views"].items():
        lines.append(f"{view:<10}  {s['accuracy']:8.4f}  {s['macro_f1']:8.4f}")
    e = summary["ensemble"]
    lines.append(f"{'ensemble':<10}  {e['accuracy']:8.4f}  {e['macro_f1']:8.4f}  ({e['method']})")
    c = summary["counts"]
    lines.append(f"images: {c['train']} train / {c['val']} val / {c['test']} test, "
                 f"{c['quarantined']} quarantined")
    total = sum(s["seconds"] for s in summary["stages"].values())
    lines.append(f"stages: {total:.1f} s in stages, {summary.get('dag_seconds', total):.1f} s DAG wall time")
    lines.append(f"model:  {summary['artifacts']['model']}")
    lines.append(f"report: {summary['artifacts']['report']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triview", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write scikit-learn's digits as a JPEG image-folder data set")
    p.add_argument("dir")
    p.add_argument("--size", type=int, default=64, help="side of the upscaled images (default 64)")
    p.add_argument("--per-class", type=int, default=None, help="keep at most N images per class")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("ingest", help="ingest a folder or ZIP into a manifest + quarantine report")
    p.add_argument("--data", required=True, help="folder or ZIP of class folders")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--min-size", type=int, default=8)
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("calibrate", help="calibrate a camera from chessboard photos")
    p.add_argument("--images", required=True, help="glob of chessboard photos, e.g. 'calib/*.jpg'")
    p.add_argument("--pattern", default="9x6", help="inner corners per row x column (default 9x6)")
    p.add_argument("--square", type=float, default=1.0, help="square side, in your unit (default 1.0)")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    p.add_argument("-o", "--output", default="pipelines/triview.yaml")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per train-branch task (default 1; 0: CPU)")
    p.add_argument("--gpu-pool", metavar="LABEL=VALUE", help="node label of the GPU node pool")
    p.add_argument("--gpu-toleration", metavar="KEY", help="taint key the GPU nodes carry")
    p.add_argument("--cpu-pool", metavar="LABEL=VALUE", help="node label for the light stages")
    p.add_argument("--minio-secret", metavar="NAME", help="Secret with accesskey/secretkey "
                   "(default triview-minio)")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("run", help="run the whole DAG locally with kfp.local")
    p.add_argument("--data", required=True, help="folder or ZIP of class folders")
    p.add_argument("--out", required=True, help="output folder (pipeline root + run_summary.json)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, repeatable (e.g. --param epochs=4)")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"triview {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
