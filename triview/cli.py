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
    from triview.ingest import parse_remap
    from triview.stages import ingest_stage
    from triview.storage import StorageError

    try:
        rec = ingest_stage(args.data, args.out, seed=args.seed, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, min_size=args.min_size,
                           max_pixels=args.max_pixels, remap=parse_remap(args.remap),
                           drop=tuple(d for spec in args.drop for d in spec.split(",") if d),
                           min_per_class=args.min_per_class,
                           near_duplicate_distance=args.near_duplicate_distance,
                           workers=args.workers, plot=not args.no_plot, allow_empty=True)
    except StorageError as exc:  # S3 unreachable or refusing: a message, not a trace
        print(f"triview ingest: error: {exc}", file=sys.stderr)
        return 2
    c = rec["counts"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rec.get("quarantine_reasons", {}).items()))
    print(f"{c['input']} files: {c['train']} train, {c['val']} val, {c['test']} test, "
          f"{c['quarantined']} quarantined{f' ({reasons})' if reasons else ''} -> {args.out}")
    print(f"dataset_version {rec['dataset_version']}")
    if rec["items_out"] == 0:  # every file is accounted for, but nothing to train on
        print(f"triview ingest: warning: no usable images in {args.data}; "
              f"see {Path(args.out) / 'quarantine.csv'}", file=sys.stderr)
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


def _options(args: argparse.Namespace):
    """PlatformOptions from the shared cluster flags (None: the committed defaults)."""
    from pipelines.platform import options_from_flags

    return options_from_flags(gpus=args.gpus, gpu_pool=args.gpu_pool,
                              gpu_toleration=args.gpu_toleration, cpu_pool=args.cpu_pool,
                              minio_secret=args.minio_secret, image=args.image,
                              gpu_image=args.gpu_image,
                              pipeline_root=getattr(args, "compile_pipeline_root", None))


def _cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.triview_pipeline import compile_pipeline

    compile_pipeline(args.output, _options(args))
    print(f"compiled pipeline IR to {args.output}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.local import parse_params, run_local

    params = parse_params(args.param)
    if args.repeats is not None:
        if "repeats" in params and params["repeats"] != args.repeats:
            raise ValueError(f"--repeats {args.repeats} contradicts --param repeats={params['repeats']}")
        params["repeats"] = args.repeats
    summary = run_local(args.data, args.out, params)
    print(format_summary(summary))
    print(f"summary: {Path(args.out) / 'run_summary.json'}")
    return 0


def format_summary(summary: dict) -> str:
    lines = ["", "view        accuracy  macro-F1"]
    for view, s in summary["views"].items():
        lines.append(f"{view:<10}  {s['accuracy']:8.4f}  {s['macro_f1']:8.4f}")
    e = summary["ensemble"]
    lines.append(f"{'ensemble':<10}  {e['accuracy']:8.4f}  {e['macro_f1']:8.4f}  ({e['method']})")
    rep = summary.get("repeats")
    if rep:
        lines.append(f"over {rep['n']} seeds {rep['seeds']}: mean ± SD of macro-F1")
        for view, m in rep["views"].items():
            lines.append(f"{view:<10}  {m['macro_f1']['mean']:.4f} ± {m['macro_f1']['sd']:.4f}")
        e_f1 = rep["ensemble"]["macro_f1"]
        lines.append(f"{'ensemble':<10}  {e_f1['mean']:.4f} ± {e_f1['sd']:.4f}")
    c = summary["counts"]
    lines.append(f"images: {c['train']} train / {c['val']} val / {c['test']} test, "
                 f"{c['quarantined']} quarantined")
    total = sum(s["seconds"] for s in summary["stages"].values())
    lines.append(f"stages: {total:.1f} s in stages, {summary.get('dag_seconds', total):.1f} s DAG wall time")
    lines.append(f"model:  {summary['artifacts']['model']}")
    lines.append(f"report: {summary['artifacts']['report']}")
    return "\n".join(lines)


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.client import ClusterError, check_params, check_pipeline_root, connect, submit
    from pipelines.local import parse_params

    # Everything is checked before the client connects.
    params = check_params({"data": args.data, **parse_params(args.param)})
    check_pipeline_root(args.pipeline_root)
    options = _options(args)
    try:
        client = connect(args.host, args.namespace, args.token)
        run_id = submit(client, params=params, experiment=args.experiment, run_name=args.run_name,
                        pipeline_root=args.pipeline_root, namespace=args.namespace,
                        service_account=args.service_account, options=options,
                        enable_caching=False if args.no_cache else None)
    except ClusterError as exc:
        print(f"triview submit: error: {exc}", file=sys.stderr)
        return 1
    print(f"submitted run {run_id} in experiment {args.experiment!r}")
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.client import (ClusterError, check_params, check_pipeline_root, connect,
                                  schedule, trigger)
    from pipelines.local import parse_params

    when = trigger(args.cron, args.interval)
    params = check_params({"data": args.data, **parse_params(args.param)})
    check_pipeline_root(args.pipeline_root)
    options = _options(args)
    try:
        client = connect(args.host, args.namespace, args.token)
        rr_id = schedule(client, params=params, cron=args.cron, interval=args.interval,
                         experiment=args.experiment, job_name=args.job_name,
                         pipeline_root=args.pipeline_root, namespace=args.namespace,
                         service_account=args.service_account, options=options,
                         enable_caching=False if args.no_cache else None)
    except ClusterError as exc:
        print(f"triview schedule: error: {exc}", file=sys.stderr)
        return 1
    every = (f"cron '{when['cron_expression']}'" if "cron_expression" in when
             else f"every {when['interval_second']} s")
    print(f"scheduled recurring run {rr_id} ({args.job_name!r}, {every}, max 1 concurrent run, "
          f"no catch-up) in experiment {args.experiment!r}")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from pipelines.client import ClusterError, connect, format_runs, list_runs

    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    try:
        client = connect(args.host, args.namespace, args.token)
        rows = list_runs(client, experiment=args.experiment, namespace=args.namespace,
                         limit=args.limit)
    except ClusterError as exc:
        print(f"triview runs: error: {exc}", file=sys.stderr)
        return 1
    print(format_runs(rows))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from triview.predict import Predictor, expand_inputs, format_table

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    paths = expand_inputs(args.images)
    if not paths:
        raise ValueError("no image files given")
    predictor = Predictor(args.model)
    results = predictor.predict(paths, threshold=args.threshold)
    if args.format == "json":
        for r in results:
            print(json.dumps(r.to_json()))
    else:
        print(format_table(predictor, results))
    for r in results:
        if r.error:
            print(f"triview predict: error: {r.path}: {r.error}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triview", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write scikit-learn's digits as a JPEG image-folder data set")
    p.add_argument("dir")
    p.add_argument("--size", type=int, default=64, help="side of the upscaled images (default 64)")
    p.add_argument("--per-class", type=int, default=None, help="keep at most N images per class")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("ingest", help="ingest a folder, ZIP, CSV/Parquet table or s3:// prefix "
                       "into a manifest + quarantine report + statistics")
    p.add_argument("--data", required=True, help="folder or ZIP of class folders (or a YOLO-classify/"
                   "Roboflow ZIP with data.yaml), CSV/Parquet multi-label table, or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="output folder (or s3:// prefix)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", "--validation-split", type=float, default=0.15,
                   help="validation share carved when the input has no val split (default 0.15)")
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--min-size", type=int, default=8, help="quarantine images whose shorter side "
                   "is below this (default 8)")
    p.add_argument("--max-pixels", type=int, default=100_000_000,
                   help="decompression-bomb cap in pixels (default 100M)")
    p.add_argument("--remap", action="append", default=[], metavar="OLD->NEW",
                   help="rename or merge a label, repeatable (e.g. --remap 'kitty->cat')")
    p.add_argument("--drop", action="append", default=[], metavar="LABEL",
                   help="drop a label, repeatable (images left without a label are quarantined)")
    p.add_argument("--min-per-class", type=int, default=0,
                   help="quarantine classes with fewer used images than this (default 0: off)")
    p.add_argument("--near-duplicate-distance", type=int, default=3,
                   help="report image pairs within this dHash distance, 0..3 (-1: off)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--no-plot", action="store_true", help="skip stats.png")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("calibrate", help="calibrate a camera from chessboard photos")
    p.add_argument("--images", required=True, help="glob of chessboard photos, e.g. 'calib/*.jpg'")
    p.add_argument("--pattern", default="9x6", help="inner corners per row x column (default 9x6)")
    p.add_argument("--square", type=float, default=1.0, help="square side, in your unit (default 1.0)")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    p.add_argument("-o", "--output", default="pipelines/triview.yaml")
    p.add_argument("--pipeline-root", dest="compile_pipeline_root", metavar="minio://BUCKET/PATH",
                   help="default artifact root written into the IR (default: the cluster's, "
                   "from the kfp-launcher ConfigMap)")
    compile_p = p
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("run", help="run the whole DAG locally with kfp.local")
    p.add_argument("--data", required=True, help="folder or ZIP of class folders")
    p.add_argument("--out", required=True, help="output folder (pipeline root + run_summary.json)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, repeatable (e.g. --param epochs=4)")
    p.add_argument("--repeats", type=int, default=None,
                   help="train N seeds seed..seed+N-1 in the one run (the pipeline's `repeats` "
                   "parameter) and report mean ± SD of every test metric (default 1)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("predict", help="predict images with an exported ensemble (local or s3://)")
    p.add_argument("--model", required=True, metavar="DIR_OR_URI",
                   help="exported model folder, or a registry model folder (models/<name>: its "
                   "champion) or version (models/<name>/<version>), local or s3://")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--threshold", type=float, default=None,
                   help="also list classes scoring at least this (default 0.5); multi-label: only "
                        "those (default: the per-label thresholds tuned on validation)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table with per-class counts, or one JSON object per image (default table)")
    p.set_defaults(func=_cmd_predict)

    submit_p = sub.add_parser("submit",
                              help="start a run of the DAG on a Kubeflow Pipelines cluster")
    submit_p.add_argument("--run-name", help="run name (default 'triview <date time>')")
    submit_p.set_defaults(func=_cmd_submit)
    schedule_p = sub.add_parser("schedule", help="create a recurring run (max 1 at a time, no "
                                "catch-up; each run passes the champion/challenger gate)")
    when = schedule_p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="CRON", help="KFP's 6-field cron, seconds "
                      "first, e.g. '0 0 3 * * 0' (Sundays 03:00)")
    when.add_argument("--interval", metavar="DURATION",
                      help="seconds or a duration: 24h, 7d, 1h30m")
    schedule_p.add_argument("--job-name", default="triview-retrain",
                            help="recurring run name (default triview-retrain)")
    schedule_p.set_defaults(func=_cmd_schedule)
    runs_p = sub.add_parser("runs", help="list the newest runs on a Kubeflow Pipelines cluster")
    runs_p.add_argument("--experiment", default=None, help="only runs of this experiment")
    runs_p.add_argument("--limit", type=int, default=20, help="how many runs (default 20)")
    runs_p.set_defaults(func=_cmd_runs)
    for p in (submit_p, schedule_p, runs_p):
        p.add_argument("--host", help="KFP API URL, e.g. http://localhost:8080 (default: "
                       "$KF_PIPELINES_ENDPOINT, else in-cluster or kubeconfig, as kfp.Client)")
        p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
        p.add_argument("--token", help="bearer token (default $KFP_TOKEN; prefer the variable: "
                       "command lines show up in ps and shell history)")
    for p in (submit_p, schedule_p):
        p.add_argument("--data", required=True,
                       help="input folder or ZIP as the ingest pod sees it")
        p.add_argument("--experiment", default="triview",
                       help="experiment, created if missing (default triview)")
        p.add_argument("--pipeline-root", metavar="minio://BUCKET/PATH",
                       help="where the run's artifacts go (default: the cluster's)")
        p.add_argument("--service-account", default="triview-pipeline-runner",
                       help="Kubernetes service account of the run's pods")
        p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="pipeline parameter, repeatable (e.g. --param epochs=4)")
        p.add_argument("--no-cache", action="store_true",
                       help="disable caching for every task (default: as compiled)")
    for p in (compile_p, submit_p, schedule_p):  # the same cluster settings everywhere
        p.add_argument("--gpus", type=int, default=None,
                       help="GPUs per train-branch task (default 1; 0: CPU)")
        p.add_argument("--gpu-pool", metavar="LABEL=VALUE", help="node label of the GPU node pool")
        p.add_argument("--gpu-toleration", metavar="KEY", help="taint key the GPU nodes carry")
        p.add_argument("--cpu-pool", metavar="LABEL=VALUE", help="node label for the light stages")
        p.add_argument("--minio-secret", metavar="NAME", help="Secret with accesskey/secretkey "
                       "(default triview-minio)")
        p.add_argument("--image", metavar="REF:TAG", help="image of the light stages "
                       "(default $TRIVIEW_IMAGE or ghcr.io/triview/triview-cpu:0.1.0)")
        p.add_argument("--gpu-image", metavar="REF:TAG", help="image of train-branch "
                       "(default $TRIVIEW_GPU_IMAGE or ghcr.io/triview/triview-gpu:0.1.0)")
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
