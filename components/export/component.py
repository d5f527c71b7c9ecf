from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export(
    branch_1: Input[Model],
    branch_2: Input[Model],
    branch_3: Input[Model],
    voter: Input[Model],
    views: Input[Dataset],
    evaluation: Input[Dataset],
    blessing: Input[Artifact],
    model: Output[Model],
    # params: export (generated from triview/params.py by `python -m components.codegen`)
    registry: str = "", model_name: str = "triview", infra_validate: str = "auto",
    infra_images: int = 16, quantize: str = "none",
    # end params
):
    """Export the whole ensemble (three views + voter) as TorchScript and ONNX with
    safetensors weights and a model card, and promote it in the registry if blessed.

    Args:
        branch_1: First view's trained branch.
        branch_2: Second view's trained branch.
        branch_3: Third view's trained branch.
        voter: The chosen voter.
        views: Cropped views dataset (crop geometry, lens, the real test crops of the
            TorchScript and ONNX Runtime parity checks, validation crops for calibration).
        evaluation: Test metrics recorded in the model card.
        blessing: The gate's verdict; an unblessed model is exported but never promoted.
        model: Output folder: ``ensemble.torchscript.pt``, ``ensemble.onnx``,
            ``weights.safetensors``, ``voter.json``, ``model_card.json`` and ``model_card.md``.
        registry: Model registry: a folder or s3://bucket/prefix. Empty: no registry, no
            champion, nothing promoted.
        model_name: Model name in the registry (models/<model_name>/...).
        infra_validate: Before a blessed model is promoted, serve it in the real KServe
            predictor (triview serve, a subprocess on 127.0.0.1) and compare its answers on
            infra_images test images with ONNX Runtime; a failure refuses promotion (auto: when
            a serving environment exists; on: required; off). (one of auto, on, off)
        infra_images: Test images the infra validation sends. (in [1, 1000])
        quantize: INT8 quantization with ONNX Runtime: none, dynamic or static (calibrated on
            validation crops). (one of none, dynamic, static)
    """
    from triview.params import pick
    from triview.stages import export_stage

    dirs = [branch_1.path, branch_2.path, branch_3.path]
    rec = export_stage(dirs, voter.path, views.path, evaluation.path, model.path,
                       blessing=blessing.path, **pick("export", locals()))
    model.metadata.update({"format": "torchscript+onnx",
                           "torchscript_max_abs_diff": rec["torchscript_max_abs_diff"],
                           "onnx_max_abs_diff": rec["onnx_max_abs_diff"],
                           "blessed": bool(rec["blessed"]), "promoted": bool(rec["promoted"]),
                           "data_version": rec["data_version"]})
    if rec.get("registry_version") is not None:
        model.metadata.update({"registry_version": rec["registry_version"],
                               "registry_uri": rec["champion_uri"]})
