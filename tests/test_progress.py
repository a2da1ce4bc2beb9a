"""Training shows per-candidate progress (epoch, loss, val metric, time left); plain lines when not a terminal."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from rich.console import Console
from typer.testing import CliRunner

from mmops.cli.progress import EpochProgress


def test_plain_lines_carry_epoch_loss_metric_and_time_left():
    out = io.StringIO()
    console = Console(file=out, width=40)  # not a terminal: no bars, and no line is cut at 40 columns
    assert not console.is_terminal
    with EpochProgress(console, "val_accuracy") as show:
        show("start", "concat_with_a_long_name", epochs=10)
        show(
            "epoch",
            "concat_with_a_long_name",
            record={"epoch": 1, "train_loss": 1.25, "val_accuracy": 0.5, "seconds": 2.0},
        )
        show(
            "epoch",
            "concat_with_a_long_name",
            record={"epoch": 2, "train_loss": 0.75, "val_accuracy": 0.625, "seconds": 4.0},
        )
        show("end", "concat_with_a_long_name", status="completed")
        show("end", "product", status="completed", reused=True)
        show("start", "film", epochs=3)
        show("end", "film", status="failed", error="FloatingPointError: loss diverged at epoch 1")
    lines = out.getvalue().splitlines()
    assert lines == [
        "concat_with_a_long_name: training, at most 10 epochs",
        "concat_with_a_long_name: epoch 1/10  loss 1.2500  val_accuracy 0.5000  2.0 s/epoch  <= 18 s left",
        "concat_with_a_long_name: epoch 2/10  loss 0.7500  val_accuracy 0.6250  4.0 s/epoch  <= 24 s left",
        "concat_with_a_long_name: completed after 2 epochs, 6 s",
        "product: unchanged, reused",
        "film: training, at most 3 epochs",
        "film: failed: FloatingPointError: loss diverged at epoch 1",
    ]


def test_a_broken_display_never_fails_training(monkeypatch):
    from mmops import pipeline

    def broken(*_a, **_k):
        raise RuntimeError("terminal gone")

    with pipeline.progress_to(broken):
        pipeline._notify("epoch", "x", record={})  # logged, not raised
    assert pipeline._progress is None


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """Prepared easy-VQA rows (300, 16 px) and one small candidate: trains in seconds."""
    from mmops.config import load_params
    from mmops.data.easyvqa import import_easy_vqa
    from mmops.data.featurize import featurize
    from mmops.data.prepare import prepare

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(limit=300, image_size=16)
    params["train"].update(epochs=3, patience=3, batch_size=64)
    params["inputs"]["question"].update(encoder="bow_text", params={})
    params["inputs"]["image"].update(encoder="cnn_image", params={"channels": [4, 8]})
    params["candidates"] = [{"name": "tiny", "fusion": "concat", "params": {}}]
    params.pop("sweep", None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    import_easy_vqa(tmp_path / "data" / "raw", limit=300)
    data, loaded = tmp_path / "data", load_params(tmp_path / "params.yaml")
    prepare(data / "raw", data / "prepared", loaded)
    featurize(data / "prepared", data / "features", loaded)
    return tmp_path


def test_mmops_train_prints_a_plain_line_per_epoch_when_piped(tiny_project: Path):
    from mmops.cli.main import app

    saved = dict(os.environ)  # loading a project sets PREFECT_HOME, BENTOML_HOME, ... for the process
    try:
        env = {"MMOPS_PROJECT": str(tiny_project), "MMOPS_DB_URL": "", "COLUMNS": "200"}
        result = CliRunner().invoke(app, ["train"], env=env)  # CliRunner's stdout is not a terminal
        again = CliRunner().invoke(app, ["train"], env=env)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("tiny: ")]
    assert lines[0] == "tiny: training, at most 3 epochs"
    epochs = [
        re.fullmatch(
            r"tiny: epoch (\d)/3  loss \d+\.\d{4}  val_accuracy \d\.\d{4}  \d+\.\d s/epoch  "
            r"<= \d+ s left",
            x,
        )
        for x in lines[1:-1]
    ]
    assert epochs and all(epochs), lines
    assert [int(m[1]) for m in epochs] == list(range(1, len(epochs) + 1))
    assert re.fullmatch(rf"tiny: completed after {len(epochs)} epochs, \d+ s", lines[-1])
    assert "\x1b[" not in result.output  # no terminal control codes in a pipe
    assert again.exit_code == 0 and "tiny: unchanged, reused" in again.output
