"""The triview DAG: ingest -> calibrate-and-crop -> balance -> augment ->
train-branch x3 -> train-voter -> evaluate -> export.

With ``repeats > 1`` the same run also fans out over ``repeats - 1`` further seeds
(train-branch x3 -> train-voter -> evaluate each, on the same split, crops and
augmentation) and ``summarize-repeats`` reports mean and SD over all the seeds; the
exported model is the main seed's."""

from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import HTML, Model

from components.augment import augment
from components.balance import balance
from components.calibrate_and_crop import calibrate_and_crop
from components.collect_views import collect_views
from components.deploy import deploy
from components.evaluate import evaluate
from components.export import export
from components.ingest import ingest
from components.repeats import repeat_seeds, summarize_repeats
from components.train_branch import train_branch
from components.train_voter import train_voter
from pipelines.platform import PlatformOptions, configure_task
from triview import params

PIPELINE_NAME = "triview"
#: Display names of the three branch tasks: views 1, 2, 3 of the layout (vertical:
#: top/center/bottom, horizontal: left/center/right), which is only known at run time.
BRANCH_NAMES = ("view-1", "view-2", "view-3")


DESCRIPTION = ("Multi-view image classification: three cropped views, one backbone each, a "
               "learned voter, evaluation and export.")
#: The pipeline's inputs besides the spec's parameters.
LEADING = {"data": "Folder, ZIP, CSV/Parquet table or s3://bucket/prefix of labelled photos, as "
                   "the ingest pod sees it, or a Custom Vision project customvision://<endpoint "
                   "host>/<project id> (the training key comes from a Secret, never from here)."}


def _signature():
    import inspect

    return params.signature([inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                               annotation=str)])


def crop_views(dataset, values: dict, options: PlatformOptions):
    """calibrate-and-crop of ``dataset``: one task, or with ``options.crop_shards`` > 1 a
    ``dsl.ParallelFor`` of that many tasks (at most ``options.crop_parallelism`` at once),
    each cropping its part of the manifest, merged by collect-views. Returns the views."""
    picked = params.pick("calibrate-and-crop", values)
    if options.crop_shards <= 1:
        task = calibrate_and_crop(dataset=dataset, **picked)
        task.set_display_name("calibrate-and-crop")
        configure_task(task, "calibrate-and-crop", options)
        return task.outputs["views"]
    with dsl.ParallelFor(list(range(options.crop_shards)), name="crop-shards",
                         parallelism=options.crop_parallelism) as shard:
        task = calibrate_and_crop(dataset=dataset, shard=shard, shards=options.crop_shards, **picked)
        task.set_display_name("calibrate-and-crop-shard")
        configure_task(task, "calibrate-and-crop", options)
    collect = collect_views(parts=dsl.Collected(task.outputs["views"]))
    collect.set_display_name("collect-views")
    configure_task(collect, "collect-views", options)
    return collect.outputs["views"]


def make_pipeline(options: PlatformOptions | None = None):
    """Build the DAG with the cluster settings of ``options`` applied to every task.

    The pipeline's signature and docstring (its inputs and their descriptions in the KFP
    UI) are built from the parameter spec, :mod:`triview.params`; each task takes the
    parameters its stage reads (:func:`triview.params.pick`).
    """
    options = options or PlatformOptions()
    signature = _signature()

    def triview_pipeline(*args, **kwargs) -> NamedTuple("Outputs", model=Model, report=HTML):
        values = signature.bind(*args, **kwargs).arguments
        seed = values["seed"]
        ingest_task = ingest(data=values["data"], **params.pick("ingest", values))
        ingest_task.set_display_name("ingest")
        configure_task(ingest_task, "ingest", options)
        views = crop_views(ingest_task.outputs["dataset"], values, options)
        balance_task = balance(views=views, **params.pick("balance", values))
        balance_task.set_display_name("balance")
        configure_task(balance_task, "balance", options)
        augment_task = augment(views=views, **params.pick("augment", values))
        augment_task.set_display_name("augment")
        configure_task(augment_task, "augment", options)

        def train_and_evaluate(run_seed, repeat: bool):
            """Three branches, the voter and the evaluation for one seed (a repeat's
            tasks are named ``...-repeat`` and their evaluation is not gated)."""
            suffix = "-repeat" if repeat else ""
            models = []
            for index, name in enumerate(BRANCH_NAMES):
                branch_task = train_branch(
                    views=views, augmented=augment_task.outputs["augmented"],
                    balance=balance_task.outputs["balance"], view_index=index,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, repeat=repeat,
                    **{**params.pick("train-branch", values), "seed": run_seed})
                branch_task.set_display_name(f"train-branch-{name}{suffix}")
                configure_task(branch_task, "train-branch", options, gpu=True)
                models.append(branch_task.outputs["model"])
            voter_task = train_voter(branch_1=models[0], branch_2=models[1], branch_3=models[2],
                                     repeat=repeat, **{**params.pick("train-voter", values),
                                                       "seed": run_seed})
            voter_task.set_display_name(f"train-voter{suffix}")
            configure_task(voter_task, "train-voter", options)
            gate = {} if repeat else params.pick("evaluate", values)
            eval_task = evaluate(branch_1=models[0], branch_2=models[1], branch_3=models[2],
                                 voter=voter_task.outputs["voter"], views=views,
                                 dataset=ingest_task.outputs["dataset"], repeat=repeat, **gate)
            eval_task.set_display_name(f"evaluate{suffix}")
            configure_task(eval_task, "evaluate", options)
            return models, voter_task, eval_task

        branches, voter_task, eval_task = train_and_evaluate(seed, repeat=False)
        export_task = export(branch_1=branches[0], branch_2=branches[1], branch_3=branches[2],
                             voter=voter_task.outputs["voter"], views=views,
                             evaluation=eval_task.outputs["evaluation"],
                             blessing=eval_task.outputs["blessing"],
                             **params.pick("export", values))
        export_task.set_display_name("export")
        configure_task(export_task, "export", options)

        with dsl.If(values["deploy"] == True, name="deploy"):  # noqa: E712 (a pipeline channel)
            deploy_task = deploy(model=export_task.outputs["model"], serve_image=options.serve_image,
                                 **params.pick("deploy", values))
            deploy_task.set_display_name("deploy")
            configure_task(deploy_task, "deploy", options)

        with dsl.If(values["repeats"] > 1, name="repeats"):
            seeds_task = repeat_seeds(seed=seed, repeats=values["repeats"])
            seeds_task.set_display_name("repeat-seeds")
            configure_task(seeds_task, "repeat-seeds", options)
            with dsl.ParallelFor(seeds_task.output, name="repeat",
                                 parallelism=options.repeat_parallelism) as repeat_seed:
                _, _, rep_eval = train_and_evaluate(repeat_seed, repeat=True)
            summary_task = summarize_repeats(
                evaluation=eval_task.outputs["evaluation"],
                repeat_evaluations=dsl.Collected(rep_eval.outputs["evaluation"]))
            summary_task.set_display_name("summarize-repeats")
            configure_task(summary_task, "summarize-repeats", options)

        outputs = NamedTuple("Outputs", model=Model, report=HTML)
        return outputs(model=export_task.outputs["model"], report=eval_task.outputs["report"])

    triview_pipeline.__signature__ = signature.replace(
        return_annotation=NamedTuple("Outputs", model=Model, report=HTML))
    triview_pipeline.__doc__ = params.docstring(DESCRIPTION, LEADING)
    return dsl.pipeline(name=PIPELINE_NAME, pipeline_root=options.pipeline_root,
                        description=DESCRIPTION)(triview_pipeline)


#: The DAG with the default platform settings (what pipelines/triview.yaml holds).
triview_pipeline = make_pipeline()


def compile_pipeline(package_path: str, options: PlatformOptions | None = None) -> str:
    """Write the pipeline's IR YAML (built with ``options``) to ``package_path``."""
    pipeline = triview_pipeline if options is None else make_pipeline(options)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=package_path)
    return package_path
