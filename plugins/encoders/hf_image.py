"""Image encoder over any transformers vision checkpoint in a local folder: ViT, DeiT, BEiT, or the
vision tower of CLIP / SigLIP (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021; Radford et
al., "Learning Transferable Visual Models From Natural Language Supervision", 2021).

Images are resized to the checkpoint's ``image_size`` and normalised with its processor's mean and
std (0.5 when it ships none), in torch, so training and the service share one path. The image vector
is the mean of the output tokens or the class token; for fusions that attend, the tokens themselves.
Frozen by default, which makes its features cacheable. Nothing is downloaded: pass a folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mmops.core.interfaces import Encoder, Tokens, link_or_copy_tree


class HFImageEncoder(Encoder):
    modality = "image"

    def __init__(
        self,
        checkpoint: str,
        pooling: str = "mean",
        frozen: bool = True,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"hf_image: pooling must be 'mean' or 'cls', got '{pooling}'")
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.checkpoint, self.pooling, self.frozen = checkpoint, pooling, frozen
        try:
            # CLIP, SigLIP: load only the vision tower (their config nests it as vision_config).
            vision = getattr(AutoConfig.from_pretrained(checkpoint), "vision_config", None)
            self.model = AutoModel.from_pretrained(checkpoint, **({"config": vision} if vision else {}))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"hf_image: cannot load checkpoint '{checkpoint}': {exc}. Give a local folder with "
                "config.json and weights (e.g. written by save_pretrained)."
            ) from exc
        config = self.model.config
        self.image_size = int(config.image_size)
        self.output_dim = int(config.hidden_size)
        if mean is None or std is None:
            try:
                processor = AutoImageProcessor.from_pretrained(checkpoint)
                mean, std = list(processor.image_mean), list(processor.image_std)
            except (OSError, ValueError, AttributeError):
                mean, std = [0.5] * 3, [0.5] * 3
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()
        else:
            self._freeze_unused()

    def _freeze_unused(self) -> None:
        """Freeze what the tokens do not depend on (ViT's pooler, CLIP's post-layernorm): it would get
        no gradient, and weight decay alone would still move it."""
        self.model.zero_grad()
        self.model.eval()
        with torch.enable_grad():
            self._tokens(torch.zeros(1, 3, self.image_size, self.image_size)).sum().backward()
        for param in self.model.parameters():
            if param.grad is None:
                param.requires_grad_(False)
        self.model.zero_grad(set_to_none=True)
        self.model.train()

    def train(self, mode: bool = True) -> HFImageEncoder:
        super().train(mode)
        if self.frozen:  # a frozen encoder never enters training mode: no dropout, stable cache
            self.model.eval()
        return self

    def preprocess(self, values: Sequence[Any] | np.ndarray) -> torch.Tensor:
        array = np.stack(values) if not isinstance(values, np.ndarray) else values
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"hf_image expects uint8 images of shape (H, W, 3), got batch {array.shape}")
        images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div_(255.0)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def _tokens(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model(pixel_values=batch).last_hidden_state

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        tokens = self._tokens(batch)
        return tokens[:, 0] if self.pooling == "cls" else tokens.mean(1)

    def forward_sequence(self, batch: torch.Tensor) -> Tokens:
        """Every patch token (and the class token): all images have the same count, none is padding."""
        return Tokens.full(self._tokens(batch))

    def config(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "pooling": self.pooling,
            "frozen": self.frozen,
            "mean": self.mean,
            "std": self.std,
        }

    def export_assets(self, directory: Path) -> dict[str, Any]:
        directory.mkdir(parents=True, exist_ok=True)
        source = Path(self.checkpoint)
        if source.is_dir() and self.frozen:
            link_or_copy_tree(source, directory)
        else:  # fine-tuned weights: write what we hold now
            self.model.save_pretrained(directory)
        return {**self.config(), "checkpoint": str(directory)}
