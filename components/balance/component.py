from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def balance(
    views: Input[Dataset],
    balance: Output[Dataset],
    class_counts: Output[Markdown],
    # params: balance (generated from triview/params.py by `python -m components.codegen`)
    seed: int = 0, class_weighting: str = "inverse_frequency", beta: float = 0.999,
    resample: str = "none", resample_target: float = 0.0,
    # end params
):
    """Count images per class and split, and compute the training class weights.

    Args:
        views: Cropped views dataset.
        balance: Output folder: ``balance.json`` (class weights, counts) and ``class_counts.csv``.
        class_counts: The per-split class counts as a Markdown table for the UI.
        seed: Seed of the augmentation, resampling, initialisation, shuffling and the voter's
            folds (not of the split: see split_salt). (>= 0)
        class_weighting: Class weights of the loss: inverse_frequency (N / (C n_c)),
            effective_number (Cui et al. 2019) or none. (one of inverse_frequency,
            effective_number, none)
        beta: The effective-number beta. (in [0, 1))
        resample: Training-split resampling: none, oversample (repeat minority images) or
            undersample (drop majority images); val/test never. (one of none, oversample,
            undersample)
        resample_target: Target images per class: 0 = the largest (oversample) or smallest
            (undersample) class; in (0, 1] a share of the largest class; > 1 a count. (>= 0)
    """
    import pandas as pd

    from triview.params import pick
    from triview.stages import balance_stage

    rec = balance_stage(views.path, balance.path, **pick("balance", locals()))
    balance.metadata.update({"imbalance_ratio": rec["imbalance_ratio"],
                             "class_weights": rec["class_weights"]})
    table = pd.read_csv(f"{balance.path}/class_counts.csv")
    after = rec["train_counts_after"]
    table["train (resampled)"] = [after[c] for c in table["label"].astype(str)]
    with open(class_counts.path, "w") as fh:
        fh.write(f"# Images per class and split\n\nimbalance ratio (train): "
                 f"{rec['imbalance_ratio']:.2f}\n\n" + table.to_markdown(index=False) + "\n")
