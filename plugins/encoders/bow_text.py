"""Bag-of-words text features: scikit-learn's ``CountVectorizer`` with optional TF-IDF weighting.

The classic text representation (Salton and Buckley, "Term-weighting approaches in automatic text
retrieval", 1988) used by the easy-VQA baseline. ``fit`` learns the vocabulary and the inverse
document frequencies from the training texts; the vocabulary is saved in the model spec and the IDF
weights as a buffer in the safetensors file, so the service reproduces training exactly. It has no
trainable parameters: the fusion learns on top of it (``early_concat`` for the classic pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmops_plugins.encoders._text import texts
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

from mmops.core.interfaces import Encoder

WEIGHTINGS = ("tfidf", "count", "binary")


class BagOfWordsTextEncoder(Encoder):
    modality = "text"

    def __init__(
        self,
        weighting: str = "tfidf",
        stop_words: str | None = None,
        max_features: int | None = 5000,
        ngrams: int = 1,
        vocabulary: list[str] | None = None,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"bow_text: weighting must be one of {WEIGHTINGS}, got '{weighting}'")
        if stop_words not in (None, "english"):
            raise ValueError(f"bow_text: stop_words must be 'english' or null, got '{stop_words}'")
        self.weighting, self.stop_words, self.max_features, self.ngrams = weighting, stop_words, max_features, ngrams
        self._set_vocabulary(vocabulary)

    def _vectorizer(self, vocabulary: list[str] | None = None) -> CountVectorizer:
        return CountVectorizer(
            stop_words=self.stop_words,
            max_features=self.max_features,
            ngram_range=(1, self.ngrams),
            binary=self.weighting == "binary",
            vocabulary=vocabulary,
        )

    def _set_vocabulary(self, vocabulary: list[str] | None) -> None:
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        self.output_dim = len(self.vocabulary) if self.vocabulary else 0
        self.vectorizer = self._vectorizer(self.vocabulary) if self.vocabulary else None
        self.register_buffer("idf", torch.ones(self.output_dim))

    def fit(self, values: Sequence[Any]) -> BagOfWordsTextEncoder:
        vectorizer = self._vectorizer()
        try:
            counts = vectorizer.fit_transform(texts(values, "bow_text"))
        except ValueError as exc:  # sklearn: "empty vocabulary; perhaps the documents only contain stop words"
            raise ValueError(f"bow_text: cannot learn a vocabulary: {exc}") from exc
        self._set_vocabulary(vectorizer.get_feature_names_out().tolist())
        if self.weighting == "tfidf":
            self.idf = torch.from_numpy(TfidfTransformer().fit(counts).idf_.astype(np.float32))
        return self

    def preprocess(self, values: Sequence[Any]) -> torch.Tensor:
        if self.vectorizer is None:
            raise ValueError("bow_text: not fitted; it learns its vocabulary from the training texts")
        counts = self.vectorizer.transform(texts(values, "bow_text"))
        return torch.from_numpy(counts.toarray().astype(np.float32))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.weighting != "tfidf":
            return batch
        weighted = batch * self.idf
        return weighted / weighted.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def config(self) -> dict[str, Any]:
        return {
            "weighting": self.weighting,
            "stop_words": self.stop_words,
            "max_features": self.max_features,
            "ngrams": self.ngrams,
            "vocabulary": self.vocabulary,
        }
