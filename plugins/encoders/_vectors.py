"""What the two feature-sequence encoders share: checking ``(time, dim)`` arrays, padding them into a
batch with a mask, and the per-feature standardisation learned on the train split.

Precomputed features (COVAREP acoustic frames, OpenFace/Facet facial frames, GloVe or BERT word
vectors) come on wildly different scales per feature: some COVAREP columns are in the hundreds, others
near zero. Standardising each feature with the train split's frame mean and deviation keeps one column
from dominating a projection, and is learned state that travels with the model (buffers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mmops.config import VECTORS_MAX_LENGTH as DEFAULT_MAX_LENGTH  # noqa: F401 (the encoders' default)


def check_sequences(values: Sequence[Any], dim: int, max_length: int, who: str) -> list[np.ndarray]:
    """Each value as a finite float32 ``(time, dim)`` array with 1..max_length frames, or a ValueError
    naming the encoder, the value and what is wrong."""
    if isinstance(values, np.ndarray) and values.ndim == 3:
        values = list(values)
    out = []
    for i, value in enumerate(values):
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
            raise ValueError(f"{who}: value {i} must be a numeric (time, {dim}) array, got {type(value).__name__}")
        if value.ndim != 2:
            raise ValueError(f"{who}: value {i} has shape {value.shape}, expected (time, {dim}) frames")
        if dim and value.shape[1] != dim:
            raise ValueError(f"{who}: value {i} has {value.shape[1]} features per frame, this encoder takes {dim}")
        if value.shape[0] == 0:
            raise ValueError(f"{who}: value {i} is an empty sequence (0 frames)")
        if value.shape[0] > max_length:
            raise ValueError(f"{who}: value {i} has {value.shape[0]} frames, over max_length {max_length}")
        array = np.asarray(value, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{who}: value {i} holds NaN or infinity")
        out.append(array)
    if not out:
        raise ValueError(f"{who}: no values")
    return out


def pad_batch(arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """``{"values": (batch, longest, dim), "mask": (batch, longest)}``, True for a real frame."""
    longest = max(len(a) for a in arrays)
    values = np.zeros((len(arrays), longest, arrays[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(arrays), longest), dtype=bool)
    for i, array in enumerate(arrays):
        values[i, : len(array)] = array
        mask[i, : len(array)] = True
    return {"values": torch.from_numpy(values), "mask": torch.from_numpy(mask)}


class Standardise(nn.Module):
    """Per-feature ``(x - mean) / std`` with statistics of the train split's frames (buffers, so saved)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, arrays: list[np.ndarray]) -> None:
        frames = np.concatenate(arrays).astype(np.float64)
        std = frames.std(0)
        self.mean.copy_(torch.from_numpy(frames.mean(0)))
        self.std.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0)))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std


def learned_dim(values: Sequence[Any], dim: int, who: str) -> int:
    """The frame width: the configured one, else the training values' (which must agree)."""
    widths = {np.shape(v)[1] for v in values if np.ndim(v) == 2}
    if dim:
        return dim
    if len(widths) != 1:
        raise ValueError(f"{who}: training sequences have frame widths {sorted(widths)}; set params.dim")
    return int(widths.pop())
