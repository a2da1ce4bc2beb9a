"""Recurrent text encoder: trainable word embeddings and a GRU (Cho et al., "Learning Phrase
Representations using RNN Encoder-Decoder for Statistical Machine Translation", 2014).

``fit`` learns the vocabulary from the training texts (saved in the model spec); embeddings and GRU
are trained end to end with the rest of the model. The text vector is the last hidden state of each
direction, read at each text's true length (padding is packed away, not encoded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mmops_plugins.encoders._text import PAD, build_vocabulary, texts, token_ids, word_index
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmops.core.interfaces import Encoder, Tokens


class GRUTextEncoder(Encoder):
    modality = "text"

    def __init__(
        self,
        embedding_dim: int = 64,
        hidden: int = 128,
        bidirectional: bool = True,
        min_count: int = 1,
        max_vocabulary: int | None = 20000,
        max_length: int = 64,
        vocabulary: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim, self.hidden, self.bidirectional = embedding_dim, hidden, bidirectional
        self.min_count, self.max_vocabulary, self.max_length = min_count, max_vocabulary, max_length
        self.gru = nn.GRU(embedding_dim, hidden, batch_first=True, bidirectional=bidirectional)
        self.output_dim = hidden * (2 if bidirectional else 1)
        self._set_vocabulary(vocabulary)

    def _set_vocabulary(self, vocabulary: list[str] | None) -> None:
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        self.index = word_index(self.vocabulary)
        self.embedding = nn.Embedding(len(self.index) + 2, self.embedding_dim, padding_idx=PAD)

    def fit(self, values: Sequence[Any]) -> GRUTextEncoder:
        vocabulary = build_vocabulary(texts(values, "gru_text"), self.min_count, self.max_vocabulary)
        if not vocabulary:
            raise ValueError("gru_text: no word occurs min_count times in the training texts")
        self._set_vocabulary(vocabulary)
        return self

    def preprocess(self, values: Sequence[Any]) -> torch.Tensor:
        if self.vocabulary is None:
            raise ValueError("gru_text: not fitted; it learns its vocabulary from the training texts")
        return token_ids(texts(values, "gru_text"), self.index, self.max_length)

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = (batch != PAD).sum(1).clamp(min=1).cpu()  # an empty text is one padding word
        packed = pack_padded_sequence(self.embedding(batch), lengths, batch_first=True, enforce_sorted=False)
        states, last = self.gru(packed)  # last: (directions, B, hidden)
        return states, last, lengths

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self._run(batch)[1].transpose(0, 1).flatten(1)

    def forward_sequence(self, batch: torch.Tensor) -> Tokens:
        """The GRU's state at every word (both directions concatenated); positions past a text's end masked."""
        states, _, lengths = self._run(batch)
        values, _ = pad_packed_sequence(states, batch_first=True, total_length=batch.shape[1])
        mask = torch.arange(batch.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return Tokens(values, mask.to(values.device))

    def config(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "hidden": self.hidden,
            "bidirectional": self.bidirectional,
            "min_count": self.min_count,
            "max_vocabulary": self.max_vocabulary,
            "max_length": self.max_length,
            "vocabulary": self.vocabulary,
        }
