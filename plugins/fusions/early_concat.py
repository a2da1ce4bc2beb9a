"""Early fusion: concatenate low-level inputs (bag-of-words counts, pixels) and learn one shared network.

The classic pipeline before learned encoders (Baltrušaitis et al., "Multimodal Machine Learning: A
Survey and Taxonomy", 2018, section 4): modalities meet at the feature level, so every hidden unit
can mix them from the first layer. Nothing is projected per modality first; that is the point.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class EarlyConcatFusion(Fusion):
    def __init__(self, dims: Mapping[str, int], hidden: int = 256, layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__(dims)
        if layers < 1:
            raise ValueError(f"early_concat: layers must be at least 1, got {layers}")
        self.names = sorted(dims)
        blocks: list[nn.Module] = []
        width = sum(dims.values())
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.net = nn.Sequential(*blocks)
        self.output_dim = hidden

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        return self.net(torch.cat([features[n] for n in self.names], dim=1))
