"""Feature-sequence encoder: precomputed frames (word vectors, COVAREP, Facet/OpenFace) through a
projection, sinusoidal positions and a small Transformer (or an LSTM), padding masked throughout.

This is the per-modality sub-network of the multimodal-sentiment literature: TFN (Zadeh et al., 2017)
runs an LSTM over the words, MulT (Tsai et al., 2019) projects each modality's frames and adds
positions before its cross-modal attention. ``fit`` learns the frame width (unless ``dim`` is given) and
each feature's mean and deviation on the train split. ``forward_sequence`` gives one token per frame
(``mult`` and ``mm_transformer`` attend over them); ``forward`` is their masked mean, for the fusions
that take one vector per input (``tensor``, ``low_rank_tensor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from mmops_plugins.encoders._vectors import DEFAULT_MAX_LENGTH, Standardise, check_sequences, learned_dim, pad_batch
from mmops_plugins.fusions.mult import sinusoidal
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmops.core.interfaces import Encoder, Tokens


class SeqFeaturesEncoder(Encoder):
    modality = "vectors"

    def __init__(
        self,
        dim: int = 0,
        max_length: int = DEFAULT_MAX_LENGTH,
        width: int = 64,
        layers: int = 1,
        heads: int = 4,
        dropout: float = 0.1,
        architecture: Literal["transformer", "lstm"] = "transformer",
    ) -> None:
        super().__init__()
        if architecture not in ("transformer", "lstm"):
            raise ValueError(f"seq_features: architecture must be transformer or lstm, got {architecture!r}")
        if width % heads and architecture == "transformer":
            raise ValueError(f"seq_features: width {width} must be a multiple of heads {heads}")
        self.dim, self.max_length, self.width, self.layers = int(dim), int(max_length), width, layers
        self.heads, self.dropout, self.architecture = heads, dropout, architecture
        self.output_dim = width
        self._build()

    def _build(self) -> None:
        """Modules sized by ``dim`` (known once fitted, or from the saved config)."""
        dim = max(self.dim, 1)
        self.standardise = Standardise(dim)
        self.project = nn.Linear(dim, self.width)
        self.drop = nn.Dropout(self.dropout)
        if self.architecture == "transformer":
            layer = nn.TransformerEncoderLayer(
                self.width, self.heads, 4 * self.width, self.dropout, batch_first=True, norm_first=True
            )
            self.body: nn.Module = nn.TransformerEncoder(layer, self.layers, enable_nested_tensor=False)
        else:
            self.body = nn.LSTM(self.width, self.width, num_layers=self.layers, batch_first=True)

    def fit(self, values: Sequence[Any]) -> SeqFeaturesEncoder:
        self.dim = learned_dim(values, self.dim, "seq_features")
        self._build()
        self.standardise.fit(check_sequences(values, self.dim, 2**31, "seq_features"))
        return self

    def preprocess(self, values: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not self.dim:
            raise ValueError("seq_features: not fitted; it learns the frame width from the training sequences")
        return pad_batch(check_sequences(values, self.dim, self.max_length, "seq_features"))

    def forward_sequence(self, batch: dict[str, torch.Tensor]) -> Tokens:
        values, mask = batch["values"], batch["mask"]
        x = self.drop(self.project(self.standardise(values)))
        if self.architecture == "transformer":
            x = x + sinusoidal(x.shape[1], self.width, x.device)
            x = self.body(x, src_key_padding_mask=~mask)
        else:
            lengths = mask.sum(1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            x, _ = pad_packed_sequence(self.body(packed)[0], batch_first=True, total_length=values.shape[1])
        return Tokens(x.masked_fill(~mask.unsqueeze(-1), 0.0), mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_sequence(batch).mean()

    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "max_length": self.max_length,
            "width": self.width,
            "layers": self.layers,
            "heads": self.heads,
            "dropout": self.dropout,
            "architecture": self.architecture,
        }
