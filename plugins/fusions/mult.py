"""Multimodal Transformer, MulT (Tsai et al., "Multimodal Transformer for Unaligned Multimodal Language
Sequences", ACL 2019): cross-modal attention between every pair of modalities, no alignment needed.

Each input's tokens are projected to ``hidden`` and given sinusoidal positions (as in the paper).
For every ordered pair (target, source) a cross-modal Transformer of ``layers`` blocks lets the
target's tokens attend to the source's (queries from the target, keys and values from the source,
the source's padding masked), each block pre-norm attention plus a feed-forward, both residual.
Each result is mean-pooled over the target's real tokens, and all pairs are concatenated: with M
inputs the output has ``M * (M - 1) * hidden`` units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion, Tokens


def sinusoidal(length: int, width: int, device: torch.device) -> torch.Tensor:
    """``(length, width)`` fixed positional encodings of Vaswani et al. (2017)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    out = torch.zeros(length, width, device=device)
    out[:, 0::2] = torch.sin(position * rate)
    out[:, 1::2] = torch.cos(position * rate)[:, : width // 2]
    return out


class CrossModalBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ffn = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, 4 * hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4 * hidden, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, target: torch.Tensor, source: Tokens) -> torch.Tensor:
        kv = self.norm_kv(source.values)
        attended, _ = self.attn(self.norm_q(target), kv, kv, key_padding_mask=source.padding_mask, need_weights=False)
        target = target + attended
        return target + self.ffn(self.norm_ffn(target))


class MulTFusion(Fusion):
    needs_sequences = True

    def __init__(
        self, dims: Mapping[str, int], hidden: int = 64, heads: int = 4, layers: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__(dims)
        if hidden % heads:
            raise ValueError(f"mult: hidden ({hidden}) must be divisible by heads ({heads})")
        if layers < 1:
            raise ValueError(f"mult: layers must be at least 1, got {layers}")
        self.names, self.hidden = sorted(dims), hidden
        self.pairs = [(t, s) for t in self.names for s in self.names if s != t]
        self.proj = nn.ModuleDict({n: nn.Linear(dims[n], hidden) for n in self.names})
        self.blocks = nn.ModuleDict(
            {
                f"{t}->{s}": nn.ModuleList(CrossModalBlock(hidden, heads, dropout) for _ in range(layers))
                for t, s in self.pairs
            }
        )
        self.norm = nn.LayerNorm(hidden)
        self.output_dim = hidden * len(self.pairs)

    def forward(self, features: Mapping[str, Tokens]) -> torch.Tensor:
        self.check_inputs(features)
        tokens = {}
        for n in self.names:
            t = features[n]
            tokens[n] = t.map(lambda v, n=n: self.proj[n](v) + sinusoidal(v.shape[1], self.hidden, v.device))
        out = []
        for target, source in self.pairs:
            x = tokens[target].values
            for block in self.blocks[f"{target}->{source}"]:
                x = block(x, tokens[source])
            out.append(Tokens(self.norm(x), tokens[target].mask).mean())
        return torch.cat(out, dim=1)
