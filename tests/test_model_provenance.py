"""Issue 17 item 5: a saved model records every resolved parameter and the package and version behind
each plugin; loading under another plugin version warns, or refuses when configured."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from mmops_plugins.fusions.low_rank_tensor import LowRankTensorFusion

from mmops.core.model import SPEC_FILE, MultimodalModel
from mmops.core.plugin_registry import discover
from mmops.core.provenance import PluginVersionError, PluginVersionWarning

SPEC = {
    "candidate": "t",
    "labels": ["no", "yes", "red"],
    "image_size": 8,
    "target": "answer",
    "seed": 0,
    "inputs": {
        "colour": {
            "modality": "tabular",
            "kind": "category",
            "encoder": "categorical",
            "params": {"categories": [["red", "blue"]]},
        },
        "image": {"modality": "image", "encoder": "pixels", "params": {"size": 4}},
    },
    "fusion": {"name": "low_rank_tensor", "params": {"hidden": 8}},  # rank and dropout left to the plugin
    "head": {"hidden": 8, "dropout": 0.0},
}


def _saved(tmp_path):
    torch.manual_seed(0)
    model = MultimodalModel(json.loads(json.dumps(SPEC))).eval()
    images = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    inputs = {
        "colour": model.encoders["colour"].preprocess([["red"], ["blue"]]),
        "image": model.encoders["image"].preprocess(images),
    }
    with torch.no_grad():
        before = model(inputs)
    return model.save(tmp_path / "m"), inputs, before


def _load_quietly(path, **kwargs) -> MultimodalModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginVersionWarning)
        return MultimodalModel.load(path, **kwargs)


def test_the_spec_records_resolved_parameters_and_providers(tmp_path):
    path, _, _ = _saved(tmp_path)
    spec = json.loads((path / SPEC_FILE).read_text())
    assert spec["fusion"]["params"] == {"hidden": 8, "rank": 4, "dropout": 0.1, "normalize": True}  # defaults applied
    assert spec["inputs"]["image"]["params"] == {"size": 4, "grayscale": False}
    version = discover("fusion")["low_rank_tensor"].version
    assert spec["fusion"]["plugin"] == {"package": "mmops", "version": version}
    assert all(i["plugin"] == {"package": "mmops", "version": version} for i in spec["inputs"].values())
    fusion = MultimodalModel(json.loads(json.dumps(SPEC))).fusion
    assert fusion.config() == {"hidden": 8, "rank": 4, "dropout": 0.1, "normalize": True}
    # A task in the plugin form records its provider too.
    with_task = {**json.loads(json.dumps(SPEC)), "task": {"name": "classification", "params": {}}}
    MultimodalModel(with_task).save(tmp_path / "t")
    saved = json.loads((tmp_path / "t" / SPEC_FILE).read_text())
    assert saved["task"]["plugin"] == {"package": "mmops", "version": discover("task")["classification"].version}
    assert MultimodalModel.load(tmp_path / "t", plugin_mismatch="error").task_name == "classification"


def test_a_plugin_release_changing_a_default_does_not_change_a_saved_model(tmp_path, monkeypatch):
    path, inputs, before = _saved(tmp_path)
    defaults = LowRankTensorFusion.__init__.__defaults__
    monkeypatch.setattr(LowRankTensorFusion.__init__, "__defaults__", (defaults[0], 8, *defaults[2:]))  # rank 4 -> 8
    loaded = _load_quietly(path)
    assert loaded.fusion.config()["rank"] == 4
    with torch.no_grad():
        assert torch.equal(loaded(inputs), before)


def test_loading_under_another_plugin_version_warns_or_refuses(tmp_path, monkeypatch):
    path, inputs, before = _saved(tmp_path)
    spec = json.loads((path / SPEC_FILE).read_text())
    spec["fusion"]["plugin"]["version"] = "0.0.1"
    (path / SPEC_FILE).write_text(json.dumps(spec))
    monkeypatch.delenv("MMOPS_PLUGIN_VERSION_MISMATCH", raising=False)
    with pytest.warns(PluginVersionWarning, match=r"fusion 'low_rank_tensor' was saved with mmops 0\.0\.1"):
        MultimodalModel.load(path)
    with pytest.raises(PluginVersionError, match="low_rank_tensor"):
        MultimodalModel.load(path, plugin_mismatch="error")
    monkeypatch.setenv("MMOPS_PLUGIN_VERSION_MISMATCH", "error")
    with pytest.raises(PluginVersionError):
        MultimodalModel.load(path)
    with torch.no_grad():
        assert torch.equal(_load_quietly(path, plugin_mismatch="ignore")(inputs), before)


def test_an_artifact_saved_before_provenance_still_loads(tmp_path, monkeypatch):
    path, inputs, before = _saved(tmp_path)
    spec = json.loads((path / SPEC_FILE).read_text())
    for entry in [*spec["inputs"].values(), spec["fusion"]]:
        entry.pop("plugin")
    # Only what the user typed, as older specs kept; ``normalize`` stays: these weights are today's (with the
    # LayerNorms), and a spec without it is one saved before it existed (tests/test_saved_model_compat.py).
    spec["fusion"]["params"] = {"hidden": 8, "normalize": True}
    (path / SPEC_FILE).write_text(json.dumps(spec))
    monkeypatch.setenv("MMOPS_PLUGIN_VERSION_MISMATCH", "error")
    with torch.no_grad():
        assert torch.equal(_load_quietly(path)(inputs), before)
