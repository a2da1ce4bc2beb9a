"""Masked mean of a feature sequence: one standardised vector per value, no trainable weights.

The early-fusion and tensor-fusion baselines of the sentiment literature summarise acoustic and visual
frames by their average over time (TFN's audio and video sub-networks start from it, Zadeh et al.,
2017; MMSA's ``need_normalized`` does the same). ``fit`` learns the frame width and each feature's
train-split mean and deviation; padding never enters the mean. ``forward_sequence`` hands the
standardised frames themselves to fusions that attend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mmops_plugins.encoders._vectors import DEFAULT_MAX_LENGTH, Standardise, check_sequences, learned_dim, pad_batch

from mmops.core.interfaces import Encoder, Tokens


class MeanFeaturesEncoder(Encoder):
    modality = "vectors"

    def __init__(self, dim: int = 0, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__()
        self.dim, self.max_length = int(dim), int(max_length)
        self.standardise = Standardise(max(self.dim, 1))
        self.output_dim = self.dim

    def fit(self, values: Sequence[Any]) -> MeanFeaturesEncoder:
        self.dim = self.output_dim = learned_dim(values, self.dim, "mean_features")
        self.standardise = Standardise(self.dim)
        self.standardise.fit(check_sequences(values, self.dim, 2**31, "mean_features"))
        return self

    def preprocess(self, values: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not self.dim:
            raise ValueError("mean_features: not fitted; it learns the frame width from the training sequences")
        return pad_batch(check_sequences(values, self.dim, self.max_length, "mean_features"))

    def forward_sequence(self, batch: dict[str, torch.Tensor]) -> Tokens:
        mask = batch["mask"]
        return Tokens(self.standardise(batch["values"]).masked_fill(~mask.unsqueeze(-1), 0.0), mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_sequence(batch).mean()

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "max_length": self.max_length}
