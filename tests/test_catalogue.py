"""Every built-in plugin passes the conformance check that `mmops plugins check` runs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import nn

from mmops.core import conformance
from mmops.core.conformance import check_plugin
from mmops.core.interfaces import Fusion
from mmops.core.model import MultimodalModel
from mmops.core.plugin_registry import discover, get_fusion

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
ATTENDING = {"attention", "cross_attention", "film", "mm_transformer", "mult"}
ENCODERS = [
    "hf_text",
    "bow_text",
    "word2vec_text",
    "gru_text",
    "cnn_image",
    "hf_image",
    "pixels",
    "mel_audio",
    "numeric",
    "categorical",
    "seq_features",
    "mean_features",
]


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    """A randomly initialised ViT written with save_pretrained: nothing is downloaded."""
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("vit") / "tiny-vit"
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(path)
    return str(path)


def test_the_whole_catalogue_is_registered_by_the_mmops_package():
    for kind, names in (("fusion", FUSIONS), ("encoder", ENCODERS)):
        found = discover(kind)
        assert set(names) <= set(found)
        assert all(found[n].package == "mmops" for n in names)


def _assert_passes(name: str, params: dict | None = None, n_checks: int = 7) -> None:
    checks = check_plugin(name, params=params)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    assert not failed, "\n".join(failed)
    assert len(checks) == n_checks


def test_the_attending_fusions_are_exactly_those_that_need_sequences():
    assert {n for n in FUSIONS if get_fusion(n).needs_sequences} == ATTENDING


@pytest.mark.parametrize("name", FUSIONS)
def test_fusion_conformance(name):
    _assert_passes(name, n_checks=7 if name in ATTENDING else 6)  # attending ones: padding changes nothing


@pytest.mark.parametrize("name", [e for e in ENCODERS if e != "hf_image"])
def test_encoder_conformance(name):
    _assert_passes(name)


def test_seq_features_lstm_conformance():
    _assert_passes("seq_features", {"architecture": "lstm", "width": 16})


def test_hf_image_conformance_on_a_tiny_vit(tiny_vit):
    _assert_passes("hf_image", {"checkpoint": tiny_vit})
    _assert_passes("hf_image", {"checkpoint": tiny_vit, "frozen": False, "pooling": "cls"})


class _IgnoresAnInput(Fusion):
    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__(dims)
        self.proj = nn.Linear(dims["a"], 4)
        self.output_dim = 4

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.dropout(self.proj(features["a"]), 0.5, True)  # no check_inputs, dropout even in eval


def test_the_check_catches_a_broken_fusion(monkeypatch):
    monkeypatch.setattr(conformance, "get_fusion", lambda name: _IgnoresAnInput)
    failed = {c.name for c in check_plugin("broken", kind="fusion") if not c.passed}
    assert "gradients reach every trainable parameter and every input" in failed
    assert "eval mode is deterministic" in failed
    assert "a wrong input (missing, wrong width) gets a clear error" in failed


def test_frozen_encoder_gives_its_tokens_cached_or_not(tiny_vit):
    """A frozen encoder's cached features for a fusion that attends are its tokens (patches), not one vector."""
    spec = {
        "candidate": "t",
        "labels": ["a", "b"],
        "image_size": 32,
        "target": "answer",
        "seed": 0,
        "inputs": {
            "image": {"modality": "image", "encoder": "hf_image", "params": {"checkpoint": tiny_vit}},
            "n": {"modality": "tabular", "encoder": "numeric", "params": {"n_features": 3}},
        },
        "fusion": {"name": "cross_attention", "params": {"hidden": 8, "heads": 2}},
        "head": {"hidden": 8, "dropout": 0.0},
    }
    model = MultimodalModel(spec).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    raw = {"image": model.encoders["image"].preprocess(images), "n": torch.zeros(3, 3)}
    with torch.no_grad():
        tokens = model.encoders["image"].forward_sequence(raw["image"])
        assert tokens.length == 17  # 16 patches and the class token
        assert torch.equal(model(raw), model({**raw, "image": tokens}, None, frozenset({"image"})))
        pooled = {**raw, "image": model.encoders["image"](raw["image"])}
        with pytest.raises(ValueError, match="pooled vectors, but fusion 'cross_attention'"):
            model(pooled, None, frozenset({"image"}))  # never silently one token
