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
from components.evaluate import evaluate
from components.export import export
from components.ingest import ingest
from components.repeats import repeat_seeds, summarize_repeats
from components.train_branch import train_branch
from components.train_voter import train_voter
from pipelines.platform import PlatformOptions, configure_task

PIPELINE_NAME = "triview"
#: Display names of the three branch tasks: views 1, 2, 3 of the layout (vertical:
#: top/center/bottom, horizontal: left/center/right), which is only known at run time.
BRANCH_NAMES = ("view-1", "view-2", "view-3")


def make_pipeline(options: PlatformOptions | None = None):
    """Build the DAG with the cluster settings of ``options`` applied to every task."""
    options = options or PlatformOptions()

    @dsl.pipeline(name=PIPELINE_NAME, pipeline_root=options.pipeline_root,
                  description="Multi-view image classification: three cropped views, one backbone "
                              "each, a learned voter, evaluation and export.")
    def triview_pipeline(
        data: str,
        seed: int = 0,
        repeats: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        min_size: int = 8,
        label_remap: str = "",
        label_drop: str = "",
        min_per_class: int = 0,
        layout: str = "vertical",
        overlap: float = 0.5,
        image_size: int = 32,
        window: float = 0.0,
        resize: str = "stretch",
        calibration_file: str = "",
        calibration_images: str = "",
        pattern: str = "9x6",
        square: float = 1.0,
        lens_alpha: float = -1.0,
        crop_roi: bool = False,
        class_weighting: str = "inverse_frequency",
        beta: float = 0.999,
        resample: str = "none",
        resample_target: float = 0.0,
        augment_copies: int = 1,
        noise_std: float = 0.05,
        max_rotation: float = 50.0,
        border_mode: str = "constant",
        augment_mode: str = "offline",
        hflip: float = 0.0,
        vflip: float = 0.0,
        shift: float = 0.0,
        zoom: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        clahe: float = 0.0,
        gray_world: float = 0.0,
        backbone: str = "shufflenet_v2_x1_0",
        epochs: int = 8,
        batch_size: int = 32,
        lr: float = 0.003,
        lrf: float = 0.05,
        hidden: int = 0,
        label_smoothing: float = 0.1,
        weight_decay: float = 0.0001,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        milestones: str = "",
        poly_power: float = 0.9,
        patience: int = 0,
        clip_grad_norm: float = 0.0,
        accumulate: int = 1,
        amp: str = "auto",
        compile: bool = False,
        deterministic: bool = False,
        normalization: str = "imagenet",
        weights: str = "",
        finetune: str = "full",
        unfreeze_epoch: int = 0,
        checkpoint_root: str = "",
        task: str = "auto",
        voter_folds: int = 0,
        ddp_procs: int = 0,
        registry: str = "",
        model_name: str = "triview",
        gate_min_macro_f1: float = 0.0,
        gate_min_delta: float = -0.01,
        quantize: str = "none",
    ) -> NamedTuple("Outputs", model=Model, report=HTML):
        ingest_task = ingest(data=data, seed=seed, val_fraction=val_fraction,
                             test_fraction=test_fraction, min_size=min_size,
                             label_remap=label_remap, label_drop=label_drop,
                             min_per_class=min_per_class)
        ingest_task.set_display_name("ingest")
        configure_task(ingest_task, "ingest", options)
        crop_task = calibrate_and_crop(dataset=ingest_task.outputs["dataset"], layout=layout,
                                       overlap=overlap, image_size=image_size, window=window,
                                       resize=resize, calibration_file=calibration_file,
                                       calibration_images=calibration_images, pattern=pattern,
                                       square=square, lens_alpha=lens_alpha, crop_roi=crop_roi)
        crop_task.set_display_name("calibrate-and-crop")
        configure_task(crop_task, "calibrate-and-crop", options)
        balance_task = balance(views=crop_task.outputs["views"], class_weighting=class_weighting,
                               beta=beta, resample=resample, resample_target=resample_target,
                               seed=seed)
        balance_task.set_display_name("balance")
        configure_task(balance_task, "balance", options)
        augment_task = augment(views=crop_task.outputs["views"], copies=augment_copies,
                               noise_std=noise_std, max_rotation=max_rotation,
                               border_mode=border_mode, seed=seed, mode=augment_mode, hflip=hflip,
                               vflip=vflip, shift=shift, zoom=zoom, brightness=brightness,
                               contrast=contrast, clahe=clahe, gray_world=gray_world)
        augment_task.set_display_name("augment")
        configure_task(augment_task, "augment", options)

        def train_and_evaluate(run_seed, repeat: bool, **gate):
            """Three branches, the voter and the evaluation for one seed (a repeat's
            tasks are named ``...-repeat`` and their evaluation is not gated)."""
            suffix = "-repeat" if repeat else ""
            models = []
            for index, name in enumerate(BRANCH_NAMES):
                branch_task = train_branch(
                    views=crop_task.outputs["views"], augmented=augment_task.outputs["augmented"],
                    balance=balance_task.outputs["balance"], view_index=index,
                    backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr, lrf=lrf,
                    hidden=hidden, label_smoothing=label_smoothing, weight_decay=weight_decay,
                    seed=run_seed, optimizer=optimizer, momentum=momentum,
                    scheduler=scheduler, warmup_epochs=warmup_epochs, milestones=milestones,
                    poly_power=poly_power, patience=patience, clip_grad_norm=clip_grad_norm,
                    accumulate=accumulate, amp=amp, compile=compile, deterministic=deterministic,
                    normalization=normalization, weights=weights, finetune=finetune,
                    unfreeze_epoch=unfreeze_epoch, checkpoint_root=checkpoint_root, task=task,
                    voter_folds=voter_folds, ddp_procs=ddp_procs,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, repeat=repeat)
                branch_task.set_display_name(f"train-branch-{name}{suffix}")
                configure_task(branch_task, "train-branch", options, gpu=True)
                models.append(branch_task.outputs["model"])
            voter_task = train_voter(branch_1=models[0], branch_2=models[1], branch_3=models[2],
                                     seed=run_seed, repeat=repeat)
            voter_task.set_display_name(f"train-voter{suffix}")
            configure_task(voter_task, "train-voter", options)
            eval_task = evaluate(branch_1=models[0], branch_2=models[1], branch_3=models[2],
                                 voter=voter_task.outputs["voter"], views=crop_task.outputs["views"],
                                 repeat=repeat, **gate)
            eval_task.set_display_name(f"evaluate{suffix}")
            configure_task(eval_task, "evaluate", options)
            return models, voter_task, eval_task

        branches, voter_task, eval_task = train_and_evaluate(
            seed, repeat=False, registry=registry, model_name=model_name,
            gate_min_macro_f1=gate_min_macro_f1, gate_min_delta=gate_min_delta)
        export_task = export(branch_1=branches[0], branch_2=branches[1], branch_3=branches[2],
                             voter=voter_task.outputs["voter"], views=crop_task.outputs["views"],
                             evaluation=eval_task.outputs["evaluation"],
                             blessing=eval_task.outputs["blessing"], registry=registry,
                             model_name=model_name, quantize=quantize)
        export_task.set_display_name("export")
        configure_task(export_task, "export", options)

        with dsl.If(repeats > 1, name="repeats"):
            seeds_task = repeat_seeds(seed=seed, repeats=repeats)
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

    return triview_pipeline


#: The DAG with the default platform settings (what pipelines/triview.yaml holds).
triview_pipeline = make_pipeline()


def compile_pipeline(package_path: str, options: PlatformOptions | None = None) -> str:
    """Write the pipeline's IR YAML (built with ``options``) to ``package_path``."""
    pipeline = triview_pipeline if options is None else make_pipeline(options)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=package_path)
    return package_path
