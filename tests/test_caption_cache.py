"""A caption decoder over a frozen image encoder trains from the feature cache: the image tokens are encoded
once by featurize, and a second run with another decoder size encodes no image again."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmops.config import Params
from mmops.data.featurize import featurize
from mmops.data.prepare import prepare
from mmops.training.loop import Dataset, train_candidate


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    """A randomly initialised ViT written with save_pretrained: nothing is downloaded."""
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("vit") / "tiny-vit"
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(path)
    return str(path)


def _project(root, checkpoint: str) -> Params:
    rows = []
    for i in range(24):
        name = ["red", "blue", "green"][i % 3]
        rgb = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}[name]
        (root / "raw" / "images").mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.array(rgb) + np.random.default_rng(i).integers(-20, 20, (16, 16, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "raw" / "images" / f"{i}.png")
        rows += [
            {"image": f"images/{i}.png", "caption": f"a {name} picture"},
            {"image": f"images/{i}.png", "caption": f"all {name}"},
        ]
    pd.DataFrame(rows).to_csv(root / "raw" / "manifest.csv", index=False)
    return Params.model_validate(
        {
            "data": {"image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2},
            "inputs": {"image": {"modality": "image", "encoder": "hf_image", "params": {"checkpoint": checkpoint}}},
            "target": {"column": "caption", "type": "captioning", "params": {"max_length": 4, "num_beams": 1}},
            "select_metric": "val_cider",
            "train": {"epochs": 1, "batch_size": 16, "head_hidden": 16, "threads": 1},
            "candidates": [{"name": "small"}, {"name": "wide", "train": {"head_hidden": 32}}],
        }
    )


def test_second_decoder_size_reuses_cached_image_tokens(tmp_path, tiny_vit, monkeypatch):
    from mmops_plugins.encoders.hf_image import HFImageEncoder

    params = _project(tmp_path, tiny_vit)
    prepare(tmp_path / "raw", tmp_path / "prepared", params)
    info = featurize(tmp_path / "prepared", tmp_path / "features", params, tmp_path / "cache")["image"]
    assert info["tokens_computed"] == info["distinct"] == 24 and info["tokens"] == 24 * 5  # [CLS] + 2x2 patches each

    calls = []
    real = HFImageEncoder.forward_sequence
    monkeypatch.setattr(HFImageEncoder, "forward_sequence", lambda self, batch: calls.append(1) or real(self, batch))
    # The decoder size is not a featurize parameter: the stage's inputs are unchanged, the cache answers.
    again = featurize(tmp_path / "prepared", tmp_path / "features", params, tmp_path / "cache")["image"]
    assert again["tokens_computed"] == 0 and again["computed"] == 0
    data = Dataset.load(tmp_path / "prepared", tmp_path / "features", params)
    assert data.precomputed == {"image"}
    for candidate in params.candidates:
        result = train_candidate(params, candidate, data, tmp_path / "models" / candidate.name)
        assert result["metrics"]["test"]["images"] > 0
        spec = (tmp_path / "models" / candidate.name / "spec.json").read_text()
        assert f'"hidden": {params.train_for(candidate).head_hidden}' in spec
    assert calls == []  # neither run (16 wide, 32 wide) put an image through the ViT
