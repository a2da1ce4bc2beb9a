"""FiLM (Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", 2018).

The conditioning modalities (e.g. the question) predict a per-channel scale ``gamma`` and shift
``beta`` that modulate every position of the target's feature map (e.g. the CNN's last feature map):
``relu(gamma * W x + beta)``, then global average pooling. It is one FiLM-ed block on top of the
encoder rather than FiLM inside every residual block of the paper, so any image encoder can be used.

``target`` names the modulated input (default: ``image`` when there is one, else the first name);
all other inputs, mean-pooled over their real tokens and concatenated, condition it. The target's
modulated positions are averaged over its real tokens only: padding never enters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mmops.core.interfaces import Fusion, Tokens


class FiLMFusion(Fusion):
    needs_sequences = True
    # Models saved before ``normalize`` existed have neither the LayerNorms nor the new init.
    saved_before: ClassVar[dict[str, Any]] = {"normalize": False}

    def __init__(
        self,
        dims: Mapping[str, int],
        hidden: int = 128,
        target: str | None = None,
        dropout: float = 0.1,
        normalize: bool = True,
    ) -> None:
        super().__init__(dims)
        names = sorted(dims)
        target = target or ("image" if "image" in dims else names[0])
        if target not in dims:
            raise ValueError(f"film: target '{target}' is not an input; inputs are {names}")
        self.target, self.conditions = target, [n for n in names if n != target]
        width = sum(dims[n] for n in self.conditions)
        if normalize:
            self.features = nn.Sequential(nn.Linear(dims[target], hidden), nn.LayerNorm(hidden))
            self.condition_norm: nn.Module = nn.LayerNorm(width)
        else:
            self.features, self.condition_norm = nn.Linear(dims[target], hidden), nn.Identity()
        self.film = nn.Linear(width, 2 * hidden)
        if normalize:
            # Small initial gamma and beta: FiLM starts near the identity on normalised features and the
            # condition's influence grows with training instead of swamping the target's features at step 0.
            nn.init.normal_(self.film.weight, std=0.01)
            nn.init.zeros_(self.film.bias)
        self.dropout = nn.Dropout(dropout)
        self.output_dim = hidden

    def forward(self, features: Mapping[str, Tokens]) -> torch.Tensor:
        self.check_inputs(features)
        condition = self.condition_norm(torch.cat([features[n].mean() for n in self.conditions], dim=1))
        gamma, beta = self.film(condition).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, H) each
        # 1 + gamma: starts as the identity, so early training does not zero the image out.
        maps = features[self.target].map(lambda v: torch.relu((1 + gamma) * self.features(v) + beta))  # (B, T, H)
        return self.dropout(maps.mean())
