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
    registry: str = "",
    model_name: str = "triview",
    quantize: str = "none",
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
        registry: Model registry location (a folder or ``s3://bucket/prefix``); a blessed
            model is copied to ``models/<model_name>/<version>/`` and becomes the champion.
            Empty: no registry.
        model_name: Model name in the registry.
        quantize: INT8 quantization with ONNX Runtime: ``none``, ``dynamic`` or ``static``
            (calibrated on validation crops); the accuracy change is in the model card.
    """
    from triview.stages import export_stage

    dirs = [branch_1.path, branch_2.path, branch_3.path]
    rec = export_stage(dirs, voter.path, views.path, evaluation.path, model.path,
                       blessing=blessing.path, registry=registry, model_name=model_name,
                       quantize=quantize)
    model.metadata.update({"format": "torchscript+onnx",
                           "torchscript_max_abs_diff": rec["torchscript_max_abs_diff"],
                           "onnx_max_abs_diff": rec["onnx_max_abs_diff"],
                           "blessed": bool(rec["blessed"]), "promoted": bool(rec["promoted"]),
                           "data_version": rec["data_version"]})
    if rec.get("registry_version") is not None:
        model.metadata.update({"registry_version": rec["registry_version"],
                               "registry_uri": rec["champion_uri"]})
