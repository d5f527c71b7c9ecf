"""The champion/challenger gate (TFX "blessing" style).

The challenger (this run's ensemble) must clear an absolute bar on the test split and,
when the registry has a champion, must not fall behind it by more than the allowed
margin. The champion is not judged by the numbers it recorded on its own test split:
its exported model is re-scored here on the challenger's test crops, so both are
measured on the same images. A champion that cannot see those crops as it was trained
to (other classes, views, image size, crop geometry or lens) is not compared, and the
challenger is not blessed, with that reason.

Both models are compared only on test images that neither of them trained or validated
on. The champion's model folder records what it saw: ``seen_images.txt`` (content-hash ids)
and ``seen_sources.json`` (their source groups, ingest's ``source_id``), each named in its
card with its SHA-256. A test image is excluded when its id or its source group is one the
champion saw (a re-encoded copy of a training photo shares its source group), and likewise
for the challenger (none, unless a split was given that overlaps). The gate fails closed:
a record that is absent, or whose SHA-256 differs from the card's (truncated, emptied,
edited), leaves no clean image. When fewer than ``min_clean_images`` remain, the comparison
is not made and ``fallback`` decides: ``keep_champion`` (default) refuses the challenger,
``absolute_bar`` blesses it on the absolute bar alone; the blessing says which, and why.

On the clean images the decision is a paired test (:mod:`triview.paired`): the bootstrap
distribution of the macro-F1 difference challenger - champion, both scored on the same
resamples. The challenger is blessed when the one-sided p-value of "the difference is at
most ``min_delta``" is at most (1 - ``confidence``) / 2, i.e. when the two-sided
``confidence`` interval lies above ``min_delta``. A negative ``min_delta`` makes this a
non-inferiority test (the challenger must be shown to lose less than ``-min_delta``), a
positive one a superiority test (it must be shown to gain more than ``min_delta``). The
blessing records the difference, the interval and the p-value.

The result is a blessing (``blessing.json``) that export must check before it promotes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from triview import artifacts
from triview.artifacts import Seen
from triview.params import PARAMS

if TYPE_CHECKING:
    from triview.paired import PairedDifference


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
    #: two-sided confidence of the interval of the paired difference (the test's level is
    #: (1 - confidence) / 2, one-sided)
    confidence: float = PARAMS["gate_confidence"].default
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


def clean_test_images(test_ids: list[str], test_sources: list[str], champion: Seen | None,
                      challenger: Seen, champion_problem: str = "champion_record_missing") -> dict:
    """Which of the challenger's test images (ids and their source groups) neither model
    trained or validated on.

    ``champion`` is None when its record is missing or does not match its card: every
    image then counts under ``champion_problem`` (fail closed). Returns ``{"ids": [...clean
    ids...], "test_images": n, "clean_images": k, "excluded": {reason: count}}``; an image
    is counted under the first reason that applies.
    """
    excluded = dict.fromkeys((champion_problem, "champion_trained_or_validated",
                              "champion_source_seen", "challenger_trained_or_validated",
                              "challenger_source_seen"), 0)
    clean = []
    for i, source in zip(test_ids, test_sources, strict=True):
        if champion is None:
            reason = champion_problem
        elif i in champion.ids:
            reason = "champion_trained_or_validated"
        elif champion.sources is not None and source in champion.sources:
            reason = "champion_source_seen"
        elif i in challenger.ids:
            reason = "challenger_trained_or_validated"
        elif challenger.sources is not None and source in challenger.sources:
            reason = "challenger_source_seen"
        else:
            clean.append(i)
            continue
        excluded[reason] += 1
    return {"ids": clean, "test_images": len(test_ids), "clean_images": len(clean),
            "excluded": {k: v for k, v in excluded.items() if v}}


def compare_on_clean(test: dict, champion: dict, clean_ids: list[str],
                     config: GateConfig) -> tuple[dict, dict, PairedDifference]:
    """Both models scored on the clean images only, and their paired macro-F1 difference.

    ``test`` holds the challenger's test predictions (``ids``, ``y``, ``ensemble``,
    ``thresholds``), ``champion`` the champion's on the same crops
    (:func:`champion_predictions`). Returns (champion scores, challenger scores, difference).
    """
    import numpy as np

    from triview.paired import macro_f1_difference
    from triview.scoring import predicted, scores, task_of

    keep = set(clean_ids)
    mine = [k for k, i in enumerate(test["ids"]) if i in keep]
    rows = {i: k for k, i in enumerate(champion["ids"])}
    theirs = [rows[test["ids"][k]] for k in mine]  # the champion's row of each clean image
    y = np.asarray(test["y"])[mine]
    if not np.array_equal(np.asarray(champion["y"])[theirs], y):
        raise ValueError("the champion's labels of the clean test images differ from the "
                         "challenger's: not the same test split")
    prob_mine, prob_theirs = np.asarray(test["ensemble"])[mine], np.asarray(champion["prob"])[theirs]
    task = task_of(y)
    paired = macro_f1_difference(
        y, predicted(prob_mine, task, test.get("thresholds")),
        predicted(prob_theirs, task, champion.get("thresholds")),
        bound=config.min_delta, confidence=config.confidence)
    return (scores(y, prob_theirs, champion.get("thresholds")),
            scores(y, prob_mine, test.get("thresholds")), paired)


def decide(challenger: dict, champion: dict | None, config: GateConfig,
           incomparable: list[str] | None = None, champion_version: int | None = None,
           clean: dict | None = None, challenger_clean: dict | None = None,
           drift: dict | None = None, paired: PairedDifference | None = None) -> dict:
    """The blessing: blessed or not, with every reason.

    ``challenger`` holds the challenger's scores on its whole test split (the absolute
    bar); ``challenger_clean`` and ``champion`` their scores on the clean test images
    (``clean``: :func:`clean_test_images`) and ``paired`` their paired difference there
    (:func:`compare_on_clean`), which decides. A ``clean`` with fewer than
    ``config.min_clean_images`` images applies ``config.fallback`` instead.
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
                       f"(neither model trained or validated on them or their source photos); "
                       f"excluded: {why}")
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
    if paired is None:
        raise ValueError("a champion comparison needs the paired difference on the clean images")
    compared = (challenger_clean or challenger)[config.metric]
    base = champion[config.metric]
    level = (1 - config.confidence) / 2
    rule = "non-inferiority" if config.min_delta < 0 else "superiority"
    shown = paired.p_value <= level
    reasons.append(
        f"{config.metric} {compared:.4f} vs champion v{champion_version} {base:.4f} on the same "
        f"{paired.images} clean test images: change {paired.delta:+.4f}, "
        f"{config.confidence:.0%} interval [{paired.low:+.4f}, {paired.high:+.4f}] "
        f"(paired bootstrap, {paired.resamples} resamples); {rule} test of change > "
        f"{config.min_delta:+.4f}: p = {paired.p_value:.4g} "
        + (f"<= {level:.4g}, shown" if shown else f"> {level:.4g}, not shown"))
    if not shown:
        blessed = False
    result = _blessing(blessed, reasons, config, value, base, paired.delta, "compared",
                       champion_version, clean)
    result.update(challenger_compared=compared, rule=rule, interval=[paired.low, paired.high],
                  p_value=paired.p_value, paired=paired.record())
    return result


def _blessing(blessed, reasons, config, challenger, champion, delta, comparison, version,
              clean=None) -> dict:
    return {"blessed": bool(blessed), "reasons": reasons, "metric": config.metric,
            "challenger": challenger, "champion": champion, "delta": delta,
            "interval": None, "p_value": None,
            "champion_version": version, "comparison": comparison, "thresholds": asdict(config),
            "clean": None if clean is None else {k: v for k, v in clean.items() if k != "ids"}}


def metric_values(blessing: dict) -> dict[str, float]:
    """The gate's numbers as metrics (KFP Metrics, the Pushgateway): the clean comparison,
    the change in macro-F1, its interval and p-value (those measured)."""
    values = {}
    clean = blessing.get("clean")
    if clean:
        values.update(gate_clean_images=clean["clean_images"],
                      gate_excluded_images=clean["test_images"] - clean["clean_images"])
    if blessing.get("interval") is not None:
        values.update(gate_delta=blessing["delta"], gate_delta_low=blessing["interval"][0],
                      gate_delta_high=blessing["interval"][1], gate_p_value=blessing["p_value"])
    return values


def run_gate(challenger: dict, views_dir: str | Path, registry: str = "", model_name: str = "triview",
             config: GateConfig | None = None, task: str = "multiclass", test: dict | None = None,
             drift: dict | None = None) -> dict:
    """Compare ``challenger`` (ensemble scores on the test split) with the registry's champion.

    ``test`` holds the challenger's test predictions (``ids``, ``y``, ``ensemble`` and, for
    multi-label, ``thresholds``), which the paired comparison on the clean images needs;
    without it a run whose champion is comparable on enough clean images is an error.
    """
    from triview import crop
    from triview import manifest as mf
    from triview.registry import ModelRegistry

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
    source_of = dict(zip(views["image_id"].astype(str), views["source_id"].astype(str)))
    problem = "champion_record_missing"
    try:
        champion_seen = artifacts.read_seen_images(folder, (card.get("data") or {}).get("seen_images"))
    except artifacts.SeenRecordError as exc:  # fail closed: no record, no clean image
        champion_seen, problem = None, exc.reason
    challenger_seen = Seen(frozenset(mf.seen_image_ids(views)), frozenset(mf.seen_source_ids(views)))
    clean = clean_test_images(test_ids, [source_of[i] for i in test_ids], champion_seen,
                              challenger_seen, problem)
    if clean["clean_images"] < config.min_clean_images:
        return decide(challenger, None, config, champion_version=version, clean=clean, drift=drift)
    if test is None:
        raise ValueError("the champion comparison needs the challenger's test predictions")
    champion, challenger_clean, paired = compare_on_clean(test, champ, clean["ids"], config)
    blessing = decide(challenger, champion, config, champion_version=version, clean=clean,
                      challenger_clean=challenger_clean, drift=drift, paired=paired)
    if champion_seen is not None and champion_seen.sources is None:
        blessing["reasons"].insert(-1, f"champion v{version} records no source groups (exported "
                                   "before they were recorded): excluded by content hash only")
    blessing["champion_scores"] = champion
    blessing["challenger_clean_scores"] = challenger_clean
    return blessing


def write_blessing(blessing: dict, out_dir: str | Path) -> Path:
    return artifacts.write_blessing(out_dir, blessing)


def read_blessing(location: str | Path) -> dict | None:
    return artifacts.read_blessing(location)
