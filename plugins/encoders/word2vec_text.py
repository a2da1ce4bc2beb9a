"""Word2vec text features: skip-gram embeddings (Mikolov et al., "Distributed Representations of Words
and Phrases and their Compositionality", 2013) trained on the training texts, averaged per text.

``fit`` trains gensim's skip-gram with negative sampling (one worker and a fixed hash, so the same texts
and seed always give the same vectors). The vocabulary is saved in the model spec and the vectors as
a buffer in the safetensors file; they stay fixed during training (the fusion learns on top), which
is the classic way of using word2vec features.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmops_plugins.encoders._text import UNK, texts, token_ids, tokenize, word_index

from mmops.core.interfaces import Encoder, Tokens


def _stable_hash(text: str) -> int:
    """gensim seeds each word's initial vector with ``hash()``, which Python randomises per process."""
    return zlib.crc32(text.encode())


class Word2VecTextEncoder(Encoder):
    modality = "text"

    def __init__(
        self,
        dim: int = 64,
        window: int = 5,
        epochs: int = 50,
        negative: int = 5,
        min_count: int = 1,
        max_length: int = 64,
        seed: int = 0,
        vocabulary: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.window, self.epochs, self.negative = dim, window, epochs, negative
        self.min_count, self.max_length, self.seed = min_count, max_length, seed
        self.output_dim = dim
        self._set_vocabulary(vocabulary)

    def _set_vocabulary(self, vocabulary: list[str] | None) -> None:
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        self.index = word_index(self.vocabulary)
        self.register_buffer("vectors", torch.zeros(len(self.index) + 2, self.dim))

    def fit(self, values: Sequence[Any]) -> Word2VecTextEncoder:
        from gensim.models import Word2Vec

        sentences = [tokenize(t) for t in texts(values, "word2vec_text")]
        model = Word2Vec(
            sentences,
            vector_size=self.dim,
            window=self.window,
            min_count=self.min_count,
            sg=1,
            negative=self.negative,
            epochs=self.epochs,
            seed=self.seed,
            workers=1,
            hashfxn=_stable_hash,
        )
        words = list(model.wv.index_to_key)
        if not words:
            raise ValueError("word2vec_text: no word occurs min_count times in the training texts")
        self._set_vocabulary(words)
        self.vectors[2:] = torch.from_numpy(np.asarray(model.wv.vectors, dtype=np.float32))
        return self

    def preprocess(self, values: Sequence[Any]) -> torch.Tensor:
        if self.vocabulary is None:
            raise ValueError("word2vec_text: not fitted; it trains its vectors on the training texts")
        return token_ids(texts(values, "word2vec_text"), self.index, self.max_length)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        mask = (batch > UNK).unsqueeze(-1).float()  # padding and unknown words carry nothing
        return (self.vectors[batch] * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward_sequence(self, batch: torch.Tensor) -> Tokens:
        """Each word's vector; padding and unknown words masked, as in the mean. A text with no known
        word keeps its first (zero) position, so every row has a token and its mean is the vector's."""
        mask = batch > UNK
        mask[:, 0] |= ~mask.any(1)
        return Tokens(self.vectors[batch], mask)

    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "window": self.window,
            "epochs": self.epochs,
            "negative": self.negative,
            "min_count": self.min_count,
            "max_length": self.max_length,
            "seed": self.seed,
            "vocabulary": self.vocabulary,
        }
