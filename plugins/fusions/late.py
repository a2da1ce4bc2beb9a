"""Late fusion: one classifier per modality, their logits averaged with learned weights.

Decision-level fusion (Baltrušaitis et al., "Multimodal Machine Learning: A Survey and Taxonomy",
2018, section 4; Snoek et al., "Early versus Late Fusion in Semantic Video Analysis", 2005). Each
modality must predict the answer on its own, so it cannot model interactions (a question about an
image's colour needs both): a useful lower bound and a robust choice when a modality may be missing.

``produces_logits``: the model gives it ``num_classes`` and uses its output as the logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion


class LateFusion(Fusion):
    produces_logits = True

    def __init__(self, dims: Mapping[str, int], num_classes: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(dims)
        self.names = sorted(dims)
        self.heads = nn.ModuleDict(
            {
                n: nn.Sequential(
                    nn.Linear(dims[n], hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
                )
                for n in self.names
            }
        )
        self.scores = nn.Parameter(torch.zeros(len(self.names)))
        self.output_dim = num_classes

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(features)
        logits = torch.stack([self.heads[n](features[n]) for n in self.names], dim=1)  # (B, M, C)
        return (torch.softmax(self.scores, 0)[None, :, None] * logits).sum(1)
