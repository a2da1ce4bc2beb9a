"""Attention fusion: the tokens of every modality, together, go through one self-attention layer.

Scaled dot-product attention with learned query, key and value projections, a residual connection
and layer norm, followed by a position-wise feed-forward block, as in one Transformer encoder layer
(Vaswani et al., "Attention Is All You Need", 2017). A learned modality embedding tells the tokens
apart; padding is masked out of the attention (``key_padding_mask``) and out of the per-modality
means, which are concatenated so the head still knows which is which. A modality without structure
(or a missing input) is one token.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion, Tokens


class AttentionFusion(Fusion):
    needs_sequences = True

    def __init__(self, dims: Mapping[str, int], hidden: int = 128, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__(dims)
        if hidden % heads:
            raise ValueError(f"attention: hidden ({hidden}) must be divisible by heads ({heads})")
        self.names = sorted(dims)
        self.proj = nn.ModuleDict({n: nn.Linear(dims[n], hidden) for n in self.names})
        self.modality = nn.Parameter(torch.randn(len(self.names), hidden) * 0.02)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * hidden, hidden)
        )
        self.output_dim = hidden * len(self.names)

    def forward(self, features: Mapping[str, Tokens]) -> torch.Tensor:
        self.check_inputs(features)
        parts = [
            features[n].map(lambda v, n=n, i=i: self.proj[n](v) + self.modality[i]) for i, n in enumerate(self.names)
        ]
        tokens = torch.cat([p.values for p in parts], dim=1)
        mask = torch.cat([p.mask for p in parts], dim=1)
        attended, _ = self.attn(tokens, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        tokens = self.norm1(tokens + attended)
        tokens = self.norm2(tokens + self.ffn(tokens))
        out, start = [], 0
        for p in parts:  # each modality's mean over its own real tokens
            out.append(Tokens(tokens[:, start : start + p.length], p.mask).mean())
            start += p.length
        return torch.cat(out, dim=1)
