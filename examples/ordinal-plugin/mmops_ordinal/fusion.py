"""Attentive pooling per input, then concatenation (the one-hop form of Lin et al., "A Structured
Self-attentive Sentence Embedding", ICLR 2017): each input's tokens get a learned score, padding is
masked out before the softmax, and the weighted mean of the real tokens stands for the input.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.interfaces import Fusion, Tokens


class AttentivePoolFusion(Fusion):
    needs_sequences = True  # mmops hands over Tokens (values + mask) for every input

    def __init__(self, dims: Mapping[str, int], hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        self.score = nn.ModuleDict({n: nn.Linear(dims[n], 1) for n in self.names})
        self.out = nn.Sequential(nn.Linear(sum(dims.values()), hidden), nn.ReLU(), nn.Dropout(dropout))
        self.output_dim = hidden

    def forward(self, features: Mapping[str, Tokens]) -> torch.Tensor:
        self.check_inputs(features)
        pooled = []
        for name in self.names:
            tokens = features[name]
            values = tokens.values.masked_fill(~tokens.mask.unsqueeze(-1), 0.0)  # padding may hold anything
            logits = self.score[name](values).squeeze(-1).masked_fill(~tokens.mask, float("-inf"))
            pooled.append((logits.softmax(dim=1).unsqueeze(-1) * values).sum(1))
        return self.out(torch.cat(pooled, dim=-1))
