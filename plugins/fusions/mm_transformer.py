"""Single-stream multimodal Transformer, the VisualBERT / ViLT family (Li et al., "VisualBERT: A Simple
and Performant Baseline for Vision and Language", 2019; Kim et al., "ViLT: Vision-and-Language
Transformer Without Convolution or Region Supervision", 2021).

Every input's tokens are projected to one ``width``, tagged with a learned modality-type embedding
and a learned position (counted within each input), and concatenated behind a learned ``[CLS]``
token into one stream; ``layers`` Transformer encoder layers (pre-norm, ``heads`` heads) attend over
it with padding masked (``src_key_padding_mask``), and the ``[CLS]`` state is the fused vector.
Word pieces can thus attend to individual image positions and to each other in every layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmops.core.interfaces import Fusion, Tokens


class MMTransformerFusion(Fusion):
    needs_sequences = True

    def __init__(
        self,
        dims: Mapping[str, int],
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        max_tokens: int = 512,
    ) -> None:
        super().__init__(dims)
        if width % heads:
            raise ValueError(f"mm_transformer: width ({width}) must be divisible by heads ({heads})")
        if layers < 1:
            raise ValueError(f"mm_transformer: layers must be at least 1, got {layers}")
        self.names, self.max_tokens = sorted(dims), max_tokens
        self.proj = nn.ModuleDict({n: nn.Linear(dims[n], width) for n in self.names})
        self.modality = nn.Parameter(torch.randn(len(self.names), width) * 0.02)
        self.position = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # No nested-tensor fast path: it is inference-only and would make eval differ from training code.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.output_dim = width

    def forward(self, features: Mapping[str, Tokens]) -> torch.Tensor:
        self.check_inputs(features)
        streams, masks = [self.cls.expand(features[self.names[0]].batch, -1, -1)], []
        for i, n in enumerate(self.names):
            tokens = features[n]
            if tokens.length > self.max_tokens:
                raise ValueError(
                    f"mm_transformer: input '{n}' has {tokens.length} tokens, more than max_tokens "
                    f"({self.max_tokens}); raise max_tokens"
                )
            streams.append(self.proj[n](tokens.values) + self.modality[i] + self.position[: tokens.length])
            masks.append(tokens.mask)
        stream = torch.cat(streams, dim=1)
        real = torch.cat([torch.ones_like(masks[0][:, :1]), *masks], dim=1)
        return self.norm(self.encoder(stream, src_key_padding_mask=~real)[:, 0])
