"""Where training and featurize run, and in which precision.

One place decides, so the ``featurize`` stage, the training loop and the data-parallel launcher agree,
and a wrong request fails before any data is read with a message that says what this machine has.

Device: ``MMOPS_DEVICE`` (the machine's say, set where the job runs) over ``train.device`` (the
project's say), over ``auto``: CUDA when torch sees a GPU, else the CPU. MPS is used only when asked
for: its kernels lack some operations the plugins use.

Precision: ``fp32`` (the default, and what every figure in README was trained with), ``bf16``
(autocast on CUDA and on the CPU, no gradient scaling needed: bfloat16 has float32's exponent range)
and ``fp16`` (CUDA only, with a gradient scaler; the CPU has no fast float16 kernels).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

DEVICE_ENV = "MMOPS_DEVICE"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision this machine cannot give; the message names the setting and the fix."""


def resolve_device(configured: str | None = "auto", env: str | None = None) -> torch.device:
    """The device to train on: ``MMOPS_DEVICE``, else ``configured`` (``train.device``), else ``auto``.

    Raises :class:`DeviceError` for a device this machine lacks, rather than falling back silently:
    a job asked to run on a GPU that finds none would otherwise run ten times slower unnoticed.
    """
    env = os.environ.get(DEVICE_ENV) if env is None else env
    source, name = (DEVICE_ENV, env) if env else ("train.device", configured or "auto")
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{source}={name!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                f"a CPU-only build of torch {torch.__version__}"
                if torch.version.cuda is None
                else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
            )
            raise DeviceError(
                f"{source}={name!r}: CUDA is not available here ({build}); "
                f"set {source} to auto or cpu, or run on a machine with a GPU"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{source}={name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{source}={name!r}: MPS (Apple GPU) is not available here; set {source} to auto or cpu")
        return device
    raise DeviceError(f"{source}={name!r}: mmops trains on cpu, cuda, cuda:N or mps")


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: the autocast dtype (None: float32) and whether fp16's scaler is on."""

    name: str
    device: torch.device
    dtype: torch.dtype | None
    scaled: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's context: autocast in ``dtype``, or nothing at all for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16's gradient scaler (small gradients would underflow to 0 in float16); None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.scaled else None


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``train.precision`` on ``device``; :class:`DeviceError` where the pair does not exist."""
    if name not in PRECISIONS:
        raise DeviceError(f"train.precision={name!r}: use fp32, bf16 or fp16")
    if name == "fp32":
        return Precision(name, device, None, False)
    if device.type == "mps":
        raise DeviceError(f"train.precision={name!r}: mixed precision is not supported on mps here; use fp32")
    if name == "fp16" and device.type != "cuda":
        raise DeviceError(
            f"train.precision='fp16' needs a CUDA device (training on {device}); use bf16 on the CPU, or fp32"
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"train.precision='bf16': {torch.cuda.get_device_name(device)} has no bfloat16; use fp16")
    return Precision(name, device, PRECISIONS[name], name == "fp16")


def to_device(value, device: torch.device):
    """A batch's tensors (plain, :class:`~mmops.core.interfaces.Tokens`, or a tokenizer's mapping) on
    ``device``; anything else (strings) unchanged. On CUDA the host copy is pinned and the transfer
    does not block, so the next batch is prepared while this one computes."""
    if device.type == "cpu":
        return value
    if isinstance(value, torch.Tensor):
        if device.type == "cuda" and value.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    if hasattr(value, "mask") and hasattr(value, "values"):  # Tokens
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if hasattr(value, "items") and hasattr(value, "to"):  # a transformers BatchEncoding
        return value.to(device)
    return value


def describe(device: torch.device) -> str:
    """The device as the registry records it: ``cuda:0 (NVIDIA H200)``, ``cpu``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)
