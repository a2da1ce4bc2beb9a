"""Cross-attention fusion: a modality's pooled vector queries the tokens of the other modalities.

As in attention-based VQA (Yang et al., "Stacked Attention Networks for Image Question Answering",
2016; the cross-attention of Lu et al., ViLBERT, 2019): the question looks over image patches and
takes the weighted sum of what it finds. Multi-head scaled dot-product attention with learned Q/K/V
projections. With ``query`` unset every modality queries all the others in turn, which covers two and
three inputs without configuration; ``query: question`` makes only the question ask.

Inputs are sequences (``needs_sequences``): CNN feature maps and ViT patches arrive as tokens; a
frozen (cached) or sequence-less encoder arrives as one token.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class CrossAttentionFusion(Fusion):
    needs_sequences = True

    def __init__(
        self, dims: Mapping[str, int], hidden: int = 128, heads: int = 4, query: str | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(dims)
        if hidden % heads:
            raise ValueError(f"cross_attention: hidden ({hidden}) must be divisible by heads ({heads})")
        if query is not None and query not in dims:
            raise ValueError(f"cross_attention: query '{query}' is not an input; inputs are {sorted(dims)}")
        self.names = sorted(dims)
        self.queries = [query] if query else self.names
        self.proj = nn.ModuleDict({n: nn.Linear(dims[n], hidden) for n in self.names})
        self.attn = nn.ModuleDict({
            q: nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) for q in self.queries
        })
        self.norm = nn.LayerNorm(hidden)
        self.output_dim = 2 * hidden * len(self.queries)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        tokens = {n: self.proj[n](features[n]) for n in self.names}
        out = []
        for q in self.queries:
            question = tokens[q].mean(1, keepdim=True)  # (B, 1, H)
            context = torch.cat([tokens[n] for n in self.names if n != q], dim=1)  # (B, T, H)
            attended, _ = self.attn[q](question, context, context, need_weights=False)
            out += [question.squeeze(1), self.norm(attended.squeeze(1))]
        return torch.relu(torch.cat(out, dim=1))
