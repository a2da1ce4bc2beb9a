"""The two contracts every plugin implements: :class:`Encoder` and :class:`Fusion`.

They are deliberately small (scikit-learn style ``fit``/``preprocess``, TorchMultimodal style
``forward``) so that a third-party package can provide one in a single short file and the training
loop, the feature cache and the service can treat built-ins and add-ons identically.
"""

from __future__ import annotations

import abc
import inspect
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmops.config import MODALITIES  # noqa: F401  (re-exported: plugins import it from here)


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

    def forward_sequence(self, batch: Any) -> torch.Tensor:
        """A preprocessed batch to ``(batch, tokens, output_dim)`` for fusions that attend.

        Encoders with spatial or temporal structure (CNN feature maps, ViT patches, spectrogram
        frames) override this; the default is the pooled vector as a single token, so every encoder
        works with every fusion. Tokens have the same width as the vector, so a fusion is sized by
        ``output_dim`` alone.
        """
        return self.forward(batch).unsqueeze(1)

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
    """Combines per-input feature vectors into one vector for the classification head.

    Built from ``{input_name: dim}`` and its own keyword parameters; ``forward`` takes
    ``{input_name: Tensor}`` of shape ``(batch, dim)`` and returns ``(batch, output_dim)``.

    Two class attributes change what the model hands over and expects back:

    * ``needs_sequences``: inputs are ``(batch, tokens, dim)`` from :meth:`Encoder.forward_sequence`
      (a frozen encoder's cached vector arrives as one token);
    * ``produces_logits``: the constructor also gets ``num_classes`` and the output is used as the
      logits directly, with no classification head (late fusion).
    """

    output_dim: int
    needs_sequences: ClassVar[bool] = False
    produces_logits: ClassVar[bool] = False

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

    def check_inputs(self, features: Mapping[str, torch.Tensor]) -> None:
        """Fail with the names involved rather than with a shape error deep inside a matmul."""
        if set(features) != set(self.dims):
            raise ValueError(
                f"{type(self).__name__} was built for inputs {sorted(self.dims)}, got {sorted(features)}"
            )
        rank, shape = (3, "(batch, tokens, {})") if self.needs_sequences else (2, "(batch, {})")
        for name, tensor in features.items():
            if tensor.dim() != rank or tensor.shape[-1] != self.dims[name]:
                raise ValueError(
                    f"{type(self).__name__}: input '{name}' must be {shape.format(self.dims[name])}, "
                    f"got {tuple(tensor.shape)}"
                )


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
