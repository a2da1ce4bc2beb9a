"""A task that combines the inputs itself (contrastive towers, a caption decoder) gets every input's
features by name, no fusion is built, and the model saves and loads with the task's network."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import mmops.core.tasks as tasks_module
from mmops.core.model import MultimodalModel, TaskInputs, build_input_encoder
from mmops.core.tasks import HIGHER, Task

SPEC = {
    "candidate": "towers",
    "labels": [],
    "image_size": 16,
    "target": "caption",
    "seed": 0,
    "inputs": {
        "text": {"modality": "text", "encoder": "bow_text", "params": {}},
        "image": {"modality": "image", "encoder": "cnn_image", "params": {"channels": [4, 8]}},
    },
    "fusion": {"name": None, "params": {}},
    "head": {"hidden": 8, "dropout": 0.0},
    "task": {"name": "towers", "params": {}},
}


class Towers(nn.Module):
    def __init__(self, dims: dict[str, int], width: int) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({n: nn.Linear(d, width) for n, d in dims.items()})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.proj[n](features[n]) for n in sorted(self.proj)], dim=1)


class TowersTask(Task):
    """Two embeddings side by side; the loss pulls each row's pair together."""

    metrics: ClassVar[dict[str, str]] = {"agreement": HIGHER}
    combines_inputs = True

    def network(self, dims, hidden, dropout):
        self.width = hidden
        return Towers(dims, hidden)

    def loss(self, outputs, targets):
        a, b = outputs.split(self.width, dim=1)
        return (a - b).pow(2).mean()

    def evaluate(self, targets, scores, groups=None):
        return {"agreement": 0.0, "n": len(scores)}

    def describe(self, targets, scores, metrics):
        return {}

    def answers(self, scores, top_k):
        return [{"answer": row.tolist(), "top_k": []} for row in scores]


@pytest.fixture()
def towers_task(monkeypatch):
    real = tasks_module.task_class
    monkeypatch.setattr(tasks_module, "task_class", lambda name: TowersTask if name == "towers" else real(name))


def _model() -> MultimodalModel:
    torch.manual_seed(0)
    encoders = {n: build_input_encoder(i) for n, i in SPEC["inputs"].items()}
    encoders["text"].fit(["a red circle", "a blue square"])
    return MultimodalModel(SPEC, encoders)


def _inputs(model: MultimodalModel) -> dict:
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    return {
        "text": model.encoders["text"].preprocess(["a red circle", "a blue square"]),
        "image": model.encoders["image"].preprocess(images),
    }


def test_the_task_network_takes_every_input_and_trains_both_towers(towers_task):
    model = _model()
    assert isinstance(model.fusion, TaskInputs) and not model.needs_sequences
    inputs = _inputs(model)
    outputs = model(inputs)
    assert outputs.shape == (2, 16)
    model.task.loss(outputs, np.zeros(2)).backward()
    assert model.head.proj["text"].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders["image"].parameters())


def test_a_model_whose_task_combines_inputs_round_trips(towers_task, tmp_path):
    model = _model().eval()
    inputs = _inputs(model)
    with torch.no_grad():
        before = model(inputs)
    model.save(tmp_path / "m")
    loaded = MultimodalModel.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(before, loaded(inputs))
