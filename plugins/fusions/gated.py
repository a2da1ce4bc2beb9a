"""Gated Multimodal Unit (Arevalo et al., "Gated Multimodal Units for Information Fusion", 2017).

Each modality gets a tanh representation ``h_i``; gates ``z_i = sigmoid(W_i [x_1; ...; x_M])`` computed
from all inputs decide, per unit and per example, how much each modality contributes:
``h = sum_i z_i * h_i``. With two inputs this is the paper's bimodal GMU with independent gates
(its multimodal form), so it extends to any number of modalities.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class GatedFusion(Fusion):
    # Models saved before ``normalize`` existed have neither the LayerNorms nor the new init.
    saved_before: ClassVar[dict[str, Any]] = {"normalize": False}

    def __init__(
        self, dims: Mapping[str, int], hidden: int = 256, dropout: float = 0.1, normalize: bool = True
    ) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        # Inputs arrive at their encoders' scales (a CNN's ReLU means, MiniLM's unit vectors): each is
        # normalised first, so neither the tanh nor the gates saturate on the loudest one.
        self.norm = nn.ModuleDict({n: nn.LayerNorm(dims[n]) if normalize else nn.Identity() for n in self.names})
        self.proj = nn.ModuleDict({n: nn.Linear(dims[n], hidden) for n in self.names})
        self.gates = nn.Linear(sum(dims.values()), hidden * len(self.names))
        if normalize:
            nn.init.zeros_(self.gates.bias)  # every modality starts half open (sigmoid 0.5): none is shut out
        self.dropout = nn.Dropout(dropout)
        self.hidden = hidden
        self.output_dim = hidden

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        normed = {n: self.norm[n](features[n]) for n in self.names}
        h = torch.stack([torch.tanh(self.proj[n](normed[n])) for n in self.names], dim=1)  # (B, M, H)
        z = torch.sigmoid(self.gates(torch.cat([normed[n] for n in self.names], dim=1)))
        z = z.view(-1, len(self.names), self.hidden)
        return self.dropout((z * h).sum(1))
