"""Raw pixels as features: each image resized to ``size`` x ``size`` and flattened, scaled to [-1, 1].

The low-level image input of classic early fusion: concatenated with bag-of-words counts and fed to
one MLP (``early_concat``). It has no parameters, yet it is not ``frozen``: resizing a batch costs less
than reading a cache of 5,000 x 3,072 floats, so there is nothing worth caching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mmops.core.interfaces import Encoder


class PixelsImageEncoder(Encoder):
    modality = "image"

    def __init__(self, size: int = 16, grayscale: bool = False) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"pixels: size must be positive, got {size}")
        self.size, self.grayscale = size, grayscale
        self.output_dim = (1 if grayscale else 3) * size * size

    def preprocess(self, values: Sequence[Any] | np.ndarray) -> torch.Tensor:
        array = np.stack(values) if not isinstance(values, np.ndarray) else values
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"pixels expects uint8 images of shape (H, W, 3), got batch {array.shape}")
        images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
        if self.grayscale:
            images = images.mean(1, keepdim=True)
        if images.shape[-2:] != (self.size, self.size):
            # Area averaging: the low-resolution image keeps every pixel's colour, unlike subsampling.
            images = F.interpolate(images, size=(self.size, self.size), mode="area")
        return images.div_(127.5).sub_(1.0)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.flatten(1)

    def config(self) -> dict[str, Any]:
        return {"size": self.size, "grayscale": self.grayscale}
