"""Raw inputs to answers, for ``mmops predict`` and the BentoML service alike.

It reuses the training code path: images are decoded by :func:`mmops.data.images.load_image` (as in
the ``prepare`` stage) and every encoder's own ``preprocess`` and ``forward`` run as in training. Frozen
encoder outputs are memoised per distinct value in a bounded LRU, since real traffic repeats questions.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmops.data.images import BadImageError, load_image
from mmops.model import MultimodalModel


class InputError(ValueError):
    """A request the model cannot answer; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Limits:
    """Request limits; each can be overridden by an ``MMOPS_MAX_*`` environment variable."""

    def __init__(self) -> None:
        self.text_chars = int(os.environ.get("MMOPS_MAX_TEXT_CHARS", 1000))
        self.image_bytes = int(os.environ.get("MMOPS_MAX_IMAGE_BYTES", 10 * 1024 * 1024))
        self.batch_size = int(os.environ.get("MMOPS_MAX_BATCH", 64))


class _LRU:
    def __init__(self, size: int) -> None:
        self.size, self.data = size, OrderedDict[str, torch.Tensor]()

    def get_many(self, keys: Sequence[str], compute) -> torch.Tensor:
        missing = list(dict.fromkeys(k for k in keys if k not in self.data))
        if missing:
            for key, row in zip(missing, compute(missing), strict=True):
                self.data[key] = row
        for key in keys:
            self.data.move_to_end(key)
        out = torch.stack([self.data[k] for k in keys])
        while len(self.data) > self.size:
            self.data.popitem(last=False)
        return out


def pick_device(preferred: str | None = None) -> torch.device:
    name = preferred or os.environ.get("MMOPS_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Predictor:
    def __init__(self, model_dir: Path, device: str | None = None, cache_size: int = 4096) -> None:
        self.model = MultimodalModel.load(Path(model_dir))
        self.device = pick_device(device)
        self.model.to(self.device).eval()
        self.spec = self.model.spec
        self.inputs: dict[str, str] = {n: i["modality"] for n, i in self.spec["inputs"].items()}
        self.limits = Limits()
        self._caches = {n: _LRU(cache_size) for n, e in self.model.encoders.items() if e.frozen}

    def _decode(self, name: str, value: Any) -> Any:
        modality = self.inputs[name]
        if modality == "text":
            if not isinstance(value, str) or not value.strip():
                raise InputError(name, "must be a non-empty string")
            if len(value) > self.limits.text_chars:
                raise InputError(name, f"is {len(value)} characters, over the limit of {self.limits.text_chars}")
            return value.strip()
        if modality == "image":
            if isinstance(value, str):  # base64 in JSON requests
                try:
                    value = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise InputError(name, "is not valid base64") from exc
            if isinstance(value, Path):
                if value.stat().st_size > self.limits.image_bytes:
                    raise InputError(name, f"file is over the limit of {self.limits.image_bytes} bytes")
                value = value.read_bytes()
            if not isinstance(value, bytes | np.ndarray):
                raise InputError(name, "must be image bytes, a file or base64")
            if isinstance(value, np.ndarray):
                return value
            if len(value) > self.limits.image_bytes:
                raise InputError(name, f"is {len(value)} bytes, over the limit of {self.limits.image_bytes}")
            try:
                return load_image(value, self.spec["image_size"])
            except BadImageError as exc:
                raise InputError(name, str(exc)) from exc
        raise InputError(name, f"modality '{modality}' is not supported by this service")

    def _check_fields(self, record: Mapping[str, Any]) -> None:
        missing = [n for n in self.inputs if record.get(n) is None]
        if missing:
            raise InputError(missing[0], f"is required; this model takes {sorted(self.inputs)}")
        extra = sorted(set(record) - set(self.inputs))
        if extra:
            raise InputError(extra[0], f"is not an input of this model; it takes {sorted(self.inputs)}")

    @torch.inference_mode()
    def predict(self, records: Sequence[Mapping[str, Any]], top_k: int = 3) -> list[dict[str, Any]]:
        if not records:
            return []
        if len(records) > self.limits.batch_size:
            raise InputError("batch", f"has {len(records)} items, over the limit of {self.limits.batch_size}")
        for record in records:
            self._check_fields(record)
        decoded = {n: [self._decode(n, r[n]) for r in records] for n in self.inputs}
        inputs: dict[str, Any] = {}
        for name, values in decoded.items():
            encoder = self.model.encoders[name]
            if name in self._caches:
                inputs[name] = self._caches[name].get_many(
                    values, lambda vs, e=encoder: e(self._to_device(e.preprocess(vs))).float()
                )
            else:
                inputs[name] = self._to_device(encoder.preprocess(values))
        probs = torch.softmax(self.model(inputs, None, frozenset(self._caches)).float(), dim=1).cpu()
        k = max(1, min(top_k, probs.shape[1]))
        top = probs.topk(k, dim=1)
        labels = self.model.labels
        return [
            {
                "answer": labels[int(idx[0])],
                "top_k": [
                    {"answer": labels[int(i)], "probability": round(float(p), 6)}
                    for p, i in zip(pr, idx, strict=True)
                ],
            }
            for pr, idx in zip(top.values, top.indices, strict=True)
        ]

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, Mapping):
            return {k: v.to(self.device) for k, v in batch.items()}
        return batch
