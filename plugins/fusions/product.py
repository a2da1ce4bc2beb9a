"""Element-wise product fusion: project each input to a shared space and multiply, as in the easy-VQA
Keras baseline and the multiplicative VQA model of Antol et al., "VQA: Visual Question Answering", 2015.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class ProductFusion(Fusion):
    def __init__(self, dims: Mapping[str, int], hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        # Sigmoid-gated projections keep the product bounded; a plain product of unbounded
        # projections makes the early loss landscape very flat.
        self.proj = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(dims[n], hidden), nn.LayerNorm(hidden)) for n in self.names}
        )
        self.dropout = nn.Dropout(dropout)
        self.output_dim = hidden

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        out = torch.relu(self.proj[self.names[0]](features[self.names[0]]))
        for n in self.names[1:]:
            out = out * torch.sigmoid(self.proj[n](features[n]))
        return self.dropout(out)
