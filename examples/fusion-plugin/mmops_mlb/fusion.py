"""Multimodal Low-rank Bilinear pooling (Kim et al., "Hadamard Product for Low-rank Bilinear Pooling",
ICLR 2017): ``P^T (tanh(U_1 x_1) * tanh(U_2 x_2) * ...)``, a low-rank bilinear model of the inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.interfaces import Fusion


class MLBFusion(Fusion):
    def __init__(self, dims: Mapping[str, int], rank: int = 256, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims)  # checks there are two or more inputs, keeps self.dims
        self.names = sorted(dims)
        self.proj = nn.ModuleDict({n: nn.Linear(dims[n], rank) for n in self.names})
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(rank, hidden))
        self.output_dim = hidden  # what the model sizes its classification head by

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)  # a clear error naming the input, not a shape error in a matmul
        first, *rest = self.names
        joint = torch.tanh(self.proj[first](features[first]))
        for n in rest:
            joint = joint * torch.tanh(self.proj[n](features[n]))
        return self.out(joint)
