"""The champion/challenger gate (TFX "blessing" style).

The challenger (this run's ensemble) must clear an absolute bar on the test split and,
when the registry has a champion, must not fall behind it by more than the allowed
margin. The champion is not judged by the numbers it recorded on its own test split:
its exported model is re-scored here on the challenger's test crops, so both are
measured on the same images. A champion that cannot see those crops as it was trained
to (other classes, views, image size, crop geometry or lens) is not compared, and the
challenger is not blessed, with that reason.

The result is a blessing (``blessing.json``) that export must check before it promotes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from triview import artifacts
from triview.params import PARAMS


@dataclass
class GateConfig:
    metric: str = "macro_f1"
    #: absolute bar: challenger[metric] >= min_value
    min_value: float = PARAMS["gate_min_macro_f1"].default
    #: challenger - champion >= min_delta: negative tolerates a regression of up to
    #: -min_delta (epsilon), positive demands an improvement of at least min_delta (delta)
    min_delta: float = PARAMS["gate_min_delta"].default


def comparability(card: dict, classes: list[str], geometry: dict, task: str = "multiclass") -> list[str]:
    """Why a champion's model card cannot be scored on the challenger's crops ([] if it can)."""
    reasons = []
    if list(card.get("classes", [])) != list(classes):
        reasons.append(f"champion classes {card.get('classes')} differ from the challenger's {classes}")
    if list(card.get("views", [])) != list(geometry["views"]):
        reasons.append(f"champion views {card.get('views')} differ from {geometry['views']}")
    if int(card.get("image_size", -1)) != int(geometry["geometry"]["image_size"]):
        reasons.append(f"champion image size {card.get('image_size')} differs from "
                       f"{geometry['geometry']['image_size']}")
    elif card.get("crop_geometry") != geometry["geometry"]:
        reasons.append("champion crop geometry differs from the challenger's")
    if card.get("lens") is not None and _lens(card.get("lens")) != _lens(geometry.get("lens")):
        reasons.append("champion lens model differs from the challenger's")
    if card.get("task", "multiclass") != task:
        reasons.append(f"champion task {card.get('task', 'multiclass')!r} differs from {task!r}")
    return reasons


def _lens(lens: dict | None) -> dict | None:
    if lens is None:
        return None
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in lens.items()}


def score_champion(model_dir: str | Path, views_dir: str | Path) -> dict:
    """The exported model in ``model_dir`` scored on the test crops of ``views_dir``."""
    import numpy as np

    from triview.runtime import load_runtime
    from triview.scoring import scores
    from triview.train.data import load_split

    run, card = load_runtime(model_dir)
    task = card.get("task", "multiclass")
    test = load_split(views_dir, card["views"], "test", task)
    prob = run([x.numpy().astype(np.float32) for x in test.inputs])
    return scores(test.labels.astype(np.int64) if task == "multilabel" else test.labels, prob,
                  card.get("thresholds") if task == "multilabel" else None)


def decide(challenger: dict, champion: dict | None, config: GateConfig,
           incomparable: list[str] | None = None, champion_version: int | None = None) -> dict:
    """The blessing: blessed or not, with every reason."""
    value = challenger.get(config.metric)
    reasons, blessed = [], True
    if value is None:
        return _blessing(False, [f"challenger has no {config.metric!r}"], config, None, None, None,
                         "incomparable", champion_version)
    if value >= config.min_value:
        reasons.append(f"{config.metric} {value:.4f} >= absolute bar {config.min_value:.4f}")
    else:
        blessed = False
        reasons.append(f"{config.metric} {value:.4f} is below the absolute bar {config.min_value:.4f}")
    if incomparable:
        return _blessing(False, reasons + [f"not compared with champion v{champion_version}: {r}"
                                           for r in incomparable],
                         config, value, None, None, "incomparable", champion_version)
    if champion is None:
        reasons.append("no champion in the registry: first model")
        return _blessing(blessed, reasons, config, value, None, None, "first_run", None)
    base = champion[config.metric]
    delta = value - base
    if delta >= config.min_delta:
        reasons.append(f"{config.metric} {value:.4f} vs champion v{champion_version} {base:.4f} "
                       f"on the same test images: change {delta:+.4f} >= {config.min_delta:+.4f}")
    else:
        blessed = False
        reasons.append(f"{config.metric} {value:.4f} vs champion v{champion_version} {base:.4f} "
                       f"on the same test images: change {delta:+.4f} < {config.min_delta:+.4f}")
    return _blessing(blessed, reasons, config, value, base, delta, "compared", champion_version)


def _blessing(blessed, reasons, config, challenger, champion, delta, comparison, version) -> dict:
    return {"blessed": bool(blessed), "reasons": reasons, "metric": config.metric,
            "challenger": challenger, "champion": champion, "delta": delta,
            "champion_version": version, "comparison": comparison, "thresholds": asdict(config)}


def run_gate(challenger: dict, views_dir: str | Path, registry: str = "", model_name: str = "triview",
             config: GateConfig | None = None, task: str = "multiclass") -> dict:
    """Compare ``challenger`` (ensemble scores on the test split) with the registry's champion."""
    from triview import crop
    from triview import manifest as mf
    from triview.registry import ModelRegistry

    config = config or GateConfig()
    if not registry:
        blessing = decide(challenger, None, config)
        blessing["comparison"] = "no_registry"
        return blessing
    reg = ModelRegistry(registry, model_name)
    pointer = reg.champion()
    if pointer is None:
        return decide(challenger, None, config)
    version = int(pointer["version"])
    folder = reg.fetch(version)
    card = artifacts.read_card(folder)
    geometry = json.loads((Path(views_dir) / crop.GEOMETRY_FILE).read_text())
    problems = comparability(card, mf.read_classes(views_dir), geometry, task)
    if problems:
        return decide(challenger, None, config, incomparable=problems, champion_version=version)
    champion = score_champion(folder, views_dir)
    blessing = decide(challenger, champion, config, champion_version=version)
    blessing["champion_scores"] = champion
    return blessing


def write_blessing(blessing: dict, out_dir: str | Path) -> Path:
    return artifacts.write_blessing(out_dir, blessing)


def read_blessing(location: str | Path) -> dict | None:
    return artifacts.read_blessing(location)
