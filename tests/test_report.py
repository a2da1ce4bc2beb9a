"""The HTML report from synthetic prepared data and model dirs (layouts of docs/byod-design.md), then rendered."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmops.report import SECTIONS, write_report

LABELS = ["circle", "square", "triangle"]
SCRIPT = "<script>alert(1)</script>"
INPUTS = {
    "caption": {"modality": "text", "encoder": "bow_text", "params": {}},
    "photo": {"modality": "image", "encoder": "cnn_image", "params": {}},
    "clip": {"modality": "audio", "encoder": "mel_audio", "params": {}},
    "size": {"modality": "tabular", "encoder": "numeric", "params": {}, "columns": ["width", "height"]},
}
METRICS = {"classification": "accuracy", "multilabel": "micro_f1", "regression": "mae"}
N, TEST_FROM, MISSING_ROW = 30, 22, 22  # rows 0-17 train, 18-21 val, 22-29 test; row 22 lacks its photo


def _label(task: str, i: int) -> object:
    if task == "classification":
        return i % 3
    if task == "multilabel":
        return [i % 3] if i % 2 else [i % 3, (i + 1) % 3]
    return float(i) / 3


def _text(task: str, label: object) -> str:
    if task == "multilabel":
        return "|".join(LABELS[j] for j in label)
    return LABELS[label] if task == "classification" else f"{label:.3f}"


def make_run(root: Path, task: str) -> tuple[Path, Path]:
    """A prepared dir and a trained candidate's dir as prepare and train write them, for ``task``."""
    prepared, model = root / "prepared", root / "models" / "concat_bow"
    prepared.mkdir(parents=True)
    model.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = [f"{SCRIPT} what shape is it?"] + [f"caption {i} & more" for i in range(1, 10)]
    (prepared / "caption.json").write_text(json.dumps(captions))
    np.save(prepared / "photo.npy", rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8))
    np.save(prepared / "clip.npy", np.sin(np.linspace(0, 60, 400) * np.arange(1, 5)[:, None]).astype(np.float32))
    (prepared / "size.json").write_text(json.dumps([[w, w + 1] for w in range(6)]))
    labels = [_label(task, i) for i in range(N)]
    rows = pd.DataFrame(
        {
            "line": np.arange(2, N + 2),
            "source": "manifest.csv",
            "caption_idx": [0 if i == MISSING_ROW else i % 10 for i in range(N)],
            "photo_idx": [-1 if i == MISSING_ROW else i % 5 for i in range(N)],
            "clip_idx": [i % 4 for i in range(N)],
            "size_idx": [i % 6 for i in range(N)],
            "label": labels,
            "split": ["train"] * 18 + ["val"] * 4 + ["test"] * 8,
        }
    )
    rows.to_parquet(prepared / "rows.parquet")
    (prepared / "labels.json").write_text(json.dumps([] if task == "regression" else LABELS))
    summary = {
        "rows": N + 1,
        "kept": N,
        "quarantined": 1,
        "splits": {"train": 18, "val": 4, "test": 8},
        "labels": 0 if task == "regression" else 3,
        "task": task,
    }
    (prepared / "summary.json").write_text(json.dumps(summary))
    pd.DataFrame(
        [
            {
                "source": "manifest.csv",
                "line": 33,
                "field": "photo",
                "reason": f"unreadable {SCRIPT}",
                "caption": "x",
                "photo": "broken.png",
            }
        ]
    ).to_csv(prepared / "quarantine.csv", index=False)

    test = rows[rows["split"] == "test"].drop(columns=["label", "split"]).reset_index(drop=True)
    wrong = {0, 1, 3}  # the row with the script caption and the missing photo is the most confident mistake
    predicted = [_label(task, TEST_FROM + i + (1 if i in wrong else 0)) for i in range(len(test))]
    test["target"] = [_text(task, labels[TEST_FROM + i]) for i in range(len(test))]
    test["prediction"] = [_text(task, p) for p in predicted]
    errors = [abs(p - labels[TEST_FROM + i]) if task == "regression" else np.nan for i, p in enumerate(predicted)]
    test["confidence"] = np.nan if task == "regression" else np.linspace(0.95, 0.5, len(test))
    test["correct"] = [i not in wrong for i in range(len(test))]
    test["error"] = [e + (1.0 if i == 0 else 0.0) for i, e in enumerate(errors)]
    test.to_parquet(model / "predictions_test.parquet")

    name = METRICS[task]
    split_metrics = {"regression": {"mse": 0.2, "mae": 0.3, "r2": 0.8, "n": 8}}.get(task, {name: 0.625, "n": 8})
    if task == "classification":
        split_metrics |= {
            "macro_f1": 0.6,
            "ece": 0.12,
            "confusion": [[2, 1, 0], [0, 2, 1], [1, 0, 1]],
            "calibration": [
                {
                    "bin_lower": b / 10,
                    "bin_upper": (b + 1) / 10,
                    "confidence": b / 10 + 0.05,
                    "accuracy": b / 12,
                    "count": 1,
                }
                for b in range(5, 10)
            ],
        }
    if task != "regression":
        split_metrics["per_class"] = {
            lab: {"precision": 0.5, "recall": 0.6, "f1": 0.55, "ap": 0.7, "support": 3} for lab in LABELS
        }
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, f"val_{name}": 0.5 + e / 20} for e in range(1, 6)]
    result = {
        "candidate": "concat_bow",
        "fusion": "concat",
        "task": task,
        "labels": [] if task == "regression" else LABELS,
        "best_epoch": 3,
        "epochs_run": 5,
        "train_seconds": 1.5,
        "history": history,
        "metrics": {"val": split_metrics, "test": split_metrics},
        "final": {f"val_{name}": 0.65, f"test_{name}": 0.625},
        "run_id": "run-1",
        "seed": 0,
    }
    (model / "result.json").write_text(json.dumps(result))
    (model / "spec.json").write_text(json.dumps({"inputs": INPUTS}))
    return model, prepared


def leaderboard(task: str) -> list[dict]:
    name = METRICS[task]
    return [
        {
            "candidate": "concat_bow",
            "fusion": "concat",
            "status": "ok",
            f"val_{name}": 0.65,
            f"test_{name}": 0.625,
            "train_seconds": 1.5,
            "error": None,
        },
        {
            "candidate": "late_<b>",
            "fusion": "late",
            "status": "ok",
            f"val_{name}": 0.55,
            f"test_{name}": 0.5,
            "train_seconds": 2.0,
            "error": None,
        },
        {"candidate": "film_x", "fusion": "film", "status": "failed", "train_seconds": 0.1, "error": "boom <oops>"},
    ]


@pytest.fixture(params=["classification", "multilabel", "regression"])
def report(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    model, prepared = make_run(tmp_path, request.param)
    out = write_report(model, prepared, tmp_path / "out" / "report.html", leaderboard(request.param), "Run <1>")
    return request.param, out.read_text()


def test_report_sections_escaping_and_self_containment(report: tuple[str, str]) -> None:
    task, text = report
    for sid in SECTIONS:
        assert f'<section id="{sid}"><h2>' in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script" not in text
    assert "late_&lt;b&gt;" in text and "boom &lt;oops&gt;" in text and "Run &lt;1&gt;" in text
    assert "http://" not in text and "https://" not in text
    assert text.count("data:image/png;base64,") >= 6  # plots, thumbnails and waveforms
    assert '<span class="missing">missing</span>' in text
    assert "width=1, height=2" in text
    assert "unreadable" in text and "Quarantined rows (1)" in text
    assert "<tr class=best><td>concat_bow</td>" in text
    assert len(text) < 2_000_000
    expected = {
        "classification": "Expected calibration error",
        "multilabel": "<th>TP</th>",
        "regression": "Predicted vs actual",
    }
    assert expected[task] in text


def test_report_without_leaderboard_or_predictions(tmp_path: Path) -> None:
    """A single run, or one whose predictions were lost, still gets a report instead of a traceback."""
    model, prepared = make_run(tmp_path, "regression")
    (model / "predictions_test.parquet").unlink()
    text = write_report(model, prepared, tmp_path / "r.html").read_text()
    assert "No leaderboard" in text and "No test predictions were written" in text


def _chromium(html: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--window-size=1280,4000",
    ]
    return subprocess.run(
        ["chromium", *flags, *args, f"file://{html}"], capture_output=True, text=True, timeout=60, check=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_report_renders_in_chromium(tmp_path: Path, task: str) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian package `chromium`), so the report cannot be rendered")
    model, prepared = make_run(tmp_path, task)
    html = write_report(model, prepared, tmp_path / "report.html", leaderboard(task))
    shot = tmp_path / "shot.png"
    _chromium(html, tmp_path, f"--screenshot={shot}")
    assert shot.exists()
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    assert 1 - counts.max() / len(pixels) > 0.01 and len(colours) > 50
    dom = _chromium(html, tmp_path, "--dump-dom").stdout
    text = re.sub(r"\s+", " ", dom)
    for sid in SECTIONS:
        assert re.search(rf'<section id="{sid}"><h2>[^<]+</h2>', text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_learning_curves_plot_seconds_apart_from_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few seconds per epoch on the 0..1 metric axis flattened every metric curve: time gets its own axes."""
    import mmops.report as report

    figures = []
    monkeypatch.setattr(report, "_png", lambda fig, *a, **k: figures.append(fig) or "")
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_accuracy": 0.5 + e / 20,
            "val_macro_f1": 0.4 + e / 20,
            "seconds": 30.0 + e,
        }
        for e in range(1, 5)
    ]
    report._learning_section({"history": history, "best_epoch": 3, "epochs_run": 4})
    (fig,) = figures

    def series(ax) -> dict[str, list[float]]:
        lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines() if not ln.get_label().startswith("best")}
        bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
        return lines | bars

    plotted = {ax.get_ylabel(): series(ax) for ax in fig.axes}
    metric_axes = [s for s in plotted.values() if "val_accuracy" in s]
    assert len(metric_axes) == 1 and set(metric_axes[0]) == {"val_accuracy", "val_macro_f1"}
    time_axes = [(label, s) for label, s in plotted.items() if "seconds" in s]
    assert len(time_axes) == 1 and "seconds" in time_axes[0][0]
    assert time_axes[0][1]["seconds"] == [31.0, 32.0, 33.0, 34.0]
    assert not any("seconds" in s for s in plotted.values() if "train_loss" in s or "val_accuracy" in s)
