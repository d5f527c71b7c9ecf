"""What a search optimises: a held-out figure of the voter the trial would ship (the
candidate the voter chose, scored on the images it was chosen on: the out-of-fold
predictions of every training and validation image with cross-fitted heads, the photo
defaults; the validation split with fine-tuned branches, out-of-fold there too with
``voter_folds > 1``; fitted voters cross-validated), never a test figure; and the
per-epoch figure of the branches that feeds the pruner."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from triview.artifacts import CANDIDATES_FILE


@dataclass(frozen=True)
class Objective:
    name: str            # the column of the voter's candidates table
    direction: str       # "maximize" or "minimize"
    epoch_column: str    # the branches' per-epoch figure of the same kind (history rows)
    help: str

    def value(self, voter_dir: str | Path) -> float:
        """The figure of the chosen voter, from the voter's candidates table."""
        import pandas as pd

        table = pd.read_csv(Path(voter_dir) / CANDIDATES_FILE)
        chosen = table[table["chosen"].astype(bool)]
        if len(chosen) != 1:
            raise ValueError(f"{voter_dir}: expected one chosen voter, found {len(chosen)}")
        return float(chosen[self.name].iloc[0])

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` beats ``b``."""
        return a > b if self.direction == "maximize" else a < b


OBJECTIVES = {o.name: o for o in (
    Objective("val_macro_f1", "maximize", "val_macro_f1",
              "macro-F1 of the chosen voter on its held-out images (default)"),
    Objective("val_accuracy", "maximize", "val_accuracy",
              "accuracy of the chosen voter on its held-out images"),
    Objective("val_log_loss", "minimize", "val_loss",
              "log-loss of the chosen voter's probabilities on its held-out images"),
)}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
