"""A task or fusion plugin that raises at import, at construction or returns the wrong shape is reported by
name and package, and never takes the other plugins down.

The broken plugins are a real installed distribution: a ``.dist-info`` folder with entry points on
``sys.path``, found by ``importlib.metadata`` exactly like a pip-installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mmops.core import plugin_registry
from mmops.core.model import MultimodalModel
from mmops.core.tasks import build_task

MODULE = """
import torch
from torch import nn
from mmops.interfaces import Fusion
from mmops.tasks import Task

class BoomFusion(Fusion):
    def __init__(self, dims, hidden: int = 4):
        super().__init__(dims)
        raise RuntimeError("cannot allocate the widget")

class WrongShapeFusion(Fusion):
    def __init__(self, dims, hidden: int = 4):
        super().__init__(dims)
        self.proj = nn.Linear(sum(dims.values()), hidden)
        self.output_dim = hidden

    def forward(self, features):
        return self.proj(torch.cat([features[n] for n in sorted(features)], -1))[:, :1]  # one column, not 4

class BoomTask(Task):
    metrics = {"accuracy": "max"}

    def __init__(self, labels=(), level: int = 1):
        super().__init__(labels)
        raise ValueError("level must be positive")

    def loss(self, outputs, targets): ...
    def evaluate(self, targets, scores, groups=None): ...
    def describe(self, targets, scores, metrics): ...
    def answers(self, scores, top_k): ...
"""


@pytest.fixture
def broken_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "broken_plugins.py").write_text(MODULE)
    (tmp_path / "import_fails.py").write_text("raise SystemExit('this plugin exits at import')\n")
    info = tmp_path / "broken_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[mmops.fusions]\nboom = broken_plugins:BoomFusion\nwrong_shape = broken_plugins:WrongShapeFusion\n\n"
        "[mmops.tasks]\nboomtask = broken_plugins:BoomTask\nexits = import_fails:Anything\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_registry.discover.cache_clear()
    plugin_registry._load.cache_clear()
    yield tmp_path
    sys.modules.pop("broken_plugins", None)
    plugin_registry.discover.cache_clear()
    plugin_registry._load.cache_clear()


def _spec(fusion: str) -> dict:
    return {
        "candidate": "t",
        "labels": ["a", "b"],
        "target": "y",
        "seed": 0,
        "image_size": 16,
        "inputs": {
            "x": {
                "modality": "tabular",
                "encoder": "numeric",
                "params": {"hidden": 4, "n_features": 1},
                "columns": ["p"],
            },
            "y": {
                "modality": "tabular",
                "encoder": "numeric",
                "params": {"hidden": 4, "n_features": 1},
                "columns": ["q"],
            },
        },
        "fusion": {"name": fusion, "params": {}},
        "head": {"hidden": 4, "dropout": 0.0},
        "task": {"name": "classification", "params": {}},
    }


def test_a_fusion_raising_at_construction_is_named_with_its_package(broken_dist: Path):
    with pytest.raises(ValueError, match=r"fusion 'boom' \(package broken-plugins 0.1\).*RuntimeError: cannot "):
        MultimodalModel(_spec("boom"))


def test_a_fusion_returning_the_wrong_shape_is_named_with_its_package(broken_dist: Path):
    model = MultimodalModel(_spec("wrong_shape"))
    inputs = {n: model.encoders[n].preprocess([[1.0], [2.0]]) for n in ("x", "y")}
    wrong = r"fusion 'wrong_shape' \(package broken-plugins 0.1\) returned \(2, 1\)"
    with pytest.raises(ValueError, match=wrong), torch.no_grad():
        model(inputs)


def test_a_task_raising_at_construction_is_named_with_its_package(broken_dist: Path):
    with pytest.raises(ValueError, match=r"task 'boomtask' from broken-plugins 0.1 .*level must be positive"):
        build_task("boomtask", {})


def test_broken_tasks_are_listed_with_the_reason_and_the_others_still_load(broken_dist: Path):
    status = plugin_registry.check_all("task")
    assert "broken-plugins 0.1" in status["exits"] and "SystemExit" in status["exits"]
    assert status["classification"] is None and status["regression"] is None
    assert build_task("regression", {}).output_dim == 1
