"""One self-contained HTML report for a trained candidate: its data, learning, errors and the leaderboard.

Everything is embedded (inline CSS, plots and thumbnails as base64 PNG, no JavaScript, no URLs) so the file
can be mailed, attached to a ticket or opened offline and still show the same thing. File layouts are the
ones in ``docs/byod-design.md``. Every string that comes from the user's data is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure renders with Agg and never touches pyplot or a display
from PIL import Image, ImageDraw

THUMB = 96  # px, the largest side of image thumbnails and waveforms
MAX_MISTAKES = 12
MAX_QUARANTINE = 50
MAX_LABELS = 30  # plots keep the most frequent labels beyond this, so 1000-answer VQA stays readable
NO_PREDICTIONS = "<p>No test predictions were written (predictions_test.parquet is missing or empty).</p>"
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ccd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:14px} th,td{border:1px solid #ccd;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#eef} tr.best td{background:#dfd;font-weight:bold}
.missing{color:#a00;font-style:italic} .text{max-width:320px;white-space:pre-wrap;word-break:break-word}
.small{font-size:12px;color:#555} img.thumb{width:96px;image-rendering:pixelated} nav a{margin-right:1em}
"""
SECTIONS = {
    "data": "Data",
    "learning": "Learning curves",
    "confusion": "Confusion matrix",
    "per-class": "Per-class metrics",
    "calibration": "Calibration",
    "mistakes": "Most confident mistakes",
    "candidates": "Candidates",
}


def _fmt(value: Any) -> str:
    """A cell's HTML: numbers rounded for reading, anything else escaped because it may come from user data."""
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else html.escape(str(value))


def _table(header: list[str], rows: list[list[str]], highlight: int | None = None) -> str:
    """A table of cells that are already HTML (from :func:`_fmt` or built here), so nothing is escaped twice."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr{' class=best' if i == highlight else ''}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(image: Figure | Image.Image, alt: str, css: str = "") -> str:
    """Embed a plot or picture as a data URL; matplotlib's Software tag (a URL) is dropped from the metadata."""
    buf = io.BytesIO()
    if isinstance(image, Figure):
        image.savefig(buf, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
    else:
        image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def _label_names(labels: list[str], indices: Any) -> list[str]:
    return [labels[i] if 0 <= i < len(labels) else str(i) for i in map(int, indices)]


def _view(labels: list[str], test: dict) -> str:
    """How to draw a task's targets, read from what it produced (never from its name, so a task plugin
    gets a report too): ``value`` without a label vocabulary (a number), ``classes`` with a confusion
    matrix, ``sets`` otherwise (per-label counts)."""
    if not labels:
        return "value"
    if "confusion" not in test and "per_class" not in test:
        return "names"  # targets stored by name with no per-label scores: a contrastive match key
    return "classes" if "confusion" in test else "sets"


def _data_section(prepared: Path, view: str, labels: list[str]) -> str:
    summary = _json(prepared / "summary.json", {})
    counts = [(k, summary.get(k)) for k in ("rows", "kept", "quarantined")]
    counts += [(f"split {k}", v) for k, v in summary.get("splits", {}).items()]
    parts = [_table(["", "count"], [[_fmt(k), _fmt(v)] for k, v in counts])]
    if (prepared / "rows.parquet").exists():
        rows = pd.read_parquet(prepared / "rows.parquet", columns=["label", "split"])
        splits = [s for s in ("train", "val", "test") if (rows["split"] == s).any()]
        fig = Figure(figsize=(8, 3.2))
        ax = fig.subplots()
        if view == "value":
            for s in splits:
                ax.hist(rows.loc[rows["split"] == s, "label"].astype(float), bins=30, alpha=0.5, label=s)
            ax.set_xlabel("target")
        else:
            flat = (rows.explode("label") if view == "sets" else rows).dropna(subset=["label"])
            if view == "names":  # stored as the names themselves, not label indices
                labels = sorted(set(flat["label"].astype(str)))
                flat = flat.assign(label=flat["label"].astype(str).map({n: i for i, n in enumerate(labels)}))
            counts_df = pd.crosstab(flat["label"].astype(int), flat["split"])
            if len(counts_df) > MAX_LABELS:
                counts_df = counts_df.loc[counts_df.sum(axis=1).nlargest(MAX_LABELS).index]
                parts.append(f"<p class=small>Showing the {MAX_LABELS} most frequent labels.</p>")
            x, width = np.arange(len(counts_df)), 0.8 / max(len(splits), 1)
            for i, s in enumerate(splits):
                ax.bar(x + i * width, counts_df.get(s, 0), width, label=s)
            ax.set_xticks(x + width * (len(splits) - 1) / 2, _label_names(labels, counts_df.index), rotation=45)
        ax.set_ylabel("examples")
        ax.legend()
        parts.append("<h3>Class balance per split</h3>" + _png(fig, "class balance"))
    path = prepared / "quarantine.csv"
    q = pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() and path.stat().st_size else None
    if q is None or q.empty:
        parts.append("<p>No rows were quarantined.</p>")
    else:
        cols = [c for c in ("source", "line", "field", "reason") if c in q.columns]
        cells = [[_fmt(v) for v in r] for r in q[cols].head(MAX_QUARANTINE).itertuples(index=False)]
        more = f"<p>… and {len(q) - MAX_QUARANTINE} more.</p>" if len(q) > MAX_QUARANTINE else ""
        parts.append(f"<h3>Quarantined rows ({len(q)})</h3>" + _table(cols, cells) + more)
    return "".join(parts)


def _learning_figure(history: pd.DataFrame, best: Any) -> Figure:
    """Loss, validation metrics and seconds per epoch on separate axes.

    Seconds live on their own panel: on the metric axis (0..1) a few seconds per epoch would flatten every
    metric curve into a line along the bottom.
    """
    fig = Figure(figsize=(15, 3.2))
    loss_ax, metric_ax, time_ax = fig.subplots(1, 3)
    losses = [c for c in history if c.endswith("loss")]
    metrics = [c for c in history if c not in {"epoch", "seconds"} and not c.endswith("loss")]
    for ax, cols, name in ((loss_ax, losses, "loss"), (metric_ax, metrics, "validation metric")):
        for c in cols:
            ax.plot(history["epoch"], history[c], marker=".", label=c)
        ax.set_ylabel(name)
    if "seconds" in history:
        time_ax.bar(history["epoch"], history["seconds"], color="#88a", label="seconds")
    time_ax.set_ylabel("seconds per epoch")
    for ax in (loss_ax, metric_ax, time_ax):
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", label=f"best epoch {best}")
        ax.set_xlabel("epoch")
        ax.legend()
    return fig


def _learning_section(result: dict) -> str:
    history = pd.DataFrame(result.get("history", []))
    if history.empty or "epoch" not in history:
        return "<p>No training history was recorded.</p>"
    best = result.get("best_epoch")
    fig = _learning_figure(history, best)
    return _png(fig, "learning curves") + f"<p>Best epoch {_fmt(best)} of {_fmt(result.get('epochs_run'))} run.</p>"


def _confusion_section(view: str, test: dict, labels: list[str], preds: pd.DataFrame) -> str:
    if view == "names":  # no per-label matrix: the task's own test metrics (retrieval ranks, zero-shot)
        return _table(["metric", "test"], [[_fmt(k), _fmt(v)] for k, v in test.items() if not isinstance(v, dict)])
    if view != "classes" and preds.empty:
        return NO_PREDICTIONS
    if view == "value":
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        actual, predicted = preds["target"].astype(float), preds["prediction"].astype(float)
        ax.scatter(actual, predicted, s=12, alpha=0.6)
        lo, hi = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--")
        ax.set_xlabel("actual")
        ax.set_ylabel("predicted")
        return _png(fig, "predicted vs actual")
    if view == "sets":
        actual = preds["target"].map(lambda s: set(str(s).split("|")))
        predicted = preds["prediction"].map(lambda s: set(str(s).split("|")))
        rows = []
        for name in labels:
            a, p = actual.map(lambda s, n=name: n in s), predicted.map(lambda s, n=name: n in s)
            rows.append([_fmt(name), *(_fmt(int(v.sum())) for v in (a & p, ~a & p, a & ~p, ~a & ~p))])
        return _table(["label", "TP", "FP", "FN", "TN"], rows)
    matrix = np.asarray(test.get("confusion", []))
    if matrix.size == 0:
        return "<p>No confusion matrix in the test metrics.</p>"
    keep = np.sort(np.argsort(-matrix.sum(axis=1), kind="stable")[:MAX_LABELS])
    matrix, names = matrix[np.ix_(keep, keep)], _label_names(labels, keep)
    side = min(2.5 + 0.45 * len(keep), 14)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues")
    if len(keep) <= 15:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(keep)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(keep)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    fig.colorbar(im, ax=ax, shrink=0.8)
    note = f"<p class=small>The {MAX_LABELS} most frequent labels.</p>" if len(labels) > MAX_LABELS else ""
    return note + _png(fig, "confusion matrix")


def _per_class_section(view: str, metrics: dict) -> str:
    if view == "value":
        rows = [[split, *(_fmt(metrics.get(split, {}).get(k)) for k in ("mse", "mae", "r2", "n"))] for split in metrics]
        return _table(["split", "mse", "mae", "r2", "n"], rows)
    cols = ["precision", "recall", "f1", *(["ap"] if view == "sets" else []), "support"]
    per_class = metrics.get("test", {}).get("per_class", {})
    return _table(
        ["label", *cols], [[_fmt(k), *(_fmt(v.get(c)) for c in cols)] for k, v in per_class.items()]
    ) + _per_group_table(metrics)


def _per_group_table(metrics: dict) -> str:
    """data.group_column: each speaker / patient / user of val and test, by the task's first metric."""
    rows = [
        [split, _fmt(g), _fmt(v)]
        for split in ("val", "test")
        for g, v in metrics.get(split, {}).get("by_group", {}).items()
    ]
    return "<h3>Per group (data.group_column)</h3>" + _table(["split", "group", "score"], rows) if rows else ""


def _calibration_section(view: str, test: dict, preds: pd.DataFrame) -> str:
    if view == "names":
        return "<p>Not applicable: the task's scores are similarities, not probabilities.</p>"
    if view == "sets":
        return (
            "<p>Not applicable: multilabel scores are per-label decisions against a threshold, not one "
            "probability distribution, so there is no single confidence to calibrate.</p>"
        )
    if view == "value":
        if preds.empty:
            return NO_PREDICTIONS
        fig = Figure(figsize=(6, 3))
        ax = fig.subplots()
        ax.hist(preds["prediction"].astype(float) - preds["target"].astype(float), bins=30)
        ax.set_xlabel("residual (predicted - actual)")
        ax.set_ylabel("examples")
        return "<p>Not applicable: a regressor outputs no probability. Residuals instead:</p>" + _png(fig, "residuals")
    bins = [b for b in test.get("calibration", []) if b.get("count")]
    if not bins:
        return "<p>No calibration bins in the test metrics.</p>"
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.bar(
        [(b["bin_lower"] + b["bin_upper"]) / 2 for b in bins],
        [b["accuracy"] for b in bins],
        width=[b["bin_upper"] - b["bin_lower"] for b in bins],
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C1", label="mean confidence")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend()
    return f"<p>Expected calibration error (test): <b>{_fmt(test.get('ece'))}</b></p>" + _png(fig, "reliability")


def _load_values(prepared: Path, name: str, modality: str) -> Any:
    """An input's distinct values; arrays are memory-mapped because only a dozen rows are shown."""
    if modality in ("image", "audio"):
        path = prepared / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.exists() else None
    if modality == "vectors":  # ragged feature sequences
        from mmops.data.featurize import load_values

        return load_values(prepared, name, modality) if (prepared / f"{name}.offsets.npy").exists() else None
    return _json(prepared / f"{name}.json", None)


def _input_cell(values: Any, spec: dict, idx: int) -> str:
    """One input of one example as a reader would want to see it: picture, waveform, text or named numbers."""
    modality = spec.get("modality", "")
    if idx < 0:
        return '<span class="missing">missing</span>'
    if values is None or idx >= len(values):
        return '<span class="missing">unavailable</span>'
    if modality == "image":
        image = Image.fromarray(np.asarray(values[idx], dtype=np.uint8))
        image.thumbnail((THUMB, THUMB))
        return _png(image, "input image", "thumb")
    if modality == "audio":
        samples = np.asarray(values[idx], dtype=np.float32)
        img, mid = Image.new("RGB", (THUMB, 32), "white"), 16
        draw, peak = ImageDraw.Draw(img), max(float(np.abs(samples).max(initial=0)), 1e-8)
        for x, chunk in enumerate(np.array_split(samples, THUMB)):
            if len(chunk):
                draw.line([(x, mid - chunk.max() / peak * 15), (x, mid - chunk.min() / peak * 15)], fill=(40, 90, 160))
        rms = float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0
        return _png(img, "waveform") + f"<div class=small>{len(samples)} samples, RMS {rms:.3g}</div>"
    if modality == "vectors":  # features (rows) over time (columns), each feature standardised over its frames
        frames = np.asarray(values[idx], dtype=np.float32)
        z = (frames - frames.mean(0)) / (frames.std(0) + 1e-6)
        img = Image.fromarray(np.clip(z.T * 40 + 128, 0, 255).astype(np.uint8)).resize((THUMB, 32), Image.NEAREST)
        shape = f"{len(frames)} frames × {frames.shape[1]} features"
        return _png(img, "feature sequence") + f"<div class=small>{shape}</div>"
    value = values[idx]
    if modality == "text":
        return f'<div class="text">{_fmt(value)}</div>'
    if not isinstance(value, list):
        return _fmt(value)
    names = spec.get("columns") or [""] * len(value)  # train's spec.json names a tabular input's columns
    return _fmt(", ".join(f"{n}={v}" if n else str(v) for n, v in zip(names, value, strict=False)))


def _mistakes_section(view: str, preds: pd.DataFrame, inputs: dict, prepared: Path) -> str:
    if preds.empty:
        return NO_PREDICTIONS
    key = "error" if view == "value" else "confidence"
    wrong = preds[~preds["correct"].astype(bool)].sort_values(key, ascending=False, na_position="last")
    if wrong.empty:
        return "<p>No mistakes on the test split.</p>"
    values = {name: _load_values(prepared, name, spec.get("modality", "")) for name, spec in inputs.items()}
    rows = []
    for r in wrong.head(MAX_MISTAKES).to_dict("records"):
        cells = [_fmt(r.get(c)) for c in ("line", "source", "target", "prediction", key)]
        for name, spec in inputs.items():
            cells.append(_input_cell(values[name], spec, int(r.get(f"{name}_idx", -1))))
        rows.append(cells)
    shown = f"<p>{min(len(wrong), MAX_MISTAKES)} of {len(wrong)} wrong test predictions, by {key}.</p>"
    return shown + _table(["line", "source", "target", "prediction", key, *inputs], rows)


def _captions_section(preds: pd.DataFrame, inputs: dict, prepared: Path) -> str:
    """A generating task's test examples (the rows of one image): the image, every reference and the generated
    caption, worst CIDEr-D first (pycocoevalcap's, over all test images, as the task's metric)."""
    if preds.empty:
        return NO_PREDICTIONS
    from pycocoevalcap.cider.cider import Cider

    keys = [f"{name}_idx" for name in inputs if f"{name}_idx" in preds.columns]
    examples = preds.groupby(keys, sort=False).agg(references=("target", list), generated=("prediction", "first"))
    gts = {i: [str(r) for r in refs] for i, refs in enumerate(examples["references"])}
    _, per = Cider().compute_score(gts, {i: [str(g)] for i, g in enumerate(examples["generated"])})
    examples = examples.assign(cider=per).reset_index().sort_values("cider", kind="stable")
    values = {name: _load_values(prepared, name, spec.get("modality", "")) for name, spec in inputs.items()}
    rows = []
    for r in examples.head(MAX_MISTAKES).to_dict("records"):
        cells = [_input_cell(values[name], spec, int(r.get(f"{name}_idx", -1))) for name, spec in inputs.items()]
        refs = "<br>".join(html.escape(str(t)) for t in r["references"])
        rows.append([*cells, f'<div class="text">{refs}</div>', _fmt(r["generated"]), _fmt(r["cider"])])
    shown = f"<p>{min(len(examples), MAX_MISTAKES)} of {len(examples)} test images, worst CIDEr-D first.</p>"
    return shown + _table([*inputs, "references", "generated", "CIDEr-D"], rows)


def _modalities(candidates: list[dict], metric: str, sign: float) -> str:
    """The ablation table: per set of inputs its best candidate on val, and that candidate's test figure."""
    test_metric = "test_" + metric.removeprefix("val_")
    groups: dict[tuple[str, ...], list[dict]] = {}
    for c in candidates:
        if c.get("status") == "completed" and isinstance(c.get(metric), int | float):
            groups.setdefault(tuple(c.get("inputs") or ()), []).append(c)
    if len(groups) < 2:
        return ""
    rows = []
    for inputs in sorted(groups, key=lambda s: (len(s), s)):
        top = max(groups[inputs], key=lambda c: sign * c[metric])
        rows.append(
            [_fmt(" + ".join(inputs)), _fmt(top.get("candidate")), _fmt(top.get(metric)), _fmt(top.get(test_metric))]
        )
    return (
        "<h3>Modalities</h3><p>Does fusion beat the best single input, and what does each input add? "
        "Each set of inputs with its best candidate, selected on val.</p>"
        + _table(["inputs", "candidate", metric, test_metric], rows)
    )


def _candidates_section(candidates: list[dict] | None, best: str | None, metric: str, sign: float = 1.0) -> str:
    if not candidates:
        return "<p>No leaderboard: this was a single training run.</p>"
    keys = sorted({k for c in candidates for k in c if k.startswith(("val_", "test_"))}, key=lambda k: k[:4] != "val_")
    ablation = len({tuple(c.get("inputs") or ()) for c in candidates}) > 1
    ensembles = any(c.get("ensemble") for c in candidates)  # train.ensemble: whose figures are an ensemble's
    header = [
        "candidate",
        "fusion",
        *(["inputs"] if ablation else []),
        "status",
        *(["ensemble"] if ensembles else []),
        *keys,
        "train_seconds",
        "error",
    ]

    def cell(c: dict, k: str) -> str:
        if k == "inputs":
            return _fmt(" + ".join(c.get("inputs") or []))
        if k == "ensemble":
            return _fmt(_members(c, metric) if c.get("ensemble") else "")
        return _fmt(str(c[k])[:300] if k == "error" and c.get(k) else c.get(k))

    rows = [[cell(c, k) for k in header] for c in candidates]
    best_row = next((i for i, c in enumerate(candidates) if c.get("candidate") == best), None)
    scored = [c for c in candidates if isinstance(c.get(metric), int | float) and not math.isnan(c[metric])]
    plot = ""
    if scored:
        fig = Figure(figsize=(7, 0.6 + 0.35 * len(scored)))
        ax = fig.subplots()
        names = [str(c.get("candidate")) for c in scored]
        colors = ["C2" if c.get("candidate") == best else "C0" for c in scored]
        ax.barh(names, [c[metric] for c in scored], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel(metric)
        plot = _png(fig, f"candidates by {metric}")
    return _table(header, rows, best_row) + plot + (_modalities(candidates, metric, sign) if ablation else "")


def _members(row: dict, metric: str) -> str:
    """An ensemble's members in words: how many, and their mean ± std on ``metric``, beside the
    ensemble's own figure (a leaderboard row, or a result's ``ensemble`` record)."""
    ensemble = row["ensemble"]
    if isinstance(ensemble, dict):  # result.json
        n, mean, std = ensemble["members"], ensemble["mean"].get(metric), ensemble["std"].get(metric)
    else:  # a leaderboard row
        n, mean, std = ensemble, row.get(f"members_{metric}"), row.get(f"members_{metric}_std")
    figures = f": {metric} {mean:.4f} ± {std:.4f}" if mean is not None and std is not None else ""
    return f"average of {n} seeds' models; the members{figures}"


def _sign(result: dict, metric: str) -> float:
    """The direction of ``metric`` for the run's task (+1 when higher is better); +1 if unknown."""
    from mmops.core.tasks import task_class

    try:
        return task_class(result.get("task") or "classification").sign(metric)
    except (LookupError, KeyError):
        return 1.0


def write_report(
    model_dir: Path,
    prepared_dir: Path,
    out: Path,
    candidates: list[dict] | None = None,
    title: str | None = None,
    select_metric: str | None = None,
) -> Path:
    """Write the HTML report of the candidate in ``model_dir`` to ``out`` and return ``out``.

    ``candidates`` is the sweep's leaderboard; the row named like ``result.json``'s candidate is highlighted.
    ``select_metric`` (e.g. ``val_macro_f1``) defaults to the task's usual one when the caller does not know it.
    """
    model_dir, prepared_dir, out = Path(model_dir), Path(prepared_dir), Path(out)
    result = json.loads((model_dir / "result.json").read_text())
    labels = result.get("labels") or _json(prepared_dir / "labels.json", [])
    metrics, final = result.get("metrics", {}), result.get("final", {})
    view = _view(labels, metrics.get("test", {}))
    inputs = _json(model_dir / "spec.json", {}).get("inputs", {})
    preds_path = model_dir / "predictions_test.parquet"
    preds = pd.read_parquet(preds_path) if preds_path.exists() else pd.DataFrame()
    metric = select_metric or result.get("select_metric") or ""
    if metric not in final:
        metric = next((k for k in final if k.startswith("val_")), metric)
    test_metric = "test_" + metric.removeprefix("val_")

    bodies = {
        "data": _data_section(prepared_dir, view, labels),
        "learning": _learning_section(result),
        "confusion": _confusion_section(view, metrics.get("test", {}), labels, preds),
        "per-class": _per_class_section(view, metrics),
        "calibration": _calibration_section(view, metrics.get("test", {}), preds),
        "mistakes": _captions_section(preds, inputs, prepared_dir)
        if "cider" in metrics.get("test", {})
        else _mistakes_section(view, preds, inputs, prepared_dir),
        "candidates": _candidates_section(candidates, result.get("candidate"), metric, _sign(result, metric)),
    }
    titles = dict(SECTIONS)
    if view == "value":
        titles["confusion"], titles["per-class"] = "Predicted vs actual", "Regression metrics"
    elif view == "sets":
        titles["confusion"] = "Per-label confusion counts"
    elif view == "names":
        titles["confusion"] = "Test metrics"
    if "cider" in metrics.get("test", {}):  # a caption task: every test image, not only the wrong ones
        titles["mistakes"] = "Test captions, worst CIDEr-D first"
    heading = title or f"mmops report: {model_dir.name}"
    facts = [
        ("task", result.get("task", "")),
        ("model", model_dir.name),
        *([("ensemble", _members(result, metric))] if result.get("ensemble") else []),
        ("candidate / fusion", f"{result.get('candidate')} / {result.get('fusion')}"),
        ("best epoch", f"{result.get('best_epoch')} of {result.get('epochs_run')}"),
        (f"selected metric {metric}", f"val {_fmt(final.get(metric))}, test {_fmt(final.get(test_metric))}"),
        ("run id", result.get("run_id")),
        ("generated", datetime.now(UTC).isoformat(timespec="seconds")),
    ]
    finals = sorted({k.split("_", 1)[1] for k in final if "_" in k})
    page = [
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(heading)}</title>",
        f"<style>{CSS}</style></head><body><header><h1>{html.escape(heading)}</h1>",
        _table(["", ""], [[_fmt(k), _fmt(v)] for k, v in facts]),
        _table(
            ["metric", "val", "test"],
            [[_fmt(k), _fmt(final.get(f"val_{k}")), _fmt(final.get(f"test_{k}"))] for k in finals],
        ),
        "<nav>" + "".join(f'<a href="#{sid}">{html.escape(titles[sid])}</a>' for sid in SECTIONS) + "</nav></header>",
        *(f'<section id="{sid}"><h2>{html.escape(titles[sid])}</h2>{bodies[sid]}</section>' for sid in SECTIONS),
        "</body></html>\n",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(page), encoding="utf-8")
    return out
