"""`mmops init --template sentiment` -> MMSA-layout file -> import -> run -> bento -> HTTP predictions from
three feature-sequence fields; bad sequences get a 4xx naming the field."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import mmops, serve_bento

from mmops.data.mmsa import write_synthetic
from mmops.serving.predictor import InputError, Limits, RowDecoder

FIELDS = ("text", "audio", "vision")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


SPEC = {
    "inputs": {
        "audio": {"modality": "vectors", "kind": "vectors", "params": {"dim": 3, "max_length": 4}},
        "words": {"modality": "text"},
    }
}


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([[1, 2, 3, 4]], "frames of 4 features; this model takes 3"),
        ([], "empty sequence"),
        ([[1, 2, 3]] * 5, "5 frames, over this model's max_length 4"),
        ([[1, 2, 3], [1, 2]], "frames of unequal widths [2, 3]"),
        ([[1, True, 3]], "each a list of 3 numbers"),
        ("[[1, 2, 3], [4, 5", "is not valid JSON"),
        (np.array([[1.0, np.inf, 0.0]]), "NaN or infinity (frame 0, feature 1)"),
        (_npy(np.zeros((2, 3, 1))), "has shape (2, 3, 1)"),
        (_npy(np.array([["a", "b", "c"]], dtype=object)), "cannot be read as a .npy array"),  # never unpickled
        (b"\x93NUMPY garbage", "cannot be read as a .npy array"),
    ],
)
def test_the_service_decoder_refuses_bad_sequences_naming_the_field(value, words):
    decoder = RowDecoder(SPEC, Limits(SPEC))
    with pytest.raises(InputError, match=r"^audio: ") as caught:
        decoder.validate({"audio": value, "words": "fine"})
    assert words in str(caught.value)


def test_the_service_decoder_takes_json_lists_json_text_and_npy_alike():
    decoder = RowDecoder(SPEC, Limits(SPEC))
    frames = [[0.5, 1, -2], [3, 4, 5]]
    expected = np.array(frames, np.float32)
    for value in (frames, json.dumps(frames), _npy(expected), io.BytesIO(_npy(expected.astype(np.float64)))):
        out = decoder.validate({"audio": value, "words": "fine"})["audio"]
        assert out.dtype == np.float32 and np.array_equal(out, expected)
    assert Limits(SPEC).vector_bytes == 8 * 3 * 4 + 4096  # a .npy of max_length float64 frames, and its header


@pytest.mark.slow
def test_sentiment_template_from_mmsa_file_to_served_scores(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    mmops(tmp_path, "init", str(root), "--template", "sentiment")
    write_synthetic(root / "incoming" / "aligned_50.pkl", (48, 12, 12))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=1, patience=1, threads=1)  # one thread: far faster on shared cores
    params["candidates"] = params["candidates"][:1]  # tfn: the three inputs, one fusion, fast enough for CI
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    mmops(root, "data", "import")  # `mmops run` would too (dvc.yaml's import stage): here its output is checked
    assert pd.read_csv(root / "data" / "raw" / "manifest.csv")["split"].value_counts().to_dict() == {
        "train": 48,
        "val": 12,
        "test": 12,
    }
    run = mmops(root, "run", timeout=900)
    summary = json.loads((root / "data" / "prepared" / "summary.json").read_text())
    assert summary["quarantined"] == 0 and summary["splits"] == {"test": 12, "train": 48, "val": 12}, summary
    best = json.loads((root / "metrics" / "best.json").read_text())
    for metric in ("mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7"):
        assert metric in best["test"], best["test"]
    report = Path(re.search(r"report: (\S+\.html)", run.stdout).group(1)).read_text()
    assert "frames × 5 features" in report  # the mistakes show each utterance's sequences (audio: 5 features)
    bento = re.search(r"bento: (\S+)", run.stdout).group(1)

    manifest = pd.read_csv(root / "data" / "raw" / "manifest.csv")
    rows = manifest[manifest["split"] == "test"].head(4)
    items = [{f: np.load(root / "data" / "raw" / r[f]).tolist() for f in FIELDS} for _, r in rows.iterrows()]
    width = {f: len(items[0][f][0]) for f in FIELDS}
    with serve_bento(root, bento) as (url, _):
        answers = httpx.post(f"{url}/predict_batch", json={"items": items}, timeout=60)
        assert answers.status_code == 200, answers.text
        for answer in answers.json():
            assert -3 <= answer["answer"] <= 3 and answer["sentiment"] in ("positive", "negative", "neutral")
        # /predict: each modality an uploaded .npy, the same answer
        first = {f: np.array(items[0][f], np.float32) for f in FIELDS}
        files = {f: (f"{f}.npy", _npy(first[f]), "application/octet-stream") for f in FIELDS}
        form = httpx.post(f"{url}/predict", files=files, timeout=30)
        assert form.status_code == 200, form.text
        assert form.json()["answer"] == pytest.approx(answers.json()[0]["answer"], abs=1e-4)

        bad_json = {
            "audio": ([[0.5] * (width["audio"] + 1)] * 3, "this model takes 5"),  # wrong width
            "vision": ([], "empty sequence"),
            "text": ([[0.1] * width["text"]] * 101, "over this model's max_length 100"),
        }
        for field, (value, words) in bad_json.items():
            r = httpx.post(f"{url}/predict_batch", json={"items": [{**items[0], field: value}]}, timeout=30)
            assert r.status_code == 400 and f"items[0].{field}: " in r.text and words in r.text, r.text
        nan = first["vision"].copy()
        nan[1, 2] = np.nan
        r = httpx.post(f"{url}/predict", files={**files, "vision": ("v.npy", _npy(nan), "x")}, timeout=30)
        assert r.status_code == 400 and "vision: holds NaN" in r.text, r.text
        r = httpx.post(f"{url}/predict", files={**files, "audio": ("a.npy", b"not numpy", "x")}, timeout=30)
        assert r.status_code == 400 and "audio: cannot be read as a .npy array" in r.text, r.text
        missing = {k: v for k, v in items[0].items() if k != "text"}
        r = httpx.post(f"{url}/predict_batch", json={"items": [missing]}, timeout=30)
        assert r.status_code == 400 and "text" in r.text, r.text
