"""Issue 4: the feature cache reuses and invalidates exactly; sweeps rank the same on Dask as locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_project, mmops

from mmops.config import Params, SweepConfig, load_params
from mmops.data.easyvqa import import_easy_vqa
from mmops.data.featurize import featurize
from mmops.data.prepare import prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Params]:
    root = tmp_path_factory.mktemp("cache")
    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={"data": params.data.model_copy(update={"limit": 300, "image_size": 16})})
    import_easy_vqa(root / "raw", limit=300)
    prepare(root / "raw", root / "prepared", params)
    return root, params


def _with_text_params(params: Params, **text_params) -> Params:
    question = params.inputs["question"].model_copy(
        update={"params": {**params.inputs["question"].params, **text_params}}
    )
    return params.model_copy(update={"inputs": {**params.inputs, "question": question}})


def test_cache_is_reused_across_runs_and_fusions_and_invalidated_by_encoder_config(prepared, tmp_path):
    root, params = prepared
    cache = tmp_path / "cache"
    first = featurize(root / "prepared", tmp_path / "a", params, cache)["question"]
    assert first["computed"] == first["distinct"] > 0 and first["reused"] == 0
    assert "image" not in json.loads((tmp_path / "a" / "features.json").read_text())  # trainable: not cached

    gated = params.candidates[0].model_copy(update={"fusion": "gated"})
    other_fusion = params.model_copy(update={"candidates": [gated]})
    again = featurize(root / "prepared", tmp_path / "b", other_fusion, cache)["question"]
    assert again["computed"] == 0 and again["reused"] == first["distinct"] and again["key"] == first["key"]
    assert (tmp_path / "a" / "question.npy").read_bytes() == (tmp_path / "b" / "question.npy").read_bytes()

    cls = featurize(root / "prepared", tmp_path / "c", _with_text_params(params, pooling="cls"), cache)["question"]
    assert cls["key"] != first["key"] and cls["computed"] == first["distinct"]
    back = featurize(root / "prepared", tmp_path / "d", params, cache)["question"]
    assert back["computed"] == 0  # the mean-pooled entries were kept, not overwritten


def test_new_data_computes_only_new_values(prepared, tmp_path):
    root, params = prepared
    cache = tmp_path / "cache"
    featurize(root / "prepared", tmp_path / "a", params, cache)
    questions = json.loads((root / "prepared" / "question.json").read_text())
    grown = tmp_path / "grown"
    grown.mkdir()
    (grown / "question.json").write_text(json.dumps([*questions, "is there a purple hexagon?"]))
    stats = featurize(grown, tmp_path / "b", params, cache)["question"]
    assert stats["computed"] == 1 and stats["reused"] == len(questions)


def test_sweep_expansion_is_deterministic():
    sweep = SweepConfig(
        method="random",
        samples=3,
        seed=1,
        fusion=["concat", "product", "gated"],
        params={"hidden": [32, 64]},
        train={"lr": [0.001, 0.003]},
    )
    names = [c.name for c in sweep.expand()]
    assert names == [c.name for c in sweep.expand()] and len(set(names)) == 3
    grid = SweepConfig(fusion=["concat", "product"], params={"hidden": [32, 64]}).expand()
    assert [c.name for c in grid] == ["concat-hidden32", "concat-hidden64", "product-hidden32", "product-hidden64"]
    assert grid[1].params == {"hidden": 64}


@pytest.mark.slow
def test_dask_sweep_ranks_like_the_local_runner(tmp_path):
    root = make_project(
        tmp_path / "proj",
        {
            "data": {"limit": 600, "image_size": 16},
            "train": {"epochs": 2, "threads": 1, "batch_size": 64},
            "candidates": [],
            "sweep": {"fusion": ["concat", "product", "gated"], "params": {"hidden": [32]}},
        },
    )
    local = mmops(root, "sweep", "--runner", "threads", "--workers", "1")
    board_local = json.loads((root / "metrics" / "leaderboard.json").read_text())
    dask = mmops(root, "sweep", "--runner", "dask", "--workers", "2", "--force")
    board_dask = json.loads((root / "metrics" / "leaderboard.json").read_text())
    assert "on dask" in dask.stdout and "on threads" in local.stdout

    def ranking(board):
        return [(r["candidate"], r["val_accuracy"]) for r in sorted(board, key=lambda r: -r["val_accuracy"])]

    assert ranking(board_local) == ranking(board_dask)
    assert {r["run_id"] for r in board_local}.isdisjoint({r["run_id"] for r in board_dask})
    assert yaml.safe_load((root / "params.yaml").read_text())["sweep"]["fusion"] == ["concat", "product", "gated"]


def test_encoder_reused_from_an_artifact_is_frozen_cached_and_travels_inline(tmp_path):
    import numpy as np
    import torch

    from mmops.core.model import MultimodalModel, build_input_encoder

    spec = {
        "candidate": "t",
        "labels": ["no", "yes"],
        "image_size": 16,
        "target": "answer",
        "seed": 0,
        "inputs": {
            "question": {"modality": "text", "encoder": "hf_text", "params": {}},
            "image": {"modality": "image", "encoder": "cnn_image", "params": {"channels": [4, 8]}},
        },
        "fusion": {"name": "concat", "params": {"hidden": 8}},
        "head": {"hidden": 8, "dropout": 0.0},
    }
    torch.manual_seed(0)
    source = MultimodalModel(spec)
    source.save(tmp_path / "source")
    item = {**spec["inputs"]["image"], "init_from": str(tmp_path / "source"), "freeze": True}
    encoder = build_input_encoder(item)
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    for key, value in source.encoders["image"].state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value)
    encoder.train()
    assert not encoder.training  # batch norm statistics stay fixed: cached features stay valid

    reused = MultimodalModel({**spec, "inputs": {**spec["inputs"], "image": item}})
    reused.save(tmp_path / "reused")
    loaded = MultimodalModel.load(tmp_path / "reused")
    assert loaded.encoders["image"].frozen
    assert loaded.spec["inputs"]["image"]["initialized_from"] == str(tmp_path / "source")
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        a = reused.eval().encoders["image"](reused.encoders["image"].preprocess(images))
        b = loaded.encoders["image"](loaded.encoders["image"].preprocess(images))
    assert torch.equal(a, b)
