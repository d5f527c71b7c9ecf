"""The champion/challenger gate (TFX "blessing" style).

The challenger (this run's ensemble) must clear an absolute bar on the test split and,
when the registry has a champion, must not fall behind it by more than the allowed
margin. The champion is not judged by the numbers it recorded on its own test split:
its exported model is re-scored here on the challenger's test crops, so both are
measured on the same images. A champion that cannot see those crops as it was trained
to (other classes, views, image size, crop geometry or lens) is not compared, and the
challenger is not blessed, with that reason.

Both models are compared only on test images that neither of them trained or validated
on: the champion's model folder records the images it saw (``seen_images.txt``, content-hash
ids, named in its card), and the challenger's test images it saw are excluded too (none, unless a split was
given that overlaps). When fewer than ``min_clean_images`` remain (a champion trained on a
split drawn with another salt, or a card from before this record), the comparison is not
made and ``fallback`` decides: ``keep_champion`` (default) refuses the challenger,
``absolute_bar`` blesses it on the absolute bar alone; the blessing says which, and why.

The result is a blessing (``blessing.json``) that export must check before it promotes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from triview import artifacts
from triview.params import PARAMS


FALLBACKS = ("keep_champion", "absolute_bar")


@dataclass
class GateConfig:
    metric: str = "macro_f1"
    #: absolute bar: challenger[metric] >= min_value
    min_value: float = PARAMS["gate_min_macro_f1"].default
    #: challenger - champion >= min_delta: negative tolerates a regression of up to
    #: -min_delta (epsilon), positive demands an improvement of at least min_delta (delta)
    min_delta: float = PARAMS["gate_min_delta"].default
    #: fewest clean test images (neither model saw them) a comparison is made on
    min_clean_images: int = PARAMS["gate_min_clean_images"].default
    #: too few clean images: keep_champion (not blessed) or absolute_bar (the bar alone)
    fallback: str = PARAMS["gate_fallback"].default
    #: embedding drift (two-sample ROC-AUC) above which the challenger is not blessed; 0: off
    max_drift: float = PARAMS["gate_max_drift"].default


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


def champion_predictions(model_dir: str | Path, views_dir: str | Path) -> dict:
    """The exported model in ``model_dir`` run on the test crops of ``views_dir``:
    ``{ids, y, prob, thresholds}``."""
    import numpy as np

    from triview.runtime import load_runtime
    from triview.train.data import load_split

    run, card = load_runtime(model_dir)
    task = card.get("task", "multiclass")
    test = load_split(views_dir, card["views"], "test", task)
    prob = run([x.numpy().astype(np.float32) for x in test.inputs])
    y = test.labels.astype(np.int64) if task == "multilabel" else test.labels
    return {"ids": list(test.image_ids), "y": y, "prob": prob,
            "thresholds": card.get("thresholds") if task == "multilabel" else None}


def score_champion(model_dir: str | Path, views_dir: str | Path) -> dict:
    """The exported model in ``model_dir`` scored on all the test crops of ``views_dir``."""
    from triview.scoring import scores

    pred = champion_predictions(model_dir, views_dir)
    return scores(pred["y"], pred["prob"], pred["thresholds"])


def clean_test_images(test_ids: list[str], champion_seen: set[str] | None,
                      challenger_seen: set[str]) -> dict:
    """Which of the challenger's test images neither model trained or validated on.

    ``champion_seen`` is None when the champion records nothing (every image then counts
    as ``champion_record_missing``). Returns ``{"ids": [...clean ids...], "test_images": n,
    "clean_images": k, "excluded": {reason: count}}``; an image is counted under the first
    reason that applies.
    """
    excluded = {"champion_trained_or_validated": 0, "challenger_trained_or_validated": 0,
                "champion_record_missing": 0}
    clean = []
    for i in test_ids:
        if champion_seen is None:
            excluded["champion_record_missing"] += 1
        elif i in champion_seen:
            excluded["champion_trained_or_validated"] += 1
        elif i in challenger_seen:
            excluded["challenger_trained_or_validated"] += 1
        else:
            clean.append(i)
    return {"ids": clean, "test_images": len(test_ids), "clean_images": len(clean),
            "excluded": {k: v for k, v in excluded.items() if v}}


def decide(challenger: dict, champion: dict | None, config: GateConfig,
           incomparable: list[str] | None = None, champion_version: int | None = None,
           clean: dict | None = None, challenger_clean: dict | None = None,
           drift: dict | None = None) -> dict:
    """The blessing: blessed or not, with every reason.

    ``challenger`` holds the challenger's scores on its whole test split (the absolute
    bar); ``challenger_clean`` and ``champion`` their scores on the clean test images
    (``clean``: :func:`clean_test_images`), which the comparison uses. A ``clean`` with
    fewer than ``config.min_clean_images`` images applies ``config.fallback`` instead.
    """
    value = challenger.get(config.metric)
    reasons, blessed = [], True
    if value is None:
        return _blessing(False, [f"challenger has no {config.metric!r}"], config, None, None, None,
                         "incomparable", champion_version, clean)
    if value >= config.min_value:
        reasons.append(f"{config.metric} {value:.4f} >= absolute bar {config.min_value:.4f}")
    else:
        blessed = False
        reasons.append(f"{config.metric} {value:.4f} is below the absolute bar {config.min_value:.4f}")
    auc = (drift or {}).get("embedding_auc")
    if config.max_drift > 0 and auc is not None and auc > config.max_drift:
        blessed = False
        reasons.append(f"embedding drift {auc:.3f} (two-sample ROC-AUC, new images against the "
                       f"champion's) is above gate_max_drift {config.max_drift:.3f}: stop and look")
    if incomparable:
        return _blessing(False, reasons + [f"not compared with champion v{champion_version}: {r}"
                                           for r in incomparable],
                         config, value, None, None, "incomparable", champion_version, clean)
    if champion is None and clean is None:
        reasons.append("no champion in the registry: first model")
        return _blessing(blessed, reasons, config, value, None, None, "first_run", None)
    if clean is not None:
        why = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in clean["excluded"].items()) or "none"
        reasons.append(f"{clean['clean_images']} of {clean['test_images']} test images are clean "
                       f"(neither model trained or validated on them); excluded: {why}")
        if clean["clean_images"] < config.min_clean_images:
            reasons.append(f"too few clean test images to compare with champion "
                           f"v{champion_version} ({clean['clean_images']} < gate_min_clean_images "
                           f"{config.min_clean_images})")
            if config.fallback == "keep_champion":
                reasons.append("fallback keep_champion: the champion stays, the challenger is "
                               "not blessed")
                blessed = False
            else:
                reasons.append("fallback absolute_bar: judged on the absolute bar alone")
            return _blessing(blessed, reasons, config, value, None, None, "too_few_clean",
                             champion_version, clean)
    compared = (challenger_clean or challenger)[config.metric]
    base = champion[config.metric]
    delta = compared - base
    where = ("on the same test images" if clean is None
             else f"on the same {clean['clean_images']} clean test images")
    if delta >= config.min_delta:
        reasons.append(f"{config.metric} {compared:.4f} vs champion v{champion_version} {base:.4f} "
                       f"{where}: change {delta:+.4f} >= {config.min_delta:+.4f}")
    else:
        blessed = False
        reasons.append(f"{config.metric} {compared:.4f} vs champion v{champion_version} {base:.4f} "
                       f"{where}: change {delta:+.4f} < {config.min_delta:+.4f}")
    result = _blessing(blessed, reasons, config, value, base, delta, "compared", champion_version,
                       clean)
    result["challenger_compared"] = compared
    return result


def _blessing(blessed, reasons, config, challenger, champion, delta, comparison, version,
              clean=None) -> dict:
    return {"blessed": bool(blessed), "reasons": reasons, "metric": config.metric,
            "challenger": challenger, "champion": champion, "delta": delta,
            "champion_version": version, "comparison": comparison, "thresholds": asdict(config),
            "clean": None if clean is None else {k: v for k, v in clean.items() if k != "ids"}}


def run_gate(challenger: dict, views_dir: str | Path, registry: str = "", model_name: str = "triview",
             config: GateConfig | None = None, task: str = "multiclass", test: dict | None = None,
             drift: dict | None = None) -> dict:
    """Compare ``challenger`` (ensemble scores on the test split) with the registry's champion.

    ``test`` holds the challenger's test predictions (``ids``, ``y``, ``ensemble`` and, for
    multi-label, ``thresholds``), which the clean comparison re-scores; without it the
    challenger's test ids are read from the views and its full-split scores are used
    (correct only while none of its test images is excluded).
    """
    import numpy as np

    from triview import crop
    from triview import manifest as mf
    from triview.registry import ModelRegistry
    from triview.scoring import scores

    config = config or GateConfig()
    if config.fallback not in FALLBACKS:
        raise ValueError(f"gate fallback must be one of {FALLBACKS}, got {config.fallback!r}")
    if not registry:
        blessing = decide(challenger, None, config, drift=drift)
        blessing["comparison"] = "no_registry"
        blessing["reasons"] = [r for r in blessing["reasons"] if "first model" not in r] + [
            "no registry: no champion to compare with, nothing is promoted"]
        return blessing
    reg = ModelRegistry(registry, model_name)
    pointer = reg.champion()
    if pointer is None:
        return decide(challenger, None, config, drift=drift)
    version = int(pointer["version"])
    folder = reg.fetch(version)
    card = artifacts.read_card(folder)
    geometry = json.loads((Path(views_dir) / crop.GEOMETRY_FILE).read_text())
    problems = comparability(card, mf.read_classes(views_dir), geometry, task)
    if problems:
        return decide(challenger, None, config, incomparable=problems, champion_version=version,
                      drift=drift)
    views = mf.read_views(views_dir)
    champ = champion_predictions(folder, views_dir)
    test_ids = list(test["ids"]) if test is not None else champ["ids"]
    clean = clean_test_images(test_ids, artifacts.read_seen_images(folder),
                              set(mf.seen_image_ids(views)))
    if clean["clean_images"] < config.min_clean_images:
        return decide(challenger, None, config, champion_version=version, clean=clean, drift=drift)
    keep = set(clean["ids"])
    rows = [k for k, i in enumerate(champ["ids"]) if i in keep]
    champion = scores(champ["y"][rows], champ["prob"][rows], champ["thresholds"])
    if test is not None:
        mine = [k for k, i in enumerate(test["ids"]) if i in keep]
        y = np.asarray(test["y"])
        challenger_clean = scores(y[mine], np.asarray(test["ensemble"])[mine],
                                  test.get("thresholds"))
    else:
        challenger_clean = challenger
    blessing = decide(challenger, champion, config, champion_version=version, clean=clean,
                      challenger_clean=challenger_clean, drift=drift)
    blessing["champion_scores"] = champion
    blessing["challenger_clean_scores"] = challenger_clean
    return blessing


def write_blessing(blessing: dict, out_dir: str | Path) -> Path:
    return artifacts.write_blessing(out_dir, blessing)


def read_blessing(location: str | Path) -> dict | None:
    return artifacts.read_blessing(location)
