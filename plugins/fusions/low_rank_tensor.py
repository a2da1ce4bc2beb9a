"""Low-rank Multimodal Fusion (Liu et al., "Efficient Low-rank Multimodal Fusion with
Modality-Specific Factors", 2018).

The weight tensor of a Tensor Fusion Network is decomposed into ``rank`` modality-specific factors,
so the outer product is never formed: ``h = sum_r w_r * prod_i ([x_i; 1] W_i^(r)) + b``. The cost is
linear in the number of modalities instead of exponential.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class LowRankTensorFusion(Fusion):
    # Models saved before ``normalize`` existed have neither the LayerNorms nor the new init.
    saved_before: ClassVar[dict[str, Any]] = {"normalize": False}

    def __init__(
        self, dims: Mapping[str, int], hidden: int = 128, rank: int = 4, dropout: float = 0.1, normalize: bool = True
    ) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        # Each input normalised, each factor scaled by 1/sqrt(fan-in): every modality's projection has unit
        # variance, so their product neither explodes nor vanishes however many inputs or however wide.
        self.norm = nn.ModuleDict({n: nn.LayerNorm(dims[n]) if normalize else nn.Identity() for n in self.names})
        if normalize:
            self.factors = nn.ParameterDict(
                {n: nn.Parameter(torch.randn(rank, dims[n] + 1, hidden) / (dims[n] + 1) ** 0.5) for n in self.names}
            )
            self.rank_weights = nn.Parameter(torch.full((1, rank), 1.0 / rank))  # starts as the mean over ranks
        else:  # the original init
            self.factors = nn.ParameterDict(
                {n: nn.Parameter(nn.init.xavier_normal_(torch.empty(rank, dims[n] + 1, hidden))) for n in self.names}
            )
            self.rank_weights = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, rank)))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.out_norm = nn.LayerNorm(hidden) if normalize else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.output_dim = hidden

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        fused = None
        for n in self.names:
            x = self.norm[n](features[n])
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            z = torch.einsum("bd,rdh->rbh", x, self.factors[n])  # (rank, B, H)
            fused = z if fused is None else fused * z
        out = self.out_norm(torch.einsum("or,rbh->bh", self.rank_weights, fused) + self.bias)
        return self.dropout(out)
