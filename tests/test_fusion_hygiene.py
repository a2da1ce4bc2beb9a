"""Every built-in fusion learns a XOR of two inputs (``mmops plugins check`` runs the same check)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from mmops.core import conformance
from mmops.core.conformance import check_plugin, learns_xor
from mmops.core.interfaces import Fusion

FUSIONS = [
    "early_concat",
    "concat",
    "product",
    "weighted_sum",
    "attention",
    "cross_attention",
    "gated",
    "tensor",
    "low_rank_tensor",
    "film",
    "late",
    "mm_transformer",
    "mult",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", FUSIONS)
def test_every_fusion_learns_xor(name):
    torch.set_num_threads(1)
    check = learns_xor(name)
    if name == "late":  # a learned average of per-input predictions: no interaction, by construction
        assert not check.passed, check.detail
    else:
        assert check.passed, check.detail


@pytest.mark.parametrize("name", ["low_rank_tensor"])
def test_the_reworked_fusions_learn_xor(name):
    torch.set_num_threads(1)
    check = learns_xor(name)
    assert check.passed, check.detail


class _OneInputOnly(Fusion):
    """Passes the shape checks, but its output depends on input 'a' alone."""

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__(dims)
        self.proj = nn.Linear(dims["a"], 8)
        self.unused = nn.ModuleDict({n: nn.Linear(d, 1) for n, d in dims.items()})
        self.output_dim = 8

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        nudge = sum(0.0 * self.unused[n](features[n]).sum() for n in features)  # gradients, but no information
        return (
            torch.relu(self.proj(features["a"])) + nudge + 0.0 * sum(features[n].sum(1, keepdim=True) for n in features)
        )


def test_a_fusion_that_drops_an_input_fails_the_learning_check(monkeypatch):
    monkeypatch.setattr(conformance, "get_fusion", lambda name: _OneInputOnly)
    check = learns_xor("one-input", steps=100)
    assert not check.passed and "chance 0.50" in check.detail
    checks = check_plugin("one-input", kind="fusion", learn=True)
    assert checks[-1].name.startswith("learns a two-input function") and not checks[-1].passed
    assert len(check_plugin("one-input", kind="fusion")) == len(checks) - 1  # off unless asked
