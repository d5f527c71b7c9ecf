from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export(
    branch_1: Input[Model],
    branch_2: Input[Model],
    branch_3: Input[Model],
    voter: Input[Model],
    views: Input[Dataset],
    evaluation: Input[Dataset],
    model: Output[Model],
):
    """Export the whole ensemble (three views + voter) as TorchScript with a model card.

    Args:
        branch_1: First view's trained branch.
        branch_2: Second view's trained branch.
        branch_3: Third view's trained branch.
        voter: The chosen voter.
        views: Cropped views dataset (crop geometry, lens, real test crops for the parity check).
        evaluation: Test metrics recorded in the model card.
        model: Output folder: ``ensemble.torchscript.pt`` and ``model_card.json``.
    """
    from triview.stages import export_stage

    dirs = [branch_1.path, branch_2.path, branch_3.path]
    rec = export_stage(dirs, voter.path, views.path, evaluation.path, model.path)
    model.metadata.update({"format": "torchscript",
                           "torchscript_max_abs_diff": rec["torchscript_max_abs_diff"]})
