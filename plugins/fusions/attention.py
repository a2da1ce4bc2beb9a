"""Attention fusion: each modality becomes one token; multi-head self-attention mixes the tokens.

Scaled dot-product attention with learned query, key and value projections, a residual connection
and layer norm, followed by a position-wise feed-forward block, as in one Transformer encoder layer
(Vaswani et al., "Attention Is All You Need", 2017). A learned modality embedding tells the tokens
apart, and the attended tokens are concatenated so the head still knows which is which.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class AttentionFusion(Fusion):
    def __init__(self, dims: Mapping[str, int], hidden: int = 128, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__(dims)
        if hidden % heads:
            raise ValueError(f"attention: hidden ({hidden}) must be divisible by heads ({heads})")
        self.names = sorted(dims)
        self.proj = nn.ModuleDict({n: nn.Linear(dims[n], hidden) for n in self.names})
        self.modality = nn.Parameter(torch.randn(len(self.names), hidden) * 0.02)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * hidden, hidden))
        self.output_dim = hidden * len(self.names)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        tokens = torch.stack([self.proj[n](features[n]) for n in self.names], dim=1) + self.modality
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        tokens = self.norm1(tokens + attended)
        tokens = self.norm2(tokens + self.ffn(tokens))
        return tokens.flatten(1)
