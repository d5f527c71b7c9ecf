"""The examples each ``triview <command> --help`` ends with (a test parses every one of
them against the real parser, as it does the command lines of the docs)."""

EXAMPLES = {
    "demo-data": """\
triview demo-data digits                      # 1,797 handwritten digits in 10 class folders
triview demo-data digits --per-class 20 --size 32   # 200 small ones, for a quick try""",
    "ingest": """\
triview ingest --data photos --out ingested   # photos/<class>/<image>: manifest, quarantine, stats
triview ingest --data photos.zip --out ingested --drop blurry --min-per-class 5
triview ingest --data s3://bucket/photos --out s3://bucket/ingested""",
    "calibrate": """\
triview calibrate --images 'calib/*.jpg' --pattern 9x6 --out calib.json
# quote the glob: the shell would expand it into many arguments
triview run --data photos --out runs/photos --param calibration_file=calib.json""",
    "compile": """\
triview compile -o pipelines/triview.yaml     # in the checkout: the committed IR
triview compile -o triview.yaml --gpus 0 --image registry.example.com/triview-cpu:0.1.0""",
    "weights": """\
triview weights list                          # which ImageNet weights resolve here
triview weights stage efficientnet_lite0 --to s3://triview-artifacts/weights
triview weights list --from s3://triview-artifacts/weights""",
    "params": """\
triview params                                # every pipeline parameter, stage by stage
triview params --stage train-branch           # only what train-branch reads
triview params --format json""",
    "run": """\
triview run --data photos --out runs/photos   # photos/<class>/<image>, the photo defaults
triview run --data photos --out runs/photos --param epochs=2 --param backbone=resnet18
triview run --data demo-data --out runs/demo --preset digits --repeats 3
# every --param name, its default and what it allows: triview params""",
    "predict": """\
triview predict --model runs/photos new-photos/          # a run's --out folder is a model
triview predict --model registry/models/triview photo.jpg --format json""",
    "serve": """\
triview serve --model runs/photos --port 8080  # needs the serving env: make serve-env
triview serve --model s3://triview-artifacts/registry/triview@champion""",
    "deploy": """\
triview deploy --emit isvc.yaml --registry s3://triview-artifacts/registry --version champion
triview deploy --emit - --run runs/photos     # the version that run promoted
triview deploy --apply --registry s3://triview-artifacts/registry --canary-traffic-percent 10""",
    "tune": """\
triview tune --data photos --out tune/photos --trials 30     # Optuna on this machine
triview tune --data photos --out tune/photos --trials 40 --resume   # ten more trials
triview tune --data s3://triview-data/photos --trials 60 --emit optimizationjob.yaml""",
    "tune-trial": """\
triview tune-trial --data s3://triview-data/photos --space-json '{}' --cache /cache
# what the trial pods of a `triview tune --emit` OptimizationJob run, not a command to type""",
    "submit": """\
triview submit --data /data/photos --host http://localhost:8080 --param epochs=2
triview submit --data s3://triview-data/photos --gpus 1 --param registry=s3://triview-artifacts/registry""",
    "schedule": """\
triview schedule --cron '0 0 3 * * 0' --data s3://triview-data/photos --host http://localhost:8080
triview schedule --interval 7d --data s3://triview-data/photos --param registry=s3://triview-artifacts/registry""",
    "runs": """\
triview runs --host http://localhost:8080 --limit 5""",
}


#: ``triview --help``: what triview is and the first steps.
OVERVIEW = """\
triview: multi-view image classification as one Kubeflow Pipelines DAG. Three
overlapping views of each photo, one network per view, a voter over the three.

first steps:
  triview demo-data digits && triview run --data digits --out runs/demo --preset digits
  triview run --data photos --out runs/photos      # photos/<class>/<image>
  triview predict --model runs/photos new.jpg      # a run's --out folder is its model
  triview params                                   # every --param NAME=VALUE of run
  (the tool is .venv/bin/triview after `make install`; serving needs `make serve-env`)"""
