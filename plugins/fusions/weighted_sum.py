"""Weighted-sum fusion: project every input to one space and add them with learned modality weights.

The weights are a softmax over one learned score per modality, so they stay interpretable as the
share each modality contributes (as in the modality-weighting baselines of Baltrušaitis et al., 2018).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class WeightedSumFusion(Fusion):
    def __init__(self, dims: Mapping[str, int], hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        self.proj = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(dims[n], hidden), nn.LayerNorm(hidden), nn.ReLU()) for n in self.names}
        )
        self.scores = nn.Parameter(torch.zeros(len(self.names)))
        self.dropout = nn.Dropout(dropout)
        self.output_dim = hidden

    def weights(self) -> dict[str, float]:
        """The current share of each modality (for reports)."""
        return dict(zip(self.names, torch.softmax(self.scores, 0).tolist(), strict=True))

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        stacked = torch.stack([self.proj[n](features[n]) for n in self.names], dim=1)  # (B, M, H)
        return self.dropout((torch.softmax(self.scores, 0)[None, :, None] * stacked).sum(1))
