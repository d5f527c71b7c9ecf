from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train_voter(
    branch_1: Input[Model],
    branch_2: Input[Model],
    branch_3: Input[Model],
    voter: Output[Model],
    candidates: Output[Markdown],
    repeat: bool = False,
    # params: train-voter (generated from triview/params.py by `python -m components.codegen`)
    seed: int = 0,
    # end params
):
    """Fit the voter on the branches' validation probabilities (or, when the branches
    ran with ``voter_folds > 1``, on their out-of-fold training probabilities, scored
    on validation) and pick the best candidate.

    Args:
        branch_1: First view's trained branch (with its validation probabilities).
        branch_2: Second view's trained branch.
        branch_3: Third view's trained branch.
        voter: Output folder: ``voter.json`` (the chosen voter) and ``candidates.csv``.
        candidates: Validation scores of every candidate voter, as Markdown.
        repeat: This task is a repeat of the run with another seed (``repeats > 1``).
        seed: Seed of the augmentation, resampling, initialisation, shuffling and the voter's
            folds (not of the split: see split_salt). (>= 0)
    """
    import pandas as pd

    from triview.params import pick
    from triview.stages import train_voter_stage

    dirs = [branch_1.path, branch_2.path, branch_3.path]
    rec = train_voter_stage(dirs, voter.path, repeat=repeat, **pick("train-voter", locals()))
    voter.metadata.update({"method": rec["method"], "val_macro_f1": rec["val_macro_f1"],
                           "task": rec["task"], "inputs": rec["voter_inputs"]})
    with open(candidates.path, "w") as fh:
        fh.write("# Voter candidates (validation split)\n\n"
                 + pd.DataFrame(rec["candidates"]).to_markdown(index=False) + "\n")
