"""A small convolutional image encoder trained end to end.

Blocks of conv-batchnorm-ReLU-maxpool (the VGG pattern, Simonyan and Zisserman, 2015) followed by
global average pooling. Batch norm on zero-centred inputs is what lets it learn shapes and colours of
easy-VQA within a few epochs on a CPU. Depth and width are one parameter, ``channels``: one block per
entry (each halves the resolution), e.g. ``[16, 32, 64]`` or ``[32, 64, 128, 256]`` for larger images.
For fusions that attend, the last feature map is a sequence of positions.

``augment: true`` draws a small random affine transform per image in training only (shift up to
``shift`` of the side, rotation up to ``rotate`` degrees, scale within ``1 ± scale``, and a horizontal
flip when ``flip`` says mirror images keep their label: not for digits or text). ``model.eval()`` turns it
off, so the service sees the pixels as they are. Off by default: easy-VQA needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmops.core.interfaces import Encoder, Tokens


class CNNImageEncoder(Encoder):
    modality = "image"

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        augment: bool = False,
        shift: float = 0.1,
        rotate: float = 10.0,
        scale: float = 0.1,
        flip: bool = False,
        token_grid: int = 0,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("cnn_image: 'channels' needs at least one block, e.g. [16, 32, 64]")
        if not (0 <= shift < 0.5 and 0 <= rotate <= 180 and 0 <= scale < 1):
            raise ValueError(
                f"cnn_image: shift must be in [0, 0.5), rotate in [0, 180] degrees, scale in [0, 1); "
                f"got shift {shift}, rotate {rotate}, scale {scale}"
            )
        if token_grid < 0:
            raise ValueError(f"cnn_image: token_grid must be 0 (every position) or a grid size, got {token_grid}")
        self.augment, self.shift, self.rotate, self.scale, self.flip = bool(augment), shift, rotate, scale, bool(flip)
        self.token_grid = int(token_grid)
        self.channels = [int(c) for c in channels]
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in self.channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.output_dim = c_in

    def preprocess(self, values: Sequence[Any] | np.ndarray) -> torch.Tensor:
        """Decoded ``uint8`` HxWx3 images (a list or one stacked array) to centred NCHW floats."""
        array = np.ascontiguousarray(np.stack(values) if not isinstance(values, np.ndarray) else values)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"cnn_image expects uint8 images of shape (H, W, 3), got batch {array.shape}")
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2).float()
        return tensor.div_(127.5).sub_(1.0)

    def _augmented(self, batch: torch.Tensor) -> torch.Tensor:
        """A random affine transform per image, in training only (``augment``); edges repeat outward."""
        if not (self.training and self.augment):
            return batch
        b = batch.shape[0]
        angle = (torch.rand(b) * 2 - 1) * self.rotate * torch.pi / 180
        zoom = 1 + (torch.rand(b) * 2 - 1) * self.scale
        mirror = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if self.flip else torch.ones(b)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        move = (torch.rand(b, 2) * 2 - 1) * 2 * self.shift  # grid coordinates span 2 per side
        theta = torch.stack(
            [torch.stack([cos * mirror, -sin, move[:, 0]], 1), torch.stack([sin * mirror, cos, move[:, 1]], 1)], 1
        ).to(batch)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        return F.grid_sample(batch, grid, padding_mode="border", align_corners=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(self._augmented(batch))

    def forward_sequence(self, batch: torch.Tensor) -> Tokens:
        """The last feature map before pooling, one token per position: ``(B, H*W, channels)``, none padding.

        ``token_grid: N`` averages the map down to N×N positions first: an attending fusion's cost grows
        with the square of its tokens, and a 64 px image's 8×8 map is 64 of them for each question.
        """
        grid = self.net[:-2](self._augmented(batch))
        if self.token_grid and grid.shape[-1] > self.token_grid:
            grid = nn.functional.adaptive_avg_pool2d(grid, self.token_grid)
        return Tokens.full(grid.flatten(2).transpose(1, 2))

    def config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "augment": self.augment,
            "shift": self.shift,
            "rotate": self.rotate,
            "scale": self.scale,
            "flip": self.flip,
            "token_grid": self.token_grid,
        }
