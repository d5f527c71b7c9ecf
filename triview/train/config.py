"""The training configuration: one field per ``train-branch`` parameter of the spec
(:mod:`triview.params`), checked when it is built."""
from __future__ import annotations

import json
from dataclasses import asdict

from triview.params import config_class

TrainConfig = config_class("TrainConfig", "train-branch", module=__name__)

#: Fields that do not change the model a run trains (where it is stored, out-of-fold
#: extras, how many processes share it): a checkpoint written with other values resumes.
_NOT_IN_RESUME_KEY = ("checkpoint_root", "cache_root", "weights_root", "voter_folds", "ddp_procs",
                      "nodes", "loader_workers")


def resume_key(config: TrainConfig, view: str, classes: list[str], n_train: int,
               task: str = "multiclass", world_size: int = 1) -> str:
    """What must match for a checkpoint to be resumed."""
    fields = {k: v for k, v in asdict(config).items() if k not in _NOT_IN_RESUME_KEY}
    return json.dumps({"config": fields, "view": view, "classes": classes, "n_train": n_train,
                       "task": task, "world_size": world_size}, sort_keys=True)
