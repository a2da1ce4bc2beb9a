"""Tensor Fusion Network (Zadeh et al., "Tensor Fusion Network for Multimodal Sentiment Analysis", 2017).

Each input is projected to a small vector and extended with a constant 1; the fused representation is
the flattened outer product of these vectors, so it holds every unimodal term, every bimodal product
and (with three inputs) every trimodal product. Its size is ``(hidden + 1) ** M``: keep ``hidden``
small (the paper used 32 for text, less for the others).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class TensorFusion(Fusion):
    # Models saved before ``normalize`` existed have neither the LayerNorms nor the new init.
    saved_before: ClassVar[dict[str, Any]] = {"normalize": False}

    def __init__(self, dims: Mapping[str, int], hidden: int = 16, dropout: float = 0.1, normalize: bool = True) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        self.proj = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(dims[n], hidden), *([nn.LayerNorm(hidden)] if normalize else []), nn.ReLU())
                for n in self.names
            }
        )
        self.dropout = nn.Dropout(dropout)
        self.output_dim = (hidden + 1) ** len(self.names)
        # The outer product multiplies M projections: normalised, its scale no longer grows with M.
        self.out_norm = nn.LayerNorm(self.output_dim) if normalize else nn.Identity()

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        fused = None
        for n in self.names:
            z = self.proj[n](features[n])
            z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
            fused = z if fused is None else (fused.unsqueeze(2) * z.unsqueeze(1)).flatten(1)
        return self.dropout(self.out_norm(fused))
