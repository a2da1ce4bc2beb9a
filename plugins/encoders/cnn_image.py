"""A small convolutional image encoder trained end to end.

Blocks of conv-batchnorm-ReLU-maxpool (the VGG pattern, Simonyan and Zisserman, 2015) followed by
global average pooling. Batch norm on zero-centred inputs is what lets it learn shapes and colours of
easy-VQA within a few epochs on a CPU. Depth and width are one parameter, ``channels``: one block per
entry (each halves the resolution), e.g. ``[16, 32, 64]`` or ``[32, 64, 128, 256]`` for larger images.
For fusions that attend, the last feature map is a sequence of positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mmops.core.interfaces import Encoder, Tokens


class CNNImageEncoder(Encoder):
    modality = "image"

    def __init__(self, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if not channels:
            raise ValueError("cnn_image: 'channels' needs at least one block, e.g. [16, 32, 64]")
        self.channels = [int(c) for c in channels]
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in self.channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
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

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch)

    def forward_sequence(self, batch: torch.Tensor) -> Tokens:
        """The last feature map before pooling, one token per position: ``(B, H*W, channels)``, none padding."""
        return Tokens.full(self.net[:-2](batch).flatten(2).transpose(1, 2))

    def config(self) -> dict[str, Any]:
        return {"channels": self.channels}
