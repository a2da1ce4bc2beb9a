"""cnn_image augmentation: random affine transforms in training only, label-safe flips only when asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmops.core.plugin_registry import get_encoder


def _images(n: int = 4) -> torch.Tensor:
    rng = np.random.default_rng(0)
    enc = get_encoder("cnn_image")()
    return enc.preprocess(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))


def test_training_only_and_off_by_default():
    batch = _images()
    enc = get_encoder("cnn_image")(augment=True)
    assert torch.equal(enc.eval()._augmented(batch), batch)
    torch.manual_seed(0)
    moved = enc.train()._augmented(batch)
    assert moved.shape == batch.shape and not torch.allclose(moved, batch, atol=1e-2)
    assert torch.equal(get_encoder("cnn_image")().train()._augmented(batch), batch)  # easy-VQA: untouched
    assert enc.config()["augment"] is True


def test_zero_ranges_are_the_identity_and_flip_mirrors():
    batch = _images()
    still = get_encoder("cnn_image")(augment=True, shift=0, rotate=0, scale=0).train()
    assert torch.allclose(still._augmented(batch), batch, atol=1e-5)
    flips = get_encoder("cnn_image")(augment=True, shift=0, rotate=0, scale=0, flip=True).train()
    torch.manual_seed(3)
    out = flips._augmented(batch)
    for i in range(len(batch)):
        same, mirrored = (
            torch.allclose(out[i], batch[i], atol=1e-5),
            torch.allclose(out[i], batch[i].flip(-1), atol=1e-5),
        )
        assert same or mirrored
    assert any(torch.allclose(out[i], batch[i].flip(-1), atol=1e-5) for i in range(len(batch)))


def test_gradients_flow_and_bad_ranges_are_named():
    enc = get_encoder("cnn_image")(channels=[4, 8], augment=True).train()
    enc(_images()).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    with pytest.raises(ValueError, match="shift must be in"):
        get_encoder("cnn_image")(shift=0.7)
