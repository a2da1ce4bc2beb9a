"""`mmops init --template retrieval` -> import (easy-VQA captions) -> run -> bento with its gallery index ->
HTTP /search, /embed, /zero_shot, their 4xx, and the CLI's search / zero-shot from the packaged model."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from conftest import mmops, serve_bento

pytestmark = pytest.mark.slow


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_retrieval_template_to_search_over_http(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    mmops(tmp_path, "init", str(root), "--template", "retrieval")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update({"source": "easy-vqa", "limit": 160, "image_size": 32})
    params["target"]["column"] = "label"
    params["inputs"]["image"]["params"]["channels"] = [16, 32]
    params["train"].update({"epochs": 6, "patience": 6, "batch_size": 96})
    params["index"]["splits"] = ["train", "val", "test"]  # test images searchable: a query has a known answer
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    mmops(root, "data", "import")
    run = mmops(root, "run", timeout=900)
    bento = re.search(r"bento: (\S+)", run.stdout).group(1)
    best = json.loads((root / "metrics" / "best.json").read_text())
    assert best["selected_by"] == "val_recall_mean" and best["test"]["zeroshot_chance"] > 0
    index = json.loads((root / "models" / "clip" / "index" / "items.json").read_text())
    rows = pd.read_csv(root / "data" / "raw" / "manifest.csv")
    assert index["kind"] == "exact" and index["count"] == rows["image"].nunique()
    test = rows[rows["split"] == "test"].drop_duplicates("image").iloc[0]
    image = root / "data" / "raw" / test["image"]

    with serve_bento(root, bento) as (url, _):
        # An image query finds itself first; a caption query ranks images of its class above the rest.
        found = httpx.post(
            f"{url}/search",
            json={"items": [{"image": _b64(image), "k": 3}, {"text": test["caption"], "k": 10}]},
            timeout=60,
        )
        assert found.status_code == 200, found.text
        by_image, by_text = found.json()
        assert by_image["results"][0]["id"] == test["image"] and by_image["results"][0]["score"] > 0.999
        assert len(by_text["results"]) == 10 and by_text["model"]
        labels = [r["label"] for r in by_text["results"]]
        share = sum(label == test["label"] for label in labels) / len(labels)
        classes = rows["label"].nunique()
        assert share > 2 / classes, (test["caption"], labels)  # well above a random gallery draw (1/classes)
        scores = [r["score"] for r in by_text["results"]]
        assert scores == sorted(scores, reverse=True)

        embedded = httpx.post(
            f"{url}/embed", json={"items": [{"text": "a red triangle"}, {"image": _b64(image)}]}, timeout=60
        ).json()
        assert [len(e["vector"]) for e in embedded] == [128, 128]
        assert abs(sum(x * x for x in embedded[0]["vector"]) - 1) < 1e-3

        choices = [test["label"], "purple star", "orange hexagon"]
        ranked = httpx.post(
            f"{url}/zero_shot", json={"items": [{"image": _b64(image), "labels": choices}]}, timeout=60
        ).json()[0]
        assert {t["answer"] for t in ranked["top_k"]} == set(choices)
        assert abs(sum(t["probability"] for t in ranked["top_k"]) - 1) < 1e-3

        bad = {
            "/search": [
                {"text": "   ", "k": 3},
                {"text": "a red circle", "k": 0},
                {"text": "a red circle", "k": 10_000},
                {"image": base64.b64encode(b"not an image").decode()},
                {"text": "a", "image": _b64(image)},
                {"query": "a red circle"},
            ],
            "/zero_shot": [
                {"image": _b64(image), "labels": [f"label {i}" for i in range(65)]},
                {"image": _b64(image), "labels": []},
                {"text": "a red circle", "labels": ["x"]},
            ],
            "/embed": [{"text": ""}],
        }
        for route, items in bad.items():
            for item in items:
                answer = httpx.post(f"{url}{route}", json={"items": [item]}, timeout=30)
                assert 400 <= answer.status_code < 500, (route, item, answer.status_code, answer.text)
        assert "k" in httpx.post(f"{url}/search", json={"items": [{"text": "x", "k": 0}]}, timeout=30).text

    out = mmops(root, "search", "--image", str(image), "-k", "2").stdout
    assert test["image"] in out.splitlines()[1]
    out = mmops(root, "zero-shot", "--image", str(image), "--labels", ",".join(choices)).stdout
    assert out.split()[0] in " ".join(choices)
    # --label keeps a label whole, commas included; spaces after the commas of --labels are not part of a label
    whole = "a shape, drawn"
    out = json.loads(
        mmops(root, "zero-shot", "--image", str(image), "--labels", " x, y", "--label", whole, "--json").stdout
    )
    assert sorted(item["answer"] for item in out["top_k"]) == sorted(["x", "y", whole])
    assert mmops(root, "zero-shot", "--image", str(image), check=False).returncode == 2
    assert mmops(root, "search", "a red circle", "-k", "0", check=False).returncode == 2
