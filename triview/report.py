"""The evaluation report: one self-contained HTML file (every plot and image embedded as a
data: URI, no external resource) and a Markdown twin with the tables."""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th{background:#f3f3f3}
.gallery{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:1.5em}
.card{border:1px solid #ddd;padding:6px;font-size:12px;text-align:center;background:#fafafa}
.card img{width:96px;height:96px;image-rendering:pixelated;margin:1px}
.blessed,.ahead{color:#0a0;font-weight:bold}.unblessed,.behind,.warning{color:#c00;font-weight:bold}
figure{display:inline-block;margin:0 12px 12px 0}
"""


@dataclass
class ReportInputs:
    result: dict                                   # evaluate's result (eval.json)
    voter: dict
    candidates: pd.DataFrame | None = None
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)
    head_histories: dict[str, pd.DataFrame] = field(default_factory=dict)  # view -> head epochs
    timing: dict | None = None
    misclassified: list[dict] = field(default_factory=list)   # may carry "crops": {view: RGB}
    gradcam: dict[str, list[dict]] = field(default_factory=dict)  # view -> [{"overlay", ...}]
    blessing: dict | None = None
    drift: dict | None = None                      # triview.drift.measure's result


def png_data_uri(image: np.ndarray) -> str:
    """An RGB uint8 array as a PNG data: URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metrics_table(result: dict) -> pd.DataFrame:
    rows = {**result["views"], "ensemble": result["ensemble"]}
    table = pd.DataFrame({k: {m: v for m, v in s.items() if m != "method"} for k, s in rows.items()}).T
    table.index.name = "model"
    return table


def per_class_table(result: dict, metric: str = "f1-score") -> pd.DataFrame:
    classes = result["classes"]
    return pd.DataFrame({name: [d["classification_report"][c][metric] for c in classes]
                         for name, d in result["details"].items()}, index=pd.Index(classes, name="class"))


def roc_auc_table(result: dict) -> pd.DataFrame:
    return pd.DataFrame({name: d["roc_auc_per_class"] for name, d in result["details"].items()}) \
        .rename_axis("class")


def timing_table(timing: dict) -> pd.DataFrame:
    return pd.DataFrame(timing["branches"]).T.rename_axis("view")


def _confusion_figure(detail: dict, classes: list[str], title: str) -> str:
    cm, norm = np.asarray(detail["confusion_matrix"]), np.asarray(detail["confusion_matrix_normalized"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), dpi=80)
    for ax, data, what, fmt in ((axes[0], cm, "counts", "{:d}"), (axes[1], norm, "normalised", "{:.2f}")):
        ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(classes)), classes, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {what}", fontsize=10)
        high = data.max() / 2 if data.size else 0
        if len(classes) <= 20:
            for (i, j), v in np.ndenumerate(data):
                ax.text(j, i, fmt.format(int(v)) if what == "counts" else fmt.format(v),
                        ha="center", va="center", fontsize=6, color="white" if v > high else "black")
    fig.tight_layout()
    return figure_data_uri(fig)


def _roc_figure(curve: dict, auc: float | None) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 4), dpi=80)
    ax.plot(curve["fpr"], curve["tpr"], label=f"ensemble (macro AUC {auc:.3f})" if auc else "ensemble")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, micro-averaged one-vs-rest", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return figure_data_uri(fig)


def _curves_figure(histories: dict[str, pd.DataFrame],
                   head_histories: dict[str, pd.DataFrame] | None = None) -> str:
    """Loss and validation macro-F1 per epoch: one row of plots for the head phase (x: head
    epoch) when there was one, one for the epochs of ``history.csv`` when there are more
    than the head's row (fine-tuning; epoch 0 is the head phase's best)."""
    panels = []
    if head_histories:
        panels.append(("head phase", "head epoch", {v: h.rename(columns={"head_epoch": "x"})
                                                    for v, h in head_histories.items()}))
    trained = {v: h.assign(x=h["epoch"]) for v, h in histories.items()
               if not head_histories or len(h) > 1}
    if trained:
        panels.append(("fine-tuning (0: head phase)" if head_histories else "training",
                       "epoch", trained))
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.4 * len(panels)), dpi=80, squeeze=False)
    for row, (title, xlabel, curves) in zip(axes, panels):
        for view, h in curves.items():
            line, = row[0].plot(h["x"], h["train_loss"], label=f"{view} train")
            if "val_loss" in h:
                row[0].plot(h["x"], h["val_loss"], "--", color=line.get_color(), label=f"{view} val")
            if "val_macro_f1" in h:
                row[1].plot(h["x"], h["val_macro_f1"], marker="o", ms=3, label=view)
        row[0].set_title(f"{title}: loss", fontsize=9)
        row[1].set_title(f"{title}: validation macro-F1", fontsize=9)
        for ax in row:
            ax.set_xlabel(xlabel)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_data_uri(fig)


def calibration_table(result: dict) -> pd.DataFrame:
    """Expected calibration error per view and of the ensemble, before and after the
    temperatures."""
    rows = {**result["views"], "ensemble": result["ensemble"]}
    return pd.DataFrame({name: {"ECE before": s.get("ece_before"), "ECE after": s.get("ece")}
                         for name, s in rows.items()}).T.rename_axis("model")


def _reliability_figure(calibration: dict) -> str:
    """The ensemble's reliability diagram: accuracy against confidence per bin, before and
    after the temperatures (marker area ~ images in the bin)."""
    fig, ax = plt.subplots(figsize=(4.4, 4.2), dpi=80)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfectly calibrated")
    for key, colour in (("before", "tab:orange"), ("after", "tab:blue")):
        bins = calibration["reliability"][key]
        if bins:
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "-o",
                    color=colour, ms=3, label=f"{key} temperature scaling")
            ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins],
                       s=[8 + 2 * b["count"] for b in bins], color=colour, alpha=0.3)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("reliability (ensemble, test)", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return figure_data_uri(fig)


def _curves_caption(histories: dict[str, pd.DataFrame],
                    head_histories: dict[str, pd.DataFrame]) -> str:
    """What the training curves show, in words."""
    parts = []
    if head_histories:
        epochs = max(len(h) for h in head_histories.values())
        parts.append(f"Head phase (epoch 0): {epochs} epochs per view of the new head on "
                     f"features of the frozen backbone, computed once per crop.")
    tuned = max((int((h["epoch"] > 0).sum()) for h in histories.values()), default=0)
    if tuned:
        parts.append(f"Fine-tuning: {tuned} epochs" + (", starting from the head phase's best "
                                                       "(epoch 0)." if head_histories else "."))
    elif head_histories:
        parts.append("No fine-tuning epochs (epochs=0): the head phase's best is the model.")
    return f"<p>{' '.join(parts)}</p>" if parts else ""


def _table_html(df: pd.DataFrame, **kwargs) -> str:
    """One header row: a named index becomes the first column (pandas would give the
    name a header row of its own, empty but for that name)."""
    if df.index.name is not None and kwargs.get("index", True):
        df, kwargs = df.reset_index(), {**kwargs, "index": False}
    return df.round(4).to_html(na_rep="–", border=0, **kwargs)


def _blessing_html(b: dict) -> str:
    """The gate's verdict. Without a registry there is nothing to compare with or promote,
    and the section says so instead of a verdict."""
    if b.get("comparison") == "no_registry":
        return ("<p>No registry (the <code>registry</code> parameter is empty): no champion to "
                f"compare with, and nothing is promoted. The absolute bar: {html.escape(b['metric'])} "
                f"{b['challenger']:.4f} against gate_min_macro_f1 "
                f"{(b.get('thresholds') or {}).get('min_value', 0.0):.4f}.</p>")
    verdict = "<span class='blessed'>blessed</span>" if b["blessed"] else \
        "<span class='unblessed'>not blessed</span>"
    items = "".join(f"<li>{html.escape(r)}</li>" for r in b.get("reasons", []))
    rows = {k: b.get(k) for k in ("metric", "challenger", "challenger_compared", "champion", "delta",
                                  "champion_version", "comparison", "rule")}
    if b.get("interval") is not None:
        confidence = (b.get("thresholds") or {}).get("confidence")
        rows[f"delta {confidence:.0%} interval" if confidence else "delta interval"] = \
            f"[{b['interval'][0]:+.4f}, {b['interval'][1]:+.4f}]"
        rows["p-value"] = f"{b['p_value']:.4g}"
    clean = b.get("clean") or {}
    if clean:
        rows.update({"test images": clean["test_images"], "clean test images": clean["clean_images"],
                     **{f"excluded: {k.replace('_', ' ')}": v for k, v in clean["excluded"].items()}})
    rows.update({f"threshold {k}": v for k, v in (b.get("thresholds") or {}).items()})
    rows = {k: v for k, v in rows.items() if v is not None}   # no rows of "–"
    table = pd.DataFrame({"value": rows}).rename_axis("gate")
    return f"<p>The challenger is {verdict}.</p><ul>{items}</ul>" + _table_html(table)


def _interval_html(result: dict) -> str:
    """The 95 % interval of the ensemble's test accuracy, and a warning when it is too
    wide to trust."""
    ci = result.get("accuracy_interval")
    if not ci:
        return ""
    text = (f"<p>Ensemble test accuracy {result['ensemble']['accuracy']:.3f} on {ci['n']} test "
            f"images: {ci['confidence']:.0%} interval {ci['low']:.3f} to {ci['high']:.3f} "
            f"(Wilson score interval).</p>")
    if not ci["trusted"]:
        text += (f"<p class='warning'>{ci['n']} test images are too few to trust these "
                 f"figures: one image is {1 / max(ci['n'], 1):.1%} of accuracy. Add photos or "
                 f"raise test_fraction.</p>")
    return text


def _drift_html(d: dict) -> str:
    from triview.drift import summary_lines

    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(d))
    if not d.get("measured"):
        return f"<ul>{items}</ul>"
    rows = {"classes: PSI": d["classes"]["psi"], "classes: chi-square p": d["classes"]["p_value"],
            "embeddings: two-sample ROC-AUC": d["embedding"].get("auc"),
            **{f"{k}: KS": v["ks"] for k, v in d["image"].items()}}
    shares = pd.DataFrame({"champion's data": d["classes"]["reference_share"],
                           "new images": d["classes"]["new_share"]}).rename_axis("class share")
    return (f"<ul>{items}</ul>" + pd.DataFrame({"value": rows}).rename_axis("drift")
            .pipe(_table_html) + _table_html(shares))


def _card(image_uris: list[str], caption: str) -> str:
    imgs = "".join(f"<img alt='{html.escape(caption)}' src='{u}'>" for u in image_uris)
    return f"<div class='card'>{imgs}<br>{html.escape(caption)}</div>"


def render_html(inp: ReportInputs) -> str:
    r = inp.result
    classes = r["classes"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>triview evaluation</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>triview evaluation</h1><p>{r['n_test']} test images, task <code>{r['task']}</code>. "
        f"Ensemble method <code>{html.escape(inp.voter['name'])}</code>; best single view "
        f"<code>{html.escape(r['best_view'])}</code>; ensemble gain in macro-F1 "
        f"{r['ensemble_gain_macro_f1']:+.4f}.</p>",
    ]
    versus = r.get("versus_best_view")
    if versus:
        css = "ahead" if versus["beats"] else "behind"
        parts.append(f"<p class='{css}'>{html.escape(versus['statement'][0].upper() + versus['statement'][1:])}.</p>")
    parts += ["<h2>Test metrics</h2>", _table_html(metrics_table(r)), _interval_html(r)]
    if inp.blessing is not None:
        parts += ["<h2>Gate (champion / challenger)</h2>", _blessing_html(inp.blessing)]
    if inp.drift is not None:
        parts += ["<h2>Drift against the champion's data</h2>", _drift_html(inp.drift)]
    parts += ["<h2>Per class F1 (views and ensemble side by side)</h2>", _table_html(per_class_table(r)),
              "<h2>Per class ROC-AUC (one-vs-rest)</h2>", _table_html(roc_auc_table(r)),
              "<h2>Classification report (ensemble)</h2>",
              _table_html(pd.DataFrame(r["classification_report"]).T)]
    if r.get("calibration"):
        c = r["calibration"]
        temperature = c.get("temperature")
        parts += ["<h2>Calibration</h2>",
                  f"<p>Expected calibration error ({c['bins']} equal-width confidence bins) on the "
                  "test split, before and after temperature scaling (per branch and of the "
                  "ensemble, fitted on held-out predictions, never on test)"
                  + (f"; ensemble temperature {temperature:.3f}" if temperature else "") + ".</p>",
                  _table_html(calibration_table(r)),
                  f"<img alt='reliability diagram' src='{_reliability_figure(c)}'>"]
    if inp.timing:
        t = inp.timing
        parts += ["<h2>Timing</h2>",
                  f"<p>Device: <code>{html.escape(str(t.get('device')))}</code>. Ensemble inference "
                  f"(eager PyTorch, batch 1, one thread): {t.get('ensemble_ms_per_sample', float('nan')):.2f} "
                  f"ms per sample; batched ({t.get('batch', 64)} per batch, all threads): "
                  f"{t.get('ensemble_batched_ms_per_sample', float('nan')):.3f} "
                  f"ms per sample. {t.get('ensemble_parameters', 0):,} parameters in all.</p>", _table_html(timing_table(t))]
    if inp.histories or inp.head_histories:
        parts += ["<h2>Training curves</h2>", _curves_caption(inp.histories, inp.head_histories),
                  f"<img alt='training curves' src='{_curves_figure(inp.histories, inp.head_histories)}'>"]
    if inp.candidates is not None:
        parts += ["<h2>Voter candidates (validation)</h2>", _table_html(inp.candidates, index=False)]
    parts.append("<h2>Confusion matrices</h2>")
    if r["task"] == "multilabel":
        for name, d in r["details"].items():
            flat = pd.DataFrame([np.asarray(m).ravel() for m in d["confusion_matrix"]],
                                index=classes, columns=["tn", "fp", "fn", "tp"])
            parts += [f"<h3>{html.escape(name)}</h3>", _table_html(flat)]
    else:
        for name, d in r["details"].items():
            uri = _confusion_figure(d, classes, name)
            parts.append(f"<figure><img alt='confusion matrix {html.escape(name)}' src='{uri}'></figure>")
    parts += ["<h2>ROC curve (ensemble)</h2>",
              f"<img alt='ROC curve' src='{_roc_figure(r['roc_curve'], r['ensemble'].get('roc_auc'))}'>"]
    parts.append("<h2>Misclassified test images (ensemble, most confident first)</h2>")
    if not inp.misclassified:
        parts.append("<p>None.</p>")
    else:
        cards = []
        for m in inp.misclassified:
            uris = [png_data_uri(c) for c in m.get("crops", {}).values()]
            cards.append(_card(uris, f"{m['image_id'][:8]}: true {m['true']}, "
                                     f"predicted {m['pred']} ({m['score']:.2f})"))
        parts.append(f"<div class='gallery'>{''.join(cards)}</div>")
    if inp.gradcam:
        parts.append("<h2>Grad-CAM per view (branch's predicted class)</h2>")
        for view, items in inp.gradcam.items():
            parts.append(f"<h3>{html.escape(view)}</h3>")
            for correct, title in ((True, "correct"), (False, "wrong")):
                chosen = [i for i in items if i["correct"] == correct]
                cards = [_card([png_data_uri(i["image"]), png_data_uri(i["overlay"])],
                               f"true {i['true']}, predicted {i['pred']} ({i['score']:.2f})")
                         for i in chosen]
                parts.append(f"<h4>{title}</h4><div class='gallery'>{''.join(cards) or 'none'}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(inp: ReportInputs) -> str:
    r = inp.result
    md = [f"# triview evaluation ({r['n_test']} test images)", "",
          f"Ensemble method: `{inp.voter['name']}`; best single view: `{r['best_view']}`; "
          f"ensemble gain in macro-F1: {r['ensemble_gain_macro_f1']:+.4f}", ""]
    if r.get("versus_best_view"):
        statement = r["versus_best_view"]["statement"]
        md += [statement[0].upper() + statement[1:] + ".", ""]
    md += ["## Test metrics", "", metrics_table(r).round(4).to_markdown(), ""]
    ci = r.get("accuracy_interval")
    if ci:
        md += [f"Ensemble test accuracy on {ci['n']} images: {ci['confidence']:.0%} interval "
               f"{ci['low']:.3f} to {ci['high']:.3f} (Wilson)"
               + ("" if ci["trusted"] else "; too few test images to trust these figures"), ""]
    if inp.blessing is not None:
        b = inp.blessing
        verdict = ("no registry: no champion to compare with, nothing promoted"
                   if b.get("comparison") == "no_registry"
                   else f"**{'blessed' if b['blessed'] else 'not blessed'}**: "
                   + "; ".join(b.get("reasons", [])))
        md += ["## Gate", "", verdict, ""]
    if inp.drift is not None:
        from triview.drift import summary_lines

        md += ["## Drift against the champion's data", ""] + [f"- {x}" for x in summary_lines(inp.drift)] + [""]
    md += ["## Per class F1", "", per_class_table(r).round(4).to_markdown(), "",
           "## Per class (ensemble)", "", pd.DataFrame(r["classification_report"]).T.round(4).to_markdown()]
    if r.get("calibration"):
        md += ["", "## Calibration (expected calibration error on test)", "",
               calibration_table(r).round(4).to_markdown()]
    if inp.timing:
        md += ["", "## Timing", "", f"Device: {inp.timing.get('device')}; ensemble "
               f"{inp.timing.get('ensemble_ms_per_sample', float('nan')):.2f} ms per sample (batch 1)", "",
               timing_table(inp.timing).round(4).to_markdown()]
    if inp.candidates is not None:
        md += ["", "## Voter candidates (validation)", "",
               inp.candidates.round(4).to_markdown(index=False)]
    return "\n".join(md) + "\n"
