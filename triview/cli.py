"""``triview`` command line: a thin layer over the library and the pipeline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from triview.cli_parser import (CommandParser, add_cluster_flags, add_cluster_run_flags,
                                add_kfp_connection_flags, add_stage_flags, stage_flag,
                                stage_flag_values)


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from triview.demo import write_digits

    counts = write_digits(args.dir, size=args.size, per_class=args.per_class)
    print(f"wrote {sum(counts.values())} digit images in {len(counts)} class folders to {args.dir}")
    return 0


def _preflight(data: str, out: str, params: dict) -> None:
    """Before any task: the output is not inside the data, and the data has classes the
    pipeline can split and train (:mod:`triview.preflight`; IngestError names the fix)."""
    from triview import params as spec
    from triview.preflight import check_layout, check_out_not_in_data

    from triview.customvision import is_customvision

    if is_customvision(data):  # a remote project: ingest checks it (and its key)
        return
    if not data.startswith("s3://") and not Path(data).exists():
        raise FileNotFoundError(f"input {data!r} does not exist")
    check_out_not_in_data(data, out)
    values = {**spec.defaults("ingest"), **params}
    check_layout(data, **{k: values[k] for k in ("label_remap", "label_drop", "min_per_class",
                                                  "allowed_roots")})


def _cmd_ingest(args: argparse.Namespace) -> int:
    from triview.ingest import IngestError
    from triview.stages import ingest_stage
    from triview.storage import StorageError

    values = stage_flag_values(args, "ingest")
    try:
        _preflight(args.data, args.out, values)
        rec = ingest_stage(args.data, args.out, workers=args.workers, plot=not args.no_plot,
                           allow_empty=True, **values)
    except IngestError as exc:   # the fixes as this command's flags (--drop, --min-per-class)
        print(f"triview ingest: error: {exc.render(stage_flag)}", file=sys.stderr)
        return 2
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

    return options_from_flags(gpus=args.gpus, node_gpus=args.node_gpus,
                              crop_shards=args.crop_shards, crop_parallelism=args.crop_parallelism,
                              gpu_pool=args.gpu_pool,
                              gpu_toleration=args.gpu_toleration, cpu_pool=args.cpu_pool,
                              minio_secret=args.minio_secret,
                              customvision_secret=args.customvision_secret, image=args.image,
                              gpu_image=args.gpu_image, serve_image=args.serve_image,
                              pipeline_root=getattr(args, "compile_pipeline_root", None))


def _cmd_compile(args: argparse.Namespace) -> int:
    folder = Path(args.output).parent
    if not folder.is_dir():  # the default, pipelines/triview.yaml, is the checkout's
        raise FileNotFoundError(f"no folder {str(folder)!r} here for {args.output}: run it in the "
                                f"triview checkout, or name the file: triview compile -o triview.yaml")
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
            own = {"published": ", the published file", "unverified": ", unverified: no full "
                   "published SHA-256 pinned"}.get(row["verification"], ", NOT the published file")
            print(f"staged {row['backbone']}: {row['file']} ({row['bytes']} bytes, sha256 "
                  f"{row['sha256'][:16]}..., from {row['staged_from']}{own}) -> {args.to}")
        return 0
    if args.backbones:
        raise ValueError("weights list takes no backbones (use --from to list a mirror)")
    if args.source:
        rows = weights.list_mirror(args.source)
        for row in rows:
            origin = {"published": f"published ({row['source_url']})",
                      "unverified": f"unverified: no full published SHA-256 pinned "
                                    f"({row['source_url']})",
                      "own": f"own file staged under {row['file']} (not the published one)",
                      }.get(row["verification"], "NOT the published file, though its manifest "
                            "says so: resolve refuses it")
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
    _preflight(args.data, args.out, params)
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
    from triview.summary import format_summary

    print(format_summary(summary))
    print(f"summary: {Path(args.out) / 'run_summary.json'}")
    print(f"next:    triview predict --model {args.out} IMAGE...   (the --out folder is the model)")
    return 0


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
    results = predictor.predict(paths, threshold=args.threshold, views=args.views)
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

    from triview.serving import check_model, has_kserve, serve_argv, serve_command

    check_model(args.model)   # a missing model is named before the serving environment
    if has_kserve():  # this interpreter is the serving environment
        from triview.serving.server import main as serve_main

        return serve_main(serve_argv(args))
    command = serve_command(serve_argv(args))  # FileNotFoundError: exit 2 with the hint
    os.execv(command[0], command)  # the serving venv's Python replaces this process


def _cmd_deploy(args: argparse.Namespace) -> int:
    from triview import deploy as dp

    if not (args.emit or args.apply):
        raise ValueError("give --emit FILE (or -) and/or --apply")
    if bool(args.run) == bool(args.registry):
        raise ValueError("give --registry s3://BUCKET/PREFIX (with --model-name, --version), "
                         "or --run OUT: the --out folder of a triview run that promoted a model")
    if args.run:
        from triview.summary import registry_version_of_run

        registry, model_name, version = registry_version_of_run(args.run)
    else:
        registry, model_name, version = args.registry, args.model_name, args.version
    version = str(version)
    if version != "champion" and not version.isdigit():
        raise ValueError(f"--version must be a number or 'champion', got {version!r}")
    spec = f"{registry.rstrip('/')}/{model_name}@{version}"
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


# --- issue 27: hyperparameter search ------------------------------------------------------
def _cmd_tune(args: argparse.Namespace) -> int:
    base = _checked_run_params(args)
    if args.emit or args.apply:
        from triview import deploy as dp
        from triview.tune import cluster

        opts = cluster.ClusterOptions(
            name=args.name, namespace=args.namespace, trials=args.trials,
            parallel_trials=args.parallel_trials, image=args.image or cluster.GPU_IMAGE,
            gpus=args.gpus, minio_secret=args.minio_secret, s3_endpoint=args.s3_endpoint,
            service_account=args.service_account, cache_pvc=args.cache_pvc)
        job = cluster.build_job(args.data, args.space, args.objective, args.seed, base, opts)
        if args.emit == "-":
            print(cluster.to_yaml(job), end="")
        elif args.emit:
            from triview.storage import atomic_write_text

            atomic_write_text(args.emit, cluster.to_yaml(job))
            print(f"wrote OptimizationJob/{args.name} to {args.emit}", file=sys.stderr)
        if args.apply:
            dp.apply([job], dp.kube_api_client(args.kubeconfig))
            print(f"applied OptimizationJob/{args.name} in {args.namespace}", file=sys.stderr)
        return 0
    if not args.out:
        raise ValueError("give --out DIR (or --emit/--apply for the cluster's OptimizationJob)")
    from triview.tune import study as st

    study = st.prepare(args.data, args.out, space=args.space, objective=args.objective,
                       seed=args.seed, base=base, resume=args.resume)
    try:
        st.run(study, trials=args.trials, timeout=args.timeout, resume=args.resume,
               threads=args.threads)
    except KeyboardInterrupt:
        print(f"triview tune: stopped; continue with the same command and --resume "
              f"(the study is in {args.out})", file=sys.stderr)
        return 130
    return 0


def _cmd_tune_trial(args: argparse.Namespace) -> int:
    from triview.params import parse_pairs, validate
    from triview.tune.cluster import run_cluster_trial
    from triview.tune.objective import get_objective

    run_cluster_trial(args.data, args.space_json, get_objective(args.objective),
                      validate(parse_pairs(args.param), complete=True), args.cache,
                      threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from triview import params as spec

    from triview.cli_examples import OVERVIEW

    parser = CommandParser(prog="triview", description=OVERVIEW)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", help="write scikit-learn's handwritten digits as a folder of "
                       "JPEGs in class folders (the demo data set)")
    p.add_argument("dir", metavar="DIR", help="folder to write (DIR/<digit>/digit_NNNN.jpg)")
    p.add_argument("--size", type=int, default=64, metavar="PIXELS",
                   help="side of the upscaled images (default 64)")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="keep at most N images per class (default: all, 1,797 in all)")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("ingest", help="ingest a folder, ZIP, CSV/Parquet table, s3:// prefix "
                       "or Custom Vision project into a manifest + quarantine report + statistics "
                       "(the pipeline's first stage, on its own)")
    p.add_argument("--data", required=True, metavar="DIR|ZIP|TABLE|s3://...|customvision://...",
                   help="folder or ZIP of class folders, DATA/<class>/<image> (or a YOLO-classify/"
                   "Roboflow ZIP with data.yaml), CSV/Parquet multi-label table, s3://bucket/prefix, "
                   "or customvision://ENDPOINT_HOST/PROJECT_ID (training key from "
                   "$CUSTOMVISION_TRAINING_KEY)")
    p.add_argument("--out", required=True, metavar="DIR|s3://...",
                   help="output folder (or s3:// prefix); not inside --data")
    add_stage_flags(p, "ingest")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes (default: one per core)")
    p.add_argument("--no-plot", action="store_true", help="skip stats.png")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("calibrate", help="calibrate a camera from chessboard photos (a lens "
                       "model for calibration_file)")
    p.add_argument("--images", required=True, metavar="'GLOB'",
                   help="glob of chessboard photos in quotes, e.g. 'calib/*.jpg' (unquoted, the "
                   "shell expands it into many arguments)")
    p.add_argument("--pattern", default="9x6", metavar="COLSxROWS",
                   help="inner corners per row x column (default 9x6)")
    p.add_argument("--square", type=float, default=1.0, metavar="SIDE",
                   help="square side, in your unit (default 1.0)")
    p.add_argument("--out", default="calib.json", metavar="FILE",
                   help="calibration JSON to write (default calib.json)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML (what a Kubeflow "
                       "Pipelines cluster runs)")
    p.add_argument("-o", "--output", default="pipelines/triview.yaml", metavar="FILE",
                   help="YAML to write (default pipelines/triview.yaml: the checkout's "
                   "committed IR; elsewhere, name a file)")
    p.add_argument("--pipeline-root", dest="compile_pipeline_root", metavar="minio://BUCKET/PATH",
                   help="default artifact root written into the IR (default: the cluster's, "
                   "from the kfp-launcher ConfigMap)")
    compile_p = p
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("weights", help="published ImageNet weights: list what resolves here or "
                       "what a mirror holds; stage them into a mirror (a folder or s3://) for "
                       "clusters without internet")
    p.add_argument("action", choices=("list", "stage"), metavar="list|stage",
                   help="list: what resolves here (or, with --from, what a mirror holds); "
                   "stage: copy weights into the mirror --to")
    p.add_argument("backbones", nargs="*", metavar="BACKBONE",
                   help=f"backbones to stage (one of {', '.join(spec.PARAMS['backbone'].allowed)})")
    p.add_argument("--to", metavar="DIR|s3://...", help="stage: the mirror to fill")
    p.add_argument("--from", dest="source", metavar="FILE|MIRROR",
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
    p.add_argument("--stage", default=None, choices=spec.STAGES, metavar="STAGE",
                   help=f"only the parameters this stage reads: {', '.join(spec.STAGES)}")
    p.add_argument("--format", choices=("text", "json"), default="text", metavar="text|json",
                   help="text (default) or json")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("run", help="run the whole DAG locally with kfp.local: ingest, crop, "
                       "train three views and a voter, evaluate, export",
                       description="Run the whole DAG on this machine (kfp.local): ingest, "
                       "calibrate-and-crop, balance, augment, one branch per view, the voter, "
                       "evaluate and export. Every pipeline parameter is a --param NAME=VALUE; "
                       "`triview params` lists them with their defaults and allowed values.")
    p.add_argument("--data", required=True, metavar="DIR|ZIP|TABLE|customvision://...",
                   help="your photos: a folder or ZIP of class folders, DATA/<class>/<image> "
                   "(or a CSV/Parquet table, or customvision://ENDPOINT_HOST/PROJECT_ID with "
                   "$CUSTOMVISION_TRAINING_KEY)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder, not inside --data: run_summary.json, report.html, "
                   "logs/, pipeline_root/ (predict, serve and deploy take it as the model)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, repeatable (e.g. --param epochs=4); every name, "
                   "default and allowed value: triview params")
    p.add_argument("--preset", default=None, metavar="NAME|FILE",
                   help="parameter values from a preset (e.g. digits, the `make run` demo) or a "
                   "YAML file of name: value; --param values override them")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="train N seeds seed..seed+N-1 in the one run (the pipeline's `repeats` "
                   "parameter) and report mean ± SD of every test metric (default 1)")
    p.add_argument("--verbose", action="store_true",
                   help="stream every task's full output (kfp.local's executor logs) instead "
                   "of one line per task; the logs are in OUT/logs/ either way")
    p.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   metavar="subprocess|docker",
                   help="subprocess: every task in this venv (default); docker: every task in the "
                   "image the compiled IR names, as a restricted pod (uid 10001, read-only root, "
                   "no capabilities, no network, the task's CPU/memory limits; `make images` first)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("predict", help="predict images with an exported ensemble (a run's --out "
                       "folder, a model folder or a registry model, local or s3://)")
    p.add_argument("--model", required=True, metavar="RUN_OUT|MODEL_DIR|REGISTRY_MODEL",
                   help="the --out folder of a triview run, an exported model folder, or a "
                   "registry model folder (models/<name>: its champion) or version "
                   "(models/<name>/<version>), local or s3://")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--threshold", type=float, default=None, metavar="SCORE",
                   help="also list classes scoring at least this (default 0.5); multi-label: only "
                        "those (default: the per-label thresholds tuned on validation)")
    p.add_argument("--format", choices=("table", "json"), default="table", metavar="table|json",
                   help="table with per-class counts, or one JSON object per image (default table)")
    p.add_argument("--views", action="store_true",
                   help="also each view's own top label and score (what each crop saw)")
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
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="kubeconfig file for --apply (default ~/.kube/config)")
    p.add_argument("--registry", metavar="s3://BUCKET/PREFIX",
                   help="the model registry (as the pipeline's `registry` parameter)")
    p.add_argument("--run", metavar="RUN_OUT", help="instead of --registry/--model-name/--version: "
                   "the --out folder of a triview run; deploys the version it promoted")
    p.add_argument("--model-name", default="triview", metavar="NAME",
                   help="registry model name (default triview)")
    p.add_argument("--version", default="champion", metavar="N|champion",
                   help="N or champion (default champion)")
    p.add_argument("--name", metavar="NAME",
                   help="InferenceService name and route model name (default: model name)")
    p.add_argument("--namespace", default="triview", metavar="NAMESPACE",
                   help="namespace (default triview)")
    p.add_argument("--image", default=None, metavar="REF:TAG",
                   help="serving image (default $TRIVIEW_SERVE_IMAGE or "
                   "ghcr.io/triview/triview-serve:0.1.0; pinned, not :latest)")
    p.add_argument("--canary-traffic-percent", type=int, default=None, metavar="N",
                   help="send N%% of traffic to this version, the rest to the last ready one")
    p.add_argument("--cpu", default="500m", metavar="CPU", help="CPU request (default 500m)")
    p.add_argument("--cpu-limit", default="2", metavar="CPU", help="CPU limit (default 2)")
    p.add_argument("--memory", default="512Mi", metavar="BYTES",
                   help="memory request (default 512Mi)")
    p.add_argument("--memory-limit", default="2Gi", metavar="BYTES",
                   help="memory limit (default 2Gi: the server decodes up to 100 MP at once, "
                   "about 1 GB, beside the model)")
    p.add_argument("--min-replicas", type=int, default=1, metavar="N",
                   help="default 1 (0: scale to zero)")
    p.add_argument("--max-replicas", type=int, default=3, metavar="N", help="default 3")
    p.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="KServe's batcher (agent sidecar, v1 requests): merge up to N instances")
    p.add_argument("--max-latency-ms", type=int, default=None, metavar="MS",
                   help="batcher: wait at most this long for a batch (default 100)")
    p.add_argument("--s3-endpoint", default="minio-service.kubeflow:9000", metavar="HOST:PORT",
                   help="MinIO host:port as the cluster sees it (storage initializer)")
    p.add_argument("--s3-usehttps", type=int, choices=(0, 1), default=0, metavar="0|1",
                   help="default 0")
    p.add_argument("--s3-region", default="us-east-1", metavar="REGION",
                   help="default us-east-1")
    p.add_argument("--isvc-only", action="store_true", help="only the InferenceService (the "
                   "`serving` kustomize component installed the ServiceAccount and runtime)")
    p.set_defaults(func=_cmd_deploy)

    from triview.tune.objective import OBJECTIVES

    p = sub.add_parser("tune", help="search the pipeline's parameters (Optuna TPE, seeded, with "
                       "pruning) on a held-out objective, never test; the best trial is scored on test once "
                       "and written as a preset; or emit/apply the same search as a Kubeflow "
                       "Trainer OptimizationJob")
    p.add_argument("--data", required=True, metavar="DIR|ZIP|s3://...",
                   help="folder or ZIP of labelled photos (with --emit/"
                   "--apply: s3://bucket/prefix as the trial pods read it)")
    p.add_argument("--out", metavar="DIR", help="the study's folder: storage, trials.csv, report.html, best.yaml")
    p.add_argument("--trials", type=int, default=30, metavar="N", help="trials in the study, counting those "
                   "of earlier runs when resuming (default 30)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="start no new trial after S seconds")
    p.add_argument("--space", default="photos", metavar="NAME|FILE",
                   help="search space YAML, or a shipped one: photos (default), photos-finetune")
    p.add_argument("--objective", choices=list(OBJECTIVES), default="val_macro_f1",
                   metavar="|".join(OBJECTIVES), help="; ".join(f"{o.name}: {o.help}" for o in OBJECTIVES.values()))
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the sampler (the pipeline's own "
                   "seed is --param seed=N; default 0)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out (same "
                   "settings); an interrupted trial runs again")
    p.add_argument("--preset", default=None, metavar="NAME|FILE",
                   help="the parameters of trial 0 and the fixed ones of every trial, from a preset")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of trial 0 and every trial (over --preset), repeatable")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="threads for computing "
                   "the frozen features (default 0: one per core); the rest of a trial, fine-tuning epochs "
                   "included, runs on one thread")
    p.add_argument("--emit", metavar="FILE|-", help="write the OptimizationJob YAML ('-': stdout) "
                   "instead of searching here")
    p.add_argument("--apply", action="store_true", help="server-side apply the OptimizationJob "
                   "(in-cluster service account, else the kubeconfig)")
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file for --apply (default ~/.kube/config)")
    p.add_argument("--name", default="triview-tune", metavar="NAME", help="OptimizationJob name")
    p.add_argument("--namespace", default="triview", metavar="NAMESPACE", help="namespace (default triview)")
    p.add_argument("--parallel-trials", type=int, default=1, metavar="N", help="trials at once (default 1)")
    p.add_argument("--image", default=None, metavar="REF:TAG", help="image of the trials "
                   "(default $TRIVIEW_GPU_IMAGE or ghcr.io/triview/triview-gpu:0.1.0)")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs per trial (default 1; 0: CPU)")
    p.add_argument("--minio-secret", default="triview-minio", metavar="NAME",
                   help="Secret with accesskey/secretkey, referenced by name (default triview-minio)")
    p.add_argument("--s3-endpoint", default="http://minio-service.kubeflow:9000", metavar="URL",
                   help="MinIO as the trial pods see it")
    p.add_argument("--service-account", default="triview-pipeline-runner", metavar="NAME",
                   help="service account of the trial pods")
    p.add_argument("--cache-pvc", metavar="CLAIM", help="a ReadWriteMany PersistentVolumeClaim the "
                   "trials share, so later trials reuse the crops and features of earlier ones")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("tune-trial", help="one trial of a tune OptimizationJob, inside its "
                       "TrainJob: parameters from KUBEFLOW_TRAINER_OPT_*, the objective posted "
                       "to the TrainJob's status")
    p.add_argument("--data", required=True, metavar="s3://...|DIR",
                   help="s3://bucket/prefix (or a mounted folder)")
    p.add_argument("--objective", choices=list(OBJECTIVES), default="val_macro_f1",
                   metavar="|".join(OBJECTIVES), help="what the trial reports")
    p.add_argument("--space-json", required=True, metavar="JSON", help="the search space (JSON), as emitted")
    p.add_argument("--cache", required=True, metavar="DIR", help="folder for stage outputs and features")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="threads for computing "
                   "the frozen features (default 0: one per core); the rest runs on one thread")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed parameters of every trial, repeatable")
    p.set_defaults(func=_cmd_tune_trial)

    submit_p = sub.add_parser("submit",
                              help="start a run of the DAG on a Kubeflow Pipelines cluster")
    submit_p.add_argument("--run-name", metavar="NAME",
                          help="run name (default 'triview <date time>')")
    submit_p.set_defaults(func=_cmd_submit)
    schedule_p = sub.add_parser("schedule", help="create a recurring run (max 1 at a time, no "
                                "catch-up; each run passes the champion/challenger gate)")
    when = schedule_p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="CRON", help="KFP's 6-field cron, seconds "
                      "first, e.g. '0 0 3 * * 0' (Sundays 03:00)")
    when.add_argument("--interval", metavar="DURATION",
                      help="seconds or a duration: 24h, 7d, 1h30m")
    schedule_p.add_argument("--job-name", default="triview-retrain", metavar="NAME",
                            help="recurring run name (default triview-retrain)")
    schedule_p.set_defaults(func=_cmd_schedule)
    runs_p = sub.add_parser("runs", help="list the newest runs on a Kubeflow Pipelines cluster")
    runs_p.add_argument("--experiment", default=None, metavar="NAME",
                        help="only runs of this experiment")
    runs_p.add_argument("--limit", type=int, default=20, metavar="N",
                        help="how many runs (default 20)")
    runs_p.set_defaults(func=_cmd_runs)
    for p in (submit_p, schedule_p, runs_p):
        add_kfp_connection_flags(p)
    for p in (submit_p, schedule_p):
        add_cluster_run_flags(p)
    for p in (compile_p, submit_p, schedule_p):  # the same cluster settings everywhere
        add_cluster_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from triview.cli_parser import quiet_broken_pipe

    try:
        args = build_parser().parse_args(argv)
        try:
            status = args.func(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"triview {args.command}: error: {exc}", file=sys.stderr)
            return 2
        sys.stdout.flush()   # a closed pipe shows here, not in the interpreter's last flush
        return status
    except BrokenPipeError:   # `triview params | head`: the reader has what it wanted
        return quiet_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
