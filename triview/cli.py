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


#: Extra spellings of stage flags (``--validation-split`` as in Keras); repeatable flags
#: (``--remap a->b --remap c->d``) are joined with commas into the parameter's value.
_FLAG_ALIASES = {"val_fraction": ("--validation-split",), "label_remap": ("--remap",),
                 "label_drop": ("--drop",), "allowed_roots": ("--allow-root",)}
_REPEATABLE = ("label_remap", "label_drop", "allowed_roots")


def add_stage_flags(parser: argparse.ArgumentParser, stage: str) -> None:
    """One ``--flag`` per spec parameter of ``stage`` (typed, checked, with the spec's
    default and help)."""
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


def _cmd_ingest(args: argparse.Namespace) -> int:
    from triview.stages import ingest_stage
    from triview.storage import StorageError

    try:
        rec = ingest_stage(args.data, args.out, workers=args.workers, plot=not args.no_plot,
                           allow_empty=True, **stage_flag_values(args, "ingest"))
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
    width, height = cal.image_size
    print(f"calibrated from {used} of {used + len(cal.rejected)} images ({width}x{height}): "
          f"rms {cal.rms:.4f} px, fx {cal.K[0][0]:.1f} fy {cal.K[1][1]:.1f} "
          f"cx {cal.K[0][2]:.1f} cy {cal.K[1][2]:.1f} -> {args.out}")
    for name, why in cal.rejected.items():
        print(f"  not used: {name}: {why}")
    return 0


def _options(args: argparse.Namespace):
    """PlatformOptions from the shared cluster flags (None: the committed defaults)."""
    from pipelines.platform import options_from_flags

    return options_from_flags(gpus=args.gpus, gpu_pool=args.gpu_pool,
                              gpu_toleration=args.gpu_toleration, cpu_pool=args.cpu_pool,
                              minio_secret=args.minio_secret, image=args.image,
                              gpu_image=args.gpu_image, serve_image=args.serve_image,
                              pipeline_root=getattr(args, "compile_pipeline_root", None))


def _cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.triview_pipeline import compile_pipeline

    compile_pipeline(args.output, _options(args))
    print(f"compiled pipeline IR to {args.output}")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from triview import weights

    if args.action == "stage":
        if not args.backbones or not args.to:
            raise ValueError("weights stage needs BACKBONE... and --to DIR_OR_S3")
        for row in weights.stage(args.backbones, args.to, source_file=args.source,
                                 download=args.download, allow_unpublished=args.allow_unpublished):
            own = "" if row.get("published_hash_match", True) else ", NOT the published file"
            print(f"staged {row['backbone']}: {row['file']} ({row['bytes']} bytes, sha256 "
                  f"{row['sha256'][:16]}..., from {row['staged_from']}{own}) -> {args.to}")
        return 0
    if args.backbones:
        raise ValueError("weights list takes no backbones (use --from to list a mirror)")
    if args.source:
        rows = weights.list_mirror(args.source)
        for row in rows:
            origin = (row["source_url"] if row.get("published_hash_match", True)
                      else f"own file staged under {row['file']} (not the published one)")
            print(f"{row['backbone']:<20} {row['file']:<36} sha256 {row['sha256'][:16]}...  "
                  f"{row['bytes']:>10} bytes  {origin}")
        if not rows:
            print(f"(no staged weights in {args.source})")
        return 0
    for row in weights.available():
        where = f"{row['source']}: {row['location']}" if row["source"] else "not available here"
        print(f"{row['backbone']:<20} {where}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    import json

    from triview import params as spec

    if args.format == "json":
        print(json.dumps([{"name": p.name, "type": p.type.__name__, "default": p.default,
                           "allowed": p.describe_range(), "stage": p.stage,
                           "stages": list(p.stages), "help": p.help}
                          for p in spec.PARAMS.values()
                          if args.stage is None or args.stage in p.stages], indent=2))
        return 0
    for stage in spec.STAGES:
        names = [n for n in spec.names(stage) if spec.PARAMS[n].stage == stage
                 or (args.stage is not None and args.stage == stage)]
        if not names or (args.stage is not None and stage != args.stage):
            continue
        print(f"[{stage}]")
        for name in names:
            p = spec.PARAMS[name]
            allowed = p.describe_range()
            print(f"  {name} ({p.type.__name__}, default {p.default!r}{'; ' + allowed if allowed else ''})")
            print(f"      {p.help}")
    return 0


def _checked_run_params(args: argparse.Namespace) -> dict:
    """The preset's values, then ``--param`` values (and ``--repeats``) over them, typed and
    checked against the spec; nothing heavy is imported before this, so a bad value is
    refused in well under a second."""
    from triview.params import load_preset, parse_pairs, validate

    params = validate({**(load_preset(args.preset) if args.preset else {}),
                       **parse_pairs(args.param)})
    if getattr(args, "repeats", None) is not None:
        if "repeats" in params and params["repeats"] != args.repeats:
            raise ValueError(f"--repeats {args.repeats} contradicts --param repeats={params['repeats']}")
        params = validate({**params, "repeats": args.repeats})
    return params


def _cmd_run(args: argparse.Namespace) -> int:
    params = _checked_run_params(args)
    if not Path(args.data).exists():
        raise FileNotFoundError(f"input {args.data!r} does not exist")
    from pipelines.console import TaskFailed
    from pipelines.local import run_local
    from pipelines.runners import DockerRunnerError

    try:
        summary = run_local(args.data, args.out, params, verbose=args.verbose, runner=args.runner)
    except TaskFailed as exc:   # one clear block: the task, why, its log
        print(exc.report(), file=sys.stderr)
        return 1
    except DockerRunnerError as exc:
        print(f"triview run: error: {exc}", file=sys.stderr)
        return 1
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
    lines += versus_lines(summary)
    return "\n".join(lines)


def versus_lines(summary: dict) -> list[str]:
    """The last lines of a run: calibration, and whether the ensemble beats its best view
    (per seed with repeats), in test images."""
    e, lines = summary["ensemble"], []
    if e.get("ece") is not None and e.get("ece_before") is not None:
        lines.append(f"calibration: ensemble ECE {e['ece']:.3f} after temperature scaling "
                     f"({e['ece_before']:.3f} before)")
    per_seed = (summary.get("repeats") or {}).get("versus_best_view")
    if per_seed:
        for v in per_seed:
            lines.append(f"seed {v['seed']}: {v['statement']}")
    elif summary.get("versus_best_view"):
        lines.append(summary["versus_best_view"]["statement"])
    return lines


def _cluster_call(args: argparse.Namespace, action, check=lambda: None) -> int:
    """Check everything first (parameters against the spec before kfp is even imported,
    then ``check()``, the pipeline root and the cluster flags), then connect and print
    what ``action(client, params, shared)`` says; an API failure is exit 1."""
    values = _checked_run_params(args)
    from pipelines.client import ClusterError, check_params, check_pipeline_root, connect

    check()
    params = check_params({"data": args.data, **values})
    check_pipeline_root(args.pipeline_root)
    options = _options(args)
    shared = dict(experiment=args.experiment, pipeline_root=args.pipeline_root,
                  namespace=args.namespace, service_account=args.service_account,
                  options=options, enable_caching=False if args.no_cache else None)
    try:
        client = connect(args.host, args.namespace, args.token)
        print(action(client, params, shared))
    except ClusterError as exc:
        print(f"triview {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    def action(client, params, shared) -> str:
        from pipelines.client import submit

        run_id = submit(client, params=params, run_name=args.run_name, **shared)
        return f"submitted run {run_id} in experiment {args.experiment!r}"
    return _cluster_call(args, action)


def _cmd_schedule(args: argparse.Namespace) -> int:
    def when() -> dict:
        from pipelines.client import trigger

        return trigger(args.cron, args.interval)

    def action(client, params, shared) -> str:
        from pipelines.client import schedule

        rr_id = schedule(client, params=params, cron=args.cron, interval=args.interval,
                         job_name=args.job_name, **shared)
        trigger = when()
        every = (f"cron '{trigger['cron_expression']}'" if "cron_expression" in trigger
                 else f"every {trigger['interval_second']} s")
        return (f"scheduled recurring run {rr_id} ({args.job_name!r}, {every}, max 1 concurrent "
                f"run, no catch-up) in experiment {args.experiment!r}")
    return _cluster_call(args, action, check=when)


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


# --- issue 15: serving ------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from triview.serving import has_kserve, serve_argv, serve_command

    if has_kserve():  # this interpreter is the serving environment
        from triview.serving.server import main as serve_main

        return serve_main(serve_argv(args))
    command = serve_command(serve_argv(args))  # FileNotFoundError: exit 2 with the hint
    os.execv(command[0], command)  # the serving venv's Python replaces this process


def _cmd_deploy(args: argparse.Namespace) -> int:
    from triview import deploy as dp

    if not (args.emit or args.apply):
        raise ValueError("give --emit FILE (or -) and/or --apply")
    version = args.version
    if version != "champion" and not version.isdigit():
        raise ValueError(f"--version must be a number or 'champion', got {version!r}")
    spec = f"{args.registry.rstrip('/')}/{args.model_name}@{version}"
    opts = dp.ServingOptions(image=args.image or dp.SERVE_IMAGE, cpu_request=args.cpu, cpu_limit=args.cpu_limit,
                             memory_request=args.memory, memory_limit=args.memory_limit,
                             min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                             canary_traffic_percent=args.canary_traffic_percent,
                             max_batch_size=args.max_batch_size, max_latency_ms=args.max_latency_ms)
    objects = dp.serving_objects(spec, args.name, args.namespace, opts, args.isvc_only,
                                 args.s3_endpoint, args.s3_usehttps == 1, args.s3_region)
    if args.emit:
        text = dp.to_yaml(objects)
        if args.emit == "-":
            print(text, end="")
        else:
            from triview.storage import atomic_write_text

            atomic_write_text(args.emit, text)
            print(f"wrote {', '.join(o['kind'] for o in objects)} for {spec} to {args.emit}",
                  file=sys.stderr)
    if args.apply:
        applied = dp.apply(objects, dp.kube_api_client(args.kubeconfig))
        print(f"applied {', '.join(o['kind'] + '/' + o['metadata']['name'] for o in applied)} "
              f"in {args.namespace}", file=sys.stderr)
    return 0


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
    add_stage_flags(p, "ingest")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--no-plot", action="store_true", help="skip stats.png")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("calibrate", help="calibrate a camera from chessboard photos")
    p.add_argument("--images", required=True, help="glob of chessboard photos, e.g. 'calib/*.jpg'")
    p.add_argument("--pattern", default="9x6", help="inner corners per row x column (default 9x6)")
    p.add_argument("--square", type=float, default=1.0, help="square side, in your unit (default 1.0)")
    p.add_argument("--out", default="calib.json",
                   help="calibration JSON to write (default calib.json)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    p.add_argument("-o", "--output", default="pipelines/triview.yaml")
    p.add_argument("--pipeline-root", dest="compile_pipeline_root", metavar="minio://BUCKET/PATH",
                   help="default artifact root written into the IR (default: the cluster's, "
                   "from the kfp-launcher ConfigMap)")
    compile_p = p
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("weights", help="published ImageNet weights: list what resolves here or "
                       "what a mirror holds; stage them into a mirror (a folder or s3://) for "
                       "clusters without internet")
    p.add_argument("action", choices=("list", "stage"))
    p.add_argument("backbones", nargs="*", metavar="BACKBONE")
    p.add_argument("--to", metavar="DIR_OR_S3", help="stage: the mirror to fill")
    p.add_argument("--from", dest="source", metavar="FILE_OR_MIRROR",
                   help="stage: the weights file to stage (one backbone); list: the mirror to list")
    p.add_argument("--download", action="store_true",
                   help="stage: download from the published URL when no local copy is found "
                   "(needs network; never done at run time)")
    p.add_argument("--allow-unpublished", action="store_true",
                   help="stage: accept a --from FILE whose hash differs from the published one "
                   "(your own weights); its manifest records that")
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser("params", help="the pipeline parameters: type, default, allowed values, "
                       "stage and help (the spec in triview/params.py)")
    p.add_argument("--stage", default=None, help="only the parameters this stage reads")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("run", help="run the whole DAG locally with kfp.local")
    p.add_argument("--data", required=True, help="folder or ZIP of class folders")
    p.add_argument("--out", required=True, help="output folder (pipeline root + run_summary.json)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, repeatable (e.g. --param epochs=4)")
    p.add_argument("--preset", default=None, metavar="NAME|FILE",
                   help="parameter values from a preset (e.g. digits, the `make run` demo) or a "
                   "YAML file of name: value; --param values override them")
    p.add_argument("--repeats", type=int, default=None,
                   help="train N seeds seed..seed+N-1 in the one run (the pipeline's `repeats` "
                   "parameter) and report mean ± SD of every test metric (default 1)")
    p.add_argument("--verbose", action="store_true",
                   help="stream every task's full output (kfp.local's executor logs) instead "
                   "of one line per task; the logs are in OUT/logs/ either way")
    p.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="subprocess: every task in this venv (default); docker: every task in the "
                   "image the compiled IR names, as a restricted pod (uid 10001, read-only root, "
                   "no capabilities, no network, the task's CPU/memory limits; `make images` first)")
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

    from triview.serving import SERVE_DESCRIPTION, add_serve_arguments  # issue 15

    p = sub.add_parser("serve", help="serve an exported model with KServe (v1/v2 REST, health, "
                       "metrics); runs in the serving environment (make serve-env)",
                       description=SERVE_DESCRIPTION)
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("deploy", help="write (or server-side apply) the KServe InferenceService, "
                       "ServingRuntime and ServiceAccount for a registry version")
    p.add_argument("--emit", metavar="FILE", help="write the objects as YAML ('-': stdout)")
    p.add_argument("--apply", action="store_true", help="server-side apply them (in-cluster "
                   "service account, else the kubeconfig)")
    p.add_argument("--kubeconfig", help="kubeconfig file for --apply (default ~/.kube/config)")
    p.add_argument("--registry", required=True, metavar="s3://BUCKET/PREFIX",
                   help="the model registry (as the pipeline's `registry` parameter)")
    p.add_argument("--model-name", default="triview", help="registry model name (default triview)")
    p.add_argument("--version", default="champion", help="N or champion (default champion)")
    p.add_argument("--name", help="InferenceService name and route model name (default: model name)")
    p.add_argument("--namespace", default="triview", help="namespace (default triview)")
    p.add_argument("--image", default=None, metavar="REF:TAG",
                   help="serving image (default $TRIVIEW_SERVE_IMAGE or "
                   "ghcr.io/triview/triview-serve:0.1.0; pinned, not :latest)")
    p.add_argument("--canary-traffic-percent", type=int, default=None, metavar="N",
                   help="send N%% of traffic to this version, the rest to the last ready one")
    p.add_argument("--cpu", default="500m", help="CPU request (default 500m)")
    p.add_argument("--cpu-limit", default="2", help="CPU limit (default 2)")
    p.add_argument("--memory", default="512Mi", help="memory request (default 512Mi)")
    p.add_argument("--memory-limit", default="1Gi", help="memory limit (default 1Gi)")
    p.add_argument("--min-replicas", type=int, default=1, help="default 1 (0: scale to zero)")
    p.add_argument("--max-replicas", type=int, default=3, help="default 3")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="KServe's batcher (agent sidecar, v1 requests): merge up to N instances")
    p.add_argument("--max-latency-ms", type=int, default=None,
                   help="batcher: wait at most this long for a batch (default 100)")
    p.add_argument("--s3-endpoint", default="minio-service.kubeflow:9000",
                   help="MinIO host:port as the cluster sees it (storage initializer)")
    p.add_argument("--s3-usehttps", type=int, choices=(0, 1), default=0, help="default 0")
    p.add_argument("--s3-region", default="us-east-1", help="default us-east-1")
    p.add_argument("--isvc-only", action="store_true", help="only the InferenceService (the "
                   "`serving` kustomize component installed the ServiceAccount and runtime)")
    p.set_defaults(func=_cmd_deploy)

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
        p.add_argument("--preset", default=None, metavar="NAME|FILE",
                       help="parameter values from a preset or YAML file (--param overrides)")
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
        p.add_argument("--serve-image", metavar="REF:TAG", help="predictor image the deploy step "
                       "puts in the InferenceService (default $TRIVIEW_SERVE_IMAGE or "
                       "ghcr.io/triview/triview-serve:0.1.0)")
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
