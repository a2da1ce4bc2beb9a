"""Cross-attention fusion: a modality's pooled vector queries the tokens of the other modalities.

As in attention-based VQA (Yang et al., "Stacked Attention Networks for Image Question Answering",
2016; the cross-attention of Lu et al., ViLBERT, 2019): the question looks over image patches and
takes the weighted sum of what it finds. Multi-head scaled dot-product attention with learned Q/K/V
projections. With ``query`` unset every modality queries all the others in turn, which covers two and
three inputs without configuration; ``query: question`` makes only the question ask.

Inputs are sequences (``needs_sequences``): word pieces, CNN feature maps and ViT patches arrive as
tokens, an encoder without structure as one token. The query is the masked mean of its modality's
tokens; the padding of the others is masked out of the attention (``key_padding_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion, Tokens


class CrossAttentionFusion(Fusion):
    needs_sequences = True

    def __init__(
        self,
        dims: Mapping[str, int],
        hidden: int = 128,
        heads: int = 4,
        query: str | None = None,
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
        self.attn = nn.ModuleDict(
            {q: nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) for q in self.queries}
        )
        self.norm = nn.LayerNorm(hidden)
        self.output_dim = 2 * hidden * len(self.queries)

    def forward(self, features: Mapping[str, Tokens]) -> torch.Tensor:
        self.check_inputs(features)
        tokens = {n: features[n].map(self.proj[n]) for n in self.names}
        out = []
        for q in self.queries:
            question = tokens[q].mean().unsqueeze(1)  # (B, 1, H)
            others = [tokens[n] for n in self.names if n != q]
            context = torch.cat([t.values for t in others], dim=1)  # (B, T, H)
            padding = ~torch.cat([t.mask for t in others], dim=1)
            attended, _ = self.attn[q](question, context, context, key_padding_mask=padding, need_weights=False)
            out += [question.squeeze(1), self.norm(attended.squeeze(1))]
        return torch.relu(torch.cat(out, dim=1))
