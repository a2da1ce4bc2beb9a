"""The two contracts every plugin implements: :class:`Encoder` and :class:`Fusion`; and :class:`Tokens`.

They are deliberately small (scikit-learn style ``fit``/``preprocess``, TorchMultimodal style
``forward``) so that a third-party package can provide one in a single short file and the training
loop, the feature cache and the service can treat built-ins and add-ons identically.
"""

from __future__ import annotations

import abc
import inspect
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmops.config import MODALITIES  # noqa: F401  (re-exported: plugins import it from here)


@dataclass(frozen=True)
class Tokens:
    """A batch of token sequences of unequal lengths: ``values`` ``(batch, tokens, dim)`` and ``mask``
    ``(batch, tokens)`` bool, True for a real token, False for padding.

    What an encoder's :meth:`Encoder.forward_sequence` returns and what a fusion that attends
    (``needs_sequences``) receives per input: word pieces, image patches, CNN feature-map positions,
    audio frames. Padding carries no meaning: a fusion must give the same output whatever the padded
    positions hold and however many there are (``mmops plugins check`` appends some to make sure). Every
    row has at least one real token, so attention never has nothing to attend to.
    """

    values: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.values.dim() != 3:
            raise ValueError(f"Tokens: values must be (batch, tokens, dim), got {tuple(self.values.shape)}")
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != tuple(self.values.shape[:2]):
            raise ValueError(
                f"Tokens: mask must be bool (batch, tokens) = {tuple(self.values.shape[:2])}, "
                f"got {self.mask.dtype} {tuple(self.mask.shape)}"
            )

    @classmethod
    def full(cls, values: torch.Tensor) -> Tokens:
        """Every position real (a CNN feature map, ViT patches: all images give the same count)."""
        return cls(values, torch.ones(values.shape[:2], dtype=torch.bool, device=values.device))

    @classmethod
    def from_vector(cls, vector: torch.Tensor) -> Tokens:
        """A ``(batch, dim)`` vector as one token: how a sequence-less encoder reaches a fusion that attends."""
        return cls.full(vector.unsqueeze(1))

    @classmethod
    def cat(cls, parts: Sequence[Tokens]) -> Tokens:
        """Batches of different lengths stacked along the batch, padded to the longest."""
        length = max(p.length for p in parts)
        padded = [p.pad_to(length) for p in parts]
        return cls(torch.cat([p.values for p in padded]), torch.cat([p.mask for p in padded]))

    @property
    def batch(self) -> int:
        return self.values.shape[0]

    @property
    def length(self) -> int:
        return self.values.shape[1]

    @property
    def dim(self) -> int:
        return self.values.shape[2]

    @property
    def padding_mask(self) -> torch.Tensor:
        """True where padding: what ``nn.MultiheadAttention``'s ``key_padding_mask`` and
        ``nn.TransformerEncoder``'s ``src_key_padding_mask`` take."""
        return ~self.mask

    def mean(self) -> torch.Tensor:
        """``(batch, dim)``: the mean of the real tokens of each row (padding ignored)."""
        weights = self.mask.unsqueeze(-1).to(self.values.dtype)
        return (self.values * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tokens:
        """``fn`` applied to the values (a projection), same mask."""
        return Tokens(fn(self.values), self.mask)

    def select(self, index: torch.Tensor) -> Tokens:
        """Rows by index (repeats allowed): from distinct values to the rows of a batch."""
        return Tokens(self.values[index], self.mask[index])

    def pad_to(self, length: int) -> Tokens:
        """Append padding positions (zeros, masked out) up to ``length`` tokens."""
        extra = length - self.length
        if extra < 0:
            raise ValueError(f"Tokens: cannot pad {self.length} tokens to {length}")
        if not extra:
            return self
        values = torch.nn.functional.pad(self.values, (0, 0, 0, extra))
        return Tokens(values, torch.nn.functional.pad(self.mask, (0, extra), value=False))

    def split(self) -> list[Tokens]:
        """One ``(1, n, dim)`` Tokens per row, cut after its last real token: what a cache keeps per value."""
        ends = torch.where(self.mask, torch.arange(1, self.length + 1, device=self.mask.device), 0).amax(1)
        return [
            Tokens(self.values[i : i + 1, : max(1, int(n))], self.mask[i : i + 1, : max(1, int(n))])
            for i, n in enumerate(ends.tolist())
        ]

    def to(self, *args: Any, **kwargs: Any) -> Tokens:
        """Values moved or cast like a tensor; the mask is only moved (it stays bool)."""
        values = self.values.to(*args, **kwargs)
        return Tokens(values, self.mask.to(values.device))


def as_tokens(output: Any, who: str) -> Tokens:
    """What ``forward_sequence`` returned, as :class:`Tokens`.

    A plain ``(batch, tokens, dim)`` tensor (encoders written before masks existed) is all real
    tokens; a ``(batch, dim)`` vector is one token.
    """
    if isinstance(output, Tokens):
        return output
    if isinstance(output, torch.Tensor) and output.dim() == 3:
        return Tokens.full(output)
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return Tokens.from_vector(output)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise ValueError(f"{who}: forward_sequence must return Tokens or a (batch, tokens, dim) tensor, got {shape}")


class Encoder(nn.Module, abc.ABC):
    """Turns raw values of one modality into fixed-size vectors.

    ``preprocess`` is the single place raw values become tensors: training (through the
    ``featurize`` stage and the training loop) and the BentoML service both call it, so the two can
    never drift apart. A ``frozen`` encoder's output depends only on its input, which is what allows
    mmops to compute it once per distinct input and cache it.
    """

    modality: ClassVar[str]
    frozen: bool = False
    output_dim: int
    # Values of parameters added after models were saved that give those models their old behaviour:
    # :meth:`MultimodalModel.load` fills a saved spec's missing keys from them (docs/plugins.md).
    saved_before: ClassVar[Mapping[str, Any]] = {}

    def train(self, mode: bool = True) -> Encoder:
        # A frozen encoder never enters training mode (no dropout, fixed batch-norm statistics):
        # its output must not depend on whether a surrounding model is training, or caching it lies.
        # Once it is in eval mode there is nothing to do: skip walking MiniLM's modules every epoch.
        if self.frozen and not self.training:
            return self
        return super().train(mode and not self.frozen)

    def fit(self, values: Sequence[Any]) -> Encoder:
        """Learn what the encoder needs from training values (vocabulary, scaler); most need nothing.

        Training calls it on the distinct training values before the model (and so the fusion, sized
        by ``output_dim``) is built. What was learned must survive a save: learned strings (a
        vocabulary) go into :meth:`config`, learned tensors into buffers or parameters, which travel
        in the model's safetensors file; the constructor rebuilds modules sized by it.
        """
        return self

    @abc.abstractmethod
    def preprocess(self, values: Sequence[Any]) -> Any:
        """Raw values (strings, decoded ``uint8`` HxWx3 images, ...) to the batch ``forward`` takes."""

    @abc.abstractmethod
    def forward(self, batch: Any) -> torch.Tensor:
        """A preprocessed batch to a ``(batch, output_dim)`` tensor."""

    def forward_sequence(self, batch: Any) -> Tokens:
        """A preprocessed batch to :class:`Tokens` ``(batch, tokens, output_dim)`` for fusions that attend.

        Encoders with structure (word pieces, CNN feature maps, ViT patches, spectrogram frames)
        override this, masking what is padding; the default is the pooled vector as a single token, so
        every encoder works with every fusion. Tokens have the same width as the vector, so a fusion is
        sized by ``output_dim`` alone. A frozen encoder's tokens are cached like its vectors. (Returning
        a plain ``(batch, tokens, dim)`` tensor still works: every position counts as real.)
        """
        return Tokens.from_vector(self.forward(batch))

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this encoder (JSON-serialisable)."""

    def export_assets(self, directory: Path) -> dict[str, Any]:
        """Write files the weights alone cannot restore (a tokenizer, a frozen checkpoint).

        Returns the config to rebuild the encoder from ``directory``. The default has no assets:
        trainable weights travel in the model's safetensors file.
        """
        return self.config()


class Fusion(nn.Module, abc.ABC):
    """Combines per-input features into one vector for the head.

    Built from ``{input_name: dim}`` and its own keyword parameters; ``forward`` takes
    ``{input_name: Tensor}`` of shape ``(batch, dim)`` and returns ``(batch, output_dim)``.

    Two class attributes change what the model hands over and expects back:

    * ``needs_sequences``: inputs are :class:`Tokens` from :meth:`Encoder.forward_sequence` (cached
      ones for frozen encoders; one token for an encoder without structure or a missing input), and
      the fusion must ignore padding (``Tokens.mean``, ``key_padding_mask=tokens.padding_mask``);
    * ``produces_logits``: the constructor also gets ``num_classes`` and the output is used as the
      logits directly, with no classification head (late fusion).
    """

    output_dim: int
    needs_sequences: ClassVar[bool] = False
    produces_logits: ClassVar[bool] = False
    # As for encoders: the old-behaviour values of parameters added after models were saved.
    saved_before: ClassVar[Mapping[str, Any]] = {}

    # Arguments mmops supplies itself (input sizes, class count): not part of a fusion's config.
    SUPPLIED: ClassVar[frozenset[str]] = frozenset({"dims", "num_classes"})

    def __new__(cls, *args: Any, **kwargs: Any) -> Fusion:
        self = super().__new__(cls)
        # Kept for config(): a plugin gets a faithful config without repeating its parameters.
        object.__setattr__(self, "_init_args", (args, kwargs))
        return self

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"{type(self).__name__} fuses two or more inputs, got {list(dims)}")
        self.dims = dict(dims)

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments with its defaults applied (no ``dims``/``num_classes``):
        what the saved model records, so that a plugin release changing a default cannot silently
        change an already-registered model. Override it when the arguments are not the whole story.
        """
        args, kwargs = getattr(self, "_init_args", ((), {}))
        signature = inspect.signature(type(self).__init__)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # built some other way (a copy): what is known, and the defaults
            bound = signature.bind_partial(self, **kwargs)
        bound.apply_defaults()
        resolved: dict[str, Any] = {}
        for i, (name, value) in enumerate(bound.arguments.items()):
            kind = signature.parameters[name].kind
            if i == 0 or name in self.SUPPLIED or kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            resolved.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        return {k: v for k, v in resolved.items() if k not in self.SUPPLIED}

    def check_inputs(self, features: Mapping[str, Any]) -> None:
        """Fail with the names involved rather than with a shape error deep inside a matmul."""
        if set(features) != set(self.dims):
            raise ValueError(f"{type(self).__name__} was built for inputs {sorted(self.dims)}, got {sorted(features)}")
        for name, value in features.items():
            if self.needs_sequences:
                if not isinstance(value, Tokens) or value.dim != self.dims[name]:
                    got = f"Tokens of width {value.dim}" if isinstance(value, Tokens) else type(value).__name__
                    raise ValueError(
                        f"{type(self).__name__}: input '{name}' must be Tokens (batch, tokens, "
                        f"{self.dims[name]}), got {got}"
                    )
            elif not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[-1] != self.dims[name]:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{type(self).__name__}: input '{name}' must be (batch, {self.dims[name]}), got {got}")


def link_or_copy_tree(source: Path, destination: Path) -> None:
    """Put a read-only checkpoint folder into an artifact: hard links where the filesystem allows.

    A sweep exports the same frozen checkpoint (MiniLM: 90 MB) into every candidate's artifact;
    links cost nothing, and the files are never modified in place.
    """

    def link(src: str, dst: str) -> None:
        if os.path.lexists(dst):  # a retrained artifact: replace, never write through an old link
            os.unlink(dst)
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, dst)

    shutil.copytree(source, destination, dirs_exist_ok=True, copy_function=link)
