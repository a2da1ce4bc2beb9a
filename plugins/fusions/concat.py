"""Concatenation fusion: project each input, then concatenate (the classic mid-fusion baseline,
e.g. Baltrušaitis et al., "Multimodal Machine Learning: A Survey and Taxonomy", 2018).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class ConcatFusion(Fusion):
    def __init__(self, dims: Mapping[str, int], hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        self.proj = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(dims[n], hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout))
                for n in self.names
            }
        )
        self.output_dim = hidden * len(self.names)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        return torch.cat([self.proj[n](features[n]) for n in self.names], dim=1)
