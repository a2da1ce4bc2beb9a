"""Bring your own data, end to end and without writing Python: `mmops init` -> files in incoming/ ->
`mmops data import` -> `mmops data validate` -> `mmops run` -> the bento served -> answers over HTTP.

One data set of images, WAV files and a CSV with text, numbers and a category, for each target type.
The only edits are the ones a user makes in params.yaml with an editor.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from byod import TARGETS, write_bad_rows, write_dataset
from conftest import mmops, serve_bento

pytestmark = pytest.mark.slow

CASES = {
    # kind: (template, params edits, the test metric and the bar it must clear)
    "classification": ("classification", {}, ("accuracy", 0.6)),  # chance: 1/3
    "regression": ("regression", {}, ("r2", 0.3)),
    "multilabel": (
        "classification",
        {
            "target": {"column": "tags", "type": "multilabel"},
            "select_metric": "val_micro_f1",
            "promotion": {"metric": "micro_f1", "margin": 0.002},
        },
        ("micro_f1", 0.5),
    ),
}


def _edit(root: Path, edits: dict) -> None:
    """What a user would change in the scaffolded params.yaml: a laptop-sized run, and the target."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update({"image_size": 24, "audio_seconds": 0.5})
    params["train"].update({"epochs": 8, "patience": 8, "batch_size": 32, "lr": 0.005})
    params.update(edits)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _row(incoming: Path, row: pd.Series, with_audio: bool = True) -> dict:
    item = {
        "text": row["text"],
        "image": base64.b64encode((incoming / row["image"]).read_bytes()).decode(),
        "width": float(row["width"]),
        "height": float(row["height"]),
        "shop": row["shop"],
    }
    if with_audio and row["audio"]:
        item["audio"] = base64.b64encode((incoming / row["audio"]).read_bytes()).decode()
    return item


@pytest.mark.parametrize("kind", list(CASES))
def test_files_to_served_model(tmp_path: Path, kind: str) -> None:
    template, edits, (metric, bar) = CASES[kind]
    root = tmp_path / "proj"
    out = mmops(tmp_path, "init", str(root), "--template", template).stdout
    assert "mmops data import" in out and (root / ".git").is_dir() and (root / ".dvc").is_dir()
    _edit(root, edits)
    incoming = root / "incoming"
    manifest = write_dataset(incoming, kind, n=180)
    bad_lines = write_bad_rows(manifest)

    mmops(root, "data", "import")
    assert (root / "data" / "raw" / "manifest.csv").is_file()
    check = mmops(root, "data", "validate")
    assert f"{len(bad_lines)} bad" in check.stdout
    quarantine = pd.read_csv(root / "data" / "quarantine.csv", dtype=str, keep_default_na=False)
    assert sorted(int(x) for x in quarantine["line"]) == sorted(bad_lines)
    assert any("escapes the data root" in r for r in quarantine["reason"])
    assert mmops(root, "data", "validate", "--strict", check=False).returncode == 1

    run = mmops(root, "run", timeout=900)
    best = json.loads((root / "metrics" / "best.json").read_text())
    assert best["test"][metric] > bar, best
    if kind == "classification":
        assert 0 <= best["test"]["ece"] <= 1
    report = re.search(r"report: (\S+\.html)", run.stdout)
    assert report and "Most confident mistakes" in Path(report.group(1)).read_text()
    bento = re.search(r"bento: (\S+)", run.stdout).group(1)

    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    test_rows = rows[(rows["split"] == "test") & (rows["audio"] != "")].head(8)
    with serve_bento(root, bento) as (url, _):
        items = [_row(incoming, r) for _, r in test_rows.iterrows()]
        items.append(_row(incoming, test_rows.iloc[0], with_audio=False))  # audio may be left out (missing: learn)
        answers = httpx.post(f"{url}/predict_batch", json={"items": items}, timeout=60).json()
        assert len(answers) == len(items)
        target = TARGETS[kind]
        if kind == "regression":
            assert all(isinstance(a["answer"], float) for a in answers)
            errors = [abs(a["answer"] - float(t)) for a, t in zip(answers, test_rows[target], strict=False)]
            assert sum(errors) / len(errors) < 3 * best["test"]["mae"] + 1e-6
        elif kind == "multilabel":
            assert all(isinstance(a["answer"], list) for a in answers)
        else:
            right = sum(a["answer"] == t for a, t in zip(answers, test_rows[target], strict=False))
            assert right >= len(test_rows) // 2
        bad = httpx.post(f"{url}/predict_batch", json={"items": [{**items[0], "width": "wide"}]}, timeout=30)
        assert bad.status_code == 400 and "width" in bad.text
        missing = {k: v for k, v in items[0].items() if k != "image"}
        bad = httpx.post(f"{url}/predict_batch", json={"items": [missing]}, timeout=30)
        assert bad.status_code == 400 and "image" in bad.text
        # /predict takes this model's own fields as a form, the audio as a file part (it was a 500).
        first = test_rows.iloc[0]
        files = {
            "image": ("x.png", (incoming / first["image"]).read_bytes(), "image/png"),
            "audio": ("x.wav", (incoming / first["audio"]).read_bytes(), "audio/wav"),
        }
        fields = {c: first[c] for c in ("text", "width", "height", "shop")}
        form = httpx.post(f"{url}/predict", files=files, data=fields, timeout=30)
        assert form.status_code == 200, form.text
        if kind == "regression":
            assert abs(form.json()["answer"] - answers[0]["answer"]) < 1e-3
        else:
            assert form.json()["answer"] == answers[0]["answer"]
        extra = {**files, "extra": ("x.bin", bytes(range(256)), "application/octet-stream")}
        bad = httpx.post(f"{url}/predict", files=extra, data=fields, timeout=30)
        assert bad.status_code == 400 and "extra: is not an input of this model" in bad.text, bad.text


@pytest.mark.parametrize("template", ["vqa", "retrieval"])
def test_other_templates_run_as_projects(tmp_path: Path, template: str) -> None:
    """The easy-VQA and the COCO image-text retrieval (contrastive) templates go from `mmops init` to a bento too."""
    from test_importers import _coco

    root = tmp_path / "proj"
    mmops(tmp_path, "init", str(root), "--template", template)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update({"limit": 300, "image_size": 16})
    params["train"].update({"epochs": 2, "patience": 2})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if template == "retrieval":
        _coco(root / "incoming")

    mmops(root, "data", "import")
    mmops(root, "data", "validate", "--strict")
    run = mmops(root, "run", timeout=900)
    assert f"model version: {params['registry']['model_name']}:1" in run.stdout and "bento: mmops:" in run.stdout
    raw = pd.read_csv(root / "data" / "raw" / "manifest.csv", dtype=str, keep_default_na=False).iloc[0]
    if template == "vqa":
        answer = mmops(root, "predict", "--image", f"data/raw/{raw['image']}", "--question", raw["question"])
        labels = json.loads((root / "data" / "prepared" / "labels.json").read_text())
        assert answer.stdout.split()[0] in labels
    else:
        answer = mmops(root, "predict", "--image", f"data/raw/{raw['image']}", "--input", f"caption={raw['caption']}")
        assert -1.0 <= float(answer.stdout.split()[0]) <= 1.0  # the pair's cosine similarity
