"""What a search leaves behind besides its storage: the table of trials (CSV), the report
(one self-contained HTML file: the optimisation history and the parameter importances as
embedded pictures, the trials, the best settings and their test figures) and the best
settings as a preset YAML that ``triview run --preset`` reads."""
from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from triview import params as spec
from triview.storage import atomic_write_text

if TYPE_CHECKING:
    from triview.tune.study import Study

TRIALS_CSV, REPORT = "trials.csv", "report.html"


def trials_table(study: "Study", optuna_study) -> pd.DataFrame:
    """One row per trial: number, state, value, seconds, how many per-epoch figures it gave
    the pruner, where it was pruned (or why refused), what it reused, and its value of every
    searched parameter."""
    rows = []
    for t in optuna_study.trials:
        attrs = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name.lower(), study.objective.name: t.value,
                     "seconds": attrs.get("seconds"), "defaults": bool(attrs.get("defaults")),
                     "epochs_reported": len(t.intermediate_values),
                     "pruned_at": attrs.get("pruned_at", ""), "refused": attrs.get("refused", ""),
                     "reused": " ".join(attrs.get("reused", [])),
                     **{n: t.params.get(n) for n in study.space.names}})
    return pd.DataFrame(rows, columns=["trial", "state", study.objective.name, "seconds",
                                       "defaults", "epochs_reported", "pruned_at", "refused",
                                       "reused",
                                       *study.space.names])


def importances(optuna_study, seed: int = 0) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances of the searched parameters (seeded), or None and why not."""
    import optuna
    from optuna.trial import TrialState

    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"needs at least 2 complete trials ({len(complete)} so far)"
    try:
        values = optuna.importance.get_param_importances(
            optuna_study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError) as exc:
        return None, str(exc)
    return dict(values), "fANOVA (optuna.importance, seeded)"


def _history_figure(table: pd.DataFrame, objective) -> str:
    import matplotlib.pyplot as plt

    from triview.report import figure_data_uri

    fig, ax = plt.subplots(figsize=(7, 3.4))
    done = table[table["state"] == "complete"]
    ax.scatter(done["trial"], done[objective.name], s=18, label="complete", color="tab:blue")
    pruned = table[table["state"] == "pruned"]
    if len(pruned):
        ax.scatter(pruned["trial"], [done[objective.name].min() if len(done) else 0] * len(pruned),
                   marker="x", color="tab:gray", label="pruned (at the bottom)")
    if len(done):
        best = done[objective.name].cummax() if objective.direction == "maximize" \
            else done[objective.name].cummin()
        ax.step(done["trial"], best, where="post", color="tab:red", label="best so far")
    defaults = done[done["defaults"]]
    if len(defaults):
        ax.scatter(defaults["trial"], defaults[objective.name], s=60, facecolors="none",
                   edgecolors="black", label="trial 0 (as given)")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{objective.name} (validation)")
    ax.set_title("optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_data_uri(fig)


def _importance_figure(values: dict[str, float]) -> str:
    import matplotlib.pyplot as plt

    from triview.report import figure_data_uri

    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    ax.barh(names, [values[n] for n in names], color="tab:green")
    ax.set_xlabel("importance (share of the objective's variance)")
    ax.set_title("parameter importances")
    fig.tight_layout()
    return figure_data_uri(fig)


def render_html(study: "Study", table: pd.DataFrame, imp: tuple[dict | None, str],
                test: dict | None) -> str:
    from triview.report import STYLE

    e = html.escape
    obj = study.objective
    done = table[table["state"] == "complete"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>triview tune</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>triview tune</h1>",
             f"<p>data <code>{e(study.data)}</code>; search space <code>{e(study.space.source)}</code>"
             f"; objective <b>{e(obj.name)}</b> ({obj.direction}), measured on held-out "
             f"predictions (out-of-fold train + validation, or validation), never on test; TPE seed {study.seed}; {len(table)} trials "
             f"({len(done)} complete, {int((table['state'] == 'pruned').sum())} pruned, "
             f"{int((table['state'] == 'fail').sum())} failed).</p>"]
    pruned = int((table["state"] == "pruned").sum())
    if len(table) and table["epochs_reported"].sum() == 0:
        parts.append("<p>Pruning did not apply: no trial reported per-epoch figures.</p>")
    elif len(table):
        parts.append("<p>Pruning: a median pruner on each branch's best per-epoch validation "
                     f"figure ({e(obj.epoch_column)}), at the end of its head phase and after "
                     f"each fine-tuning epoch: {pruned} trial(s) pruned.</p>")
    if len(done):
        best = done.loc[done[obj.name].idxmax() if obj.direction == "maximize"
                        else done[obj.name].idxmin()]
        defaults = done[done["defaults"]]
        versus = (f" against {defaults[obj.name].iloc[0]:.4f} for trial 0 (the parameters as "
                  "given)") if len(defaults) else ""
        parts.append(f"<h2>Best</h2><p>trial {int(best['trial'])}: {obj.name} "
                     f"<b>{best[obj.name]:.4f}</b>{versus}. Preset: <code>best.yaml</code> "
                     "(<code>triview run --preset best.yaml</code>).</p>")
        parts.append(f"<img alt='optimisation history' src='{_history_figure(table, obj)}'>")
    values, why = imp
    parts.append("<h2>Parameter importances</h2>")
    if values:
        parts.append(f"<p>{e(why)}</p><img alt='parameter importances' "
                     f"src='{_importance_figure(values)}'>")
        parts.append(pd.Series(values, name="importance").to_frame().to_html(float_format="%.3f"))
    else:
        parts.append(f"<p>not computed: {e(why)}</p>")
    if test:
        rows = {**test["views"], "ensemble": test["ensemble"]}
        frame = pd.DataFrame({k: {m: v.get(m) for m in ("accuracy", "macro_f1")}
                              for k, v in rows.items()}).T
        parts.append(f"<h2>Test split, scored once for trial {test['trial']}</h2>"
                     f"<p>{test['n_test']} test images; full evaluation: "
                     f"<code>{e(test['report'])}</code></p>" + frame.to_html(float_format="%.4f"))
    parts.append("<h2>Trials</h2>" + table.to_html(index=False, float_format="%.4g", na_rep=""))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_results(study: "Study", optuna_study, test: dict | None = None) -> pd.DataFrame:
    """Write ``trials.csv`` and ``report.html`` into the study's folder."""
    table = trials_table(study, optuna_study)
    atomic_write_text(study.out / TRIALS_CSV, table.to_csv(index=False))
    imp = importances(optuna_study, study.seed)
    atomic_write_text(study.out / REPORT, render_html(study, table, imp, test))
    return table


def write_best_preset(study: "Study", best, values: dict[str, Any], path: Path) -> Path:
    """The best trial's parameters that differ from the spec's defaults, as a preset."""
    import yaml

    defaults = spec.defaults()
    chosen = {k: v for k, v in spec.validate(values, complete=True).items() if v != defaults[k]}
    header = (f"# triview tune: trial {best.number} of the study in {study.out}, "
              f"{study.objective.name} {best.value:.4f} on validation.\n"
              f"# Use it with: triview run --data DATA --out DIR --preset {path.name}\n")
    atomic_write_text(path, header + yaml.safe_dump(chosen, sort_keys=False))
    return path
