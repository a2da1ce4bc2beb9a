"""Unimodal baselines and ablations: a candidate may read a subset of the inputs; with one input there is
no fusion; `mmops ablate` (or `sweep.ablation: true`) trains every single input and every leave-one-out
subset next to the full model and shows the modality table in the leaderboard and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_project, mmops

from mmops.config import ConfigError, load_params
from mmops.core.model import MultimodalModel, SingleInput


def _params(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_candidate_may_read_one_input_without_a_fusion(tmp_path: Path):
    params = load_params(_params(tmp_path, lambda p: p["candidates"].append({"name": "img", "inputs": ["image"]})))
    assert params.candidate("img").fusion is None and params.candidate("img").input_names(list(params.inputs)) == [
        "image"
    ]


@pytest.mark.parametrize(
    ("candidate", "needle"),
    [
        ({"name": "x", "inputs": ["picture"]}, "candidates[x].inputs: unknown ['picture']"),
        ({"name": "x", "inputs": ["image", "question"]}, "name a fusion"),
        ({"name": "x", "fusion": "concat", "inputs": []}, "inputs"),
    ],
)
def test_bad_input_subsets_fail_early_naming_the_candidate(tmp_path: Path, candidate: dict, needle: str):
    with pytest.raises(ConfigError, match=None) as info:
        load_params(_params(tmp_path, lambda p: p["candidates"].append(candidate)))
    assert needle in str(info.value)


def test_ablation_expands_to_single_inputs_and_leave_one_out(tmp_path: Path):
    def three_inputs(p: dict) -> None:
        p["inputs"]["caption"] = {"modality": "text", "encoder": "bow_text"}
        p["sweep"] = {"ablation": True}

    params = load_params(_params(tmp_path, three_inputs))
    names = {c.name: c for c in params.all_candidates()}
    assert {
        "concat",
        "product",
        "concat-only-question",
        "concat-only-image",
        "concat-only-caption",
        "concat-without-question",
        "concat-without-image",
        "concat-without-caption",
    } == set(names)
    assert names["concat-without-image"].inputs == [n for n in params.inputs if n != "image"]
    assert names["concat-without-image"].fusion == "concat" and names["concat-only-image"].fusion is None


def test_a_one_input_model_has_no_fusion_and_round_trips(tmp_path: Path):
    spec = {
        "candidate": "img",
        "labels": ["a", "b"],
        "image_size": 16,
        "target": "answer",
        "seed": 0,
        "inputs": {"image": {"modality": "image", "encoder": "cnn_image", "params": {"channels": [4, 8]}}},
        "fusion": {"name": None, "params": {}},
        "head": {"hidden": 8, "dropout": 0.0},
        "task": {"name": "classification", "params": {}},
    }
    torch.manual_seed(0)
    model = MultimodalModel(spec).eval()
    assert isinstance(model.fusion, SingleInput)
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    inputs = {"image": model.encoders["image"].preprocess(images)}
    with torch.no_grad():
        before = model(inputs)
    assert before.shape == (3, 2)
    loaded = MultimodalModel.load(model.save(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(before, loaded(inputs))


@pytest.mark.slow
def test_mmops_ablate_trains_each_subset_and_reports_the_modality_table(tmp_path: Path):
    root = make_project(
        tmp_path / "proj",
        {
            "data": {"limit": 600, "image_size": 32},
            "train": {"epochs": 3, "patience": 3, "batch_size": 64},
            "candidates": [{"name": "concat", "fusion": "concat", "params": {"hidden": 64}}],
        },
    )
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["inputs"]["question"].update(encoder="bow_text", params={})
    params["inputs"]["image"].update(encoder="cnn_image", params={"channels": [8, 16]})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("import", "prepare", "featurize"):
        mmops(root, "data", stage)
    out = mmops(root, "ablate", timeout=900).stdout
    assert "Modalities" in out and "concat-only-image" in out and "concat-only-question" in out
    rows = json.loads((root / "metrics" / "modalities.json").read_text())
    assert [r["inputs"] for r in rows] == [["image"], ["question"], ["question", "image"]]
    board = json.loads((root / "metrics" / "leaderboard.json").read_text())
    assert {tuple(r["inputs"]) for r in board} == {("question",), ("image",), ("question", "image")}
    spec = json.loads((root / "models" / "concat-only-question" / "spec.json").read_text())
    assert list(spec["inputs"]) == ["question"] and spec["fusion"]["name"] is None
    report = mmops(root, "report", "concat").stdout
    html = Path(report.split("report: ", 1)[1].split()[0]).read_text() if "report: " in report else ""
    assert "Modalities" in html
