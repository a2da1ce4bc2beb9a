"""Raw inputs to answers, for ``mmops predict`` and the BentoML service alike.

It reuses the training code path: images are decoded by :func:`mmops.data.images.load_image` (as in
the ``prepare`` stage) and every encoder's own ``preprocess`` and ``forward`` run as in training. Frozen
encoder outputs are memoised per distinct value in a bounded LRU, since real traffic repeats questions.

Validation (:meth:`Predictor.validate`) and the forward pass (:meth:`Predictor.forward`) are separate so
that the service can check each request on its own and still run many requests in one batch: a bad
item must fail its own request, never the others batched with it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmops.config import VECTORS_MAX_LENGTH
from mmops.core.interfaces import Tokens, as_tokens
from mmops.core.model import load_model
from mmops.data.audio import BadAudioError, load_audio
from mmops.data.cache import content_hash
from mmops.data.images import MAX_PIXELS, BadImageError, load_image


class InputError(ValueError):
    """A request the model cannot answer; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: must be an integer") from None
    if parsed < 1:
        raise ValueError(f"{name}={value!r}: must be at least 1")
    return parsed


# Limits that follow the model (each overridden by its ``MMOPS_MAX_*`` variable). A model resizes every
# image to ``image_size``; accepting far larger ones only costs memory and decode time. An image may be
# up to ``PIXEL_SCALE`` times the model's side in each direction (a photo for a 32-px model: 1024x1024).
PIXEL_SCALE = 32
MAX_DEFAULT_PIXELS = 16_000_000
MIN_DEFAULT_PIXELS = 1_000_000
# A clip may be this many times the model's length (it is cut to audio_seconds), at 48 kHz stereo float32.
AUDIO_SLACK = 4
# Decoded rows of one batch are held together in both service processes: their total is capped.
BATCH_DECODED_BYTES = 64 * 1024 * 1024
MAX_DEFAULT_BATCH = 64
MAX_DEFAULT_REQUEST = 64 * 1024 * 1024
MIB = 1024 * 1024


class Limits:
    """Request limits, derived from the model's spec where one is given.

    Without a spec the limits are generic (16 Mpx images, 64 rows); with one, image pixels follow
    ``image_size`` (``PIXEL_SCALE`` times its side), image bytes follow pixels (4 bytes a pixel is
    above any lossless RGB(A) 8-bit encoding), audio bytes follow ``audio_seconds``, the batch limit
    keeps one batch's decoded rows under ``BATCH_DECODED_BYTES``, and the request limit is a full batch
    of maximum-size items (base64 in JSON), capped at 64 MiB. An environment variable always wins.
    """

    def __init__(self, spec: Mapping[str, Any] | None = None) -> None:
        spec = spec or {}
        kinds = [i.get("kind") or i.get("modality") for i in (spec.get("inputs") or {}).values()]
        image_size = spec.get("image_size") if "image" in kinds else None
        pixels = (
            min(MAX_DEFAULT_PIXELS, max(MIN_DEFAULT_PIXELS, (PIXEL_SCALE * image_size) ** 2))
            if image_size
            else MAX_DEFAULT_PIXELS
        )
        self.text_chars = _env_int("MMOPS_MAX_TEXT_CHARS", 1000)
        # Pillow refuses more than MAX_PIXELS in every code path (see mmops.data.images).
        self.image_pixels = min(_env_int("MMOPS_MAX_IMAGE_PIXELS", pixels), MAX_PIXELS)
        self.image_bytes = _env_int("MMOPS_MAX_IMAGE_BYTES", min(10 * MIB, 4 * self.image_pixels + 64 * 1024))
        seconds = float(spec.get("audio_seconds") or 0) if "audio" in kinds else 0
        audio = int(AUDIO_SLACK * seconds * 48_000 * 2 * 4) if seconds else 20 * MIB
        self.audio_bytes = _env_int("MMOPS_MAX_AUDIO_BYTES", min(20 * MIB, max(MIB, audio)))
        # Feature sequences: a .npy upload of max_length float64 frames; in JSON about 25 characters a number.
        numbers = sum(d * n for d, n in vector_shapes(spec).values())
        self.vector_bytes = _env_int("MMOPS_MAX_VECTOR_BYTES", 8 * numbers + 4096 if numbers else 20 * MIB)
        row = _decoded_row_bytes(spec, kinds) + 4 * numbers
        self.batch_size = _env_int("MMOPS_MAX_BATCH", max(1, min(MAX_DEFAULT_BATCH, BATCH_DECODED_BYTES // row)))
        item = (
            4 * self.text_chars * max(1, len(kinds))
            + (
                sum(self.image_bytes if k == "image" else self.audio_bytes if k == "audio" else 0 for k in kinds)
                if kinds
                else self.image_bytes
            )
            * 4
            // 3
            + 25 * numbers
        )
        # Whole request body (checked on Content-Length before it is read): a full batch of items.
        self.request_bytes = _env_int(
            "MMOPS_MAX_REQUEST_BYTES", min(MAX_DEFAULT_REQUEST, self.batch_size * item + 64 * 1024)
        )

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def vector_shapes(spec: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Each feature-sequence request field's (frame width, most frames), from the saved encoder config."""
    out = {}
    for name, item in (spec.get("inputs") or {}).items():
        if (item.get("kind") or item.get("modality")) == "vectors":
            params = item.get("params") or {}
            for column in item.get("columns") or [name]:
                out[column] = (int(params.get("dim") or 0), int(params.get("max_length") or VECTORS_MAX_LENGTH))
    return out


def _decoded_row_bytes(spec: Mapping[str, Any], kinds: list[str | None]) -> int:
    """Bytes of one decoded row: the arrays the front pickles to the model process."""
    size = int(spec.get("image_size") or 0)
    samples = round(float(spec.get("sample_rate") or 16000) * float(spec.get("audio_seconds") or 1.0))
    total = sum(size * size * 3 if k == "image" else 4 * samples if k == "audio" else 64 for k in kinds)
    return max(1, total)


class _LRU:
    """Frozen-encoder features by input content; bounded so a stream of distinct inputs cannot grow it.

    Keyed by the same content hash as the training-time feature cache, so decoded images (arrays,
    unhashable) are memoised exactly like strings.
    """

    def __init__(self, size: int) -> None:
        self.size, self.data = size, OrderedDict[str, torch.Tensor]()

    def get_many(self, values: Sequence[Any], compute: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
        keys = [content_hash(v) for v in values]
        first = {k: v for k, v in reversed(list(zip(keys, values, strict=True)))}
        missing = [k for k in dict.fromkeys(keys) if k not in self.data]
        if missing:
            computed = compute([first[k] for k in missing])
            rows = computed.split() if isinstance(computed, Tokens) else computed  # token sequences: one per value
            for key, row in zip(missing, rows, strict=True):
                self.data[key] = row
        for key in keys:
            self.data.move_to_end(key)
        picked = [self.data[k] for k in keys]
        out = Tokens.cat(picked) if isinstance(picked[0], Tokens) else torch.stack(picked)
        while len(self.data) > self.size:
            self.data.popitem(last=False)
        return out


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred``, else ``MMOPS_DEVICE``, else CUDA when there is one."""
    name = preferred or os.environ.get("MMOPS_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pick_autocast(device: torch.device, preferred: str | None = None) -> torch.dtype | None:
    """Mixed precision on CUDA only, off by default (``MMOPS_AUTOCAST=fp16|bf16``).

    Off by default because answers then match training and ``mmops predict`` bit for bit; on a GPU
    fp16 roughly halves the forward time of larger encoders. CPU autocast is refused: it is slower
    than float32 for these convolutions on most CPUs.
    """
    name = (preferred or os.environ.get("MMOPS_AUTOCAST") or "off").lower()
    if name in ("off", "none", "fp32", ""):
        return None
    if name not in _AUTOCAST:
        raise ValueError(f"MMOPS_AUTOCAST={name!r}: use off, fp16 or bf16")
    return _AUTOCAST[name] if device.type == "cuda" else None


class RowDecoder:
    """Checks one request row against a model's inputs and the limits, and decodes it.

    It needs only the model's spec, not its weights, so the service's HTTP front validates and decodes
    requests while the model process runs batches. A request names the manifest's columns (a tabular
    input may read several); a decoded row is keyed by model input, None where an input that may be
    missing (``missing: learn``) was not given.
    """

    def __init__(self, spec: Mapping[str, Any], limits: Limits | None = None) -> None:
        self.spec = spec
        items = spec["inputs"]
        self.kinds: dict[str, str] = {n: i.get("kind") or i["modality"] for n, i in items.items()}
        self.columns: dict[str, list[str]] = {n: i.get("columns") or [n] for n, i in items.items()}
        self.optional = frozenset(n for n, i in items.items() if i.get("missing") == "learn")
        # What a request sends: field -> its kind (text, image, audio, number, category).
        self.inputs: dict[str, str] = {c: self.kinds[n] for n in items for c in self.columns[n]}
        self.vectors = vector_shapes(spec)
        self.limits = limits or Limits(spec)

    def _decode(self, name: str, value: Any) -> Any:
        kind = self.inputs[name]
        if kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise InputError(name, "must be a non-empty string")
            if len(value) > self.limits.text_chars:
                raise InputError(name, f"is {len(value)} characters, over the limit of {self.limits.text_chars}")
            return value.strip()
        if kind == "image":
            return self._decode_image(name, value)
        if kind == "audio":
            return self._decode_audio(name, value)
        if kind == "number":
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise InputError(name, "must be a number")
            try:
                number = float(value)
            except ValueError:
                raise InputError(name, f"must be a number, got {str(value)[:40]!r}") from None
            if not np.isfinite(number):
                raise InputError(name, "must be a finite number")
            return number
        if kind == "vectors":
            return self._decode_vectors(name, value)
        if kind == "category":
            if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
                raise InputError(name, "must be a non-empty string (a category)")
            if len(str(value)) > self.limits.text_chars:
                raise InputError(name, f"is over the limit of {self.limits.text_chars} characters")
            return str(value).strip()
        raise InputError(name, f"kind '{kind}' is not supported by this service")

    def _file_bytes(self, name: str, value: Any, limit: int, what: str, env: str) -> bytes:
        if isinstance(value, str):  # base64 in JSON requests
            if len(value) > limit * 4 // 3 + 4:  # refuse before decoding what cannot fit
                raise InputError(name, f"is over the limit of {limit} bytes ({env})")
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InputError(name, "is not valid base64") from exc
        if hasattr(value, "read") and hasattr(value, "seek"):  # an uploaded part, spooled to disk when large
            size = value.seek(0, io.SEEK_END)
            if size > limit:
                raise InputError(name, f"is {size} bytes, over the limit of {limit} ({env})")
            value.seek(0)
            value = value.read()
        if isinstance(value, Path):
            if value.stat().st_size > limit:
                raise InputError(name, f"is {value.stat().st_size} bytes, over the limit of {limit} ({env})")
            value = value.read_bytes()
        if not isinstance(value, bytes):
            raise InputError(name, f"must be {what} bytes, a file or base64")
        if not value:
            raise InputError(name, "is empty")
        if len(value) > limit:
            raise InputError(name, f"is {len(value)} bytes, over the limit of {limit} ({env})")
        return value

    def _decode_vectors(self, name: str, value: Any) -> np.ndarray:
        """A feature sequence: a JSON list of frames (lists of numbers), that list as JSON text (a form
        field), or a ``.npy`` file (an uploaded part, bytes, base64); checked as the encoder will."""
        dim, max_length = self.vectors[name]
        if isinstance(value, str) and value.lstrip().startswith("["):
            if len(value) > 25 * dim * max_length + 1024:
                raise InputError(name, f"is over the limit of {max_length} frames of {dim} numbers")
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InputError(name, f"is not valid JSON: {exc}") from None
        if isinstance(value, list):
            if len(value) > max_length:
                raise InputError(name, f"has {len(value)} frames, over this model's max_length {max_length}")
            if not all(
                isinstance(f, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in f)
                for f in value
            ):
                raise InputError(name, f"must be a list of frames, each a list of {dim} numbers")
            if len({len(f) for f in value}) > 1:
                raise InputError(name, f"frames of unequal widths {sorted({len(f) for f in value})}; each has {dim}")
            array = np.array(value, dtype=np.float64).reshape(len(value), -1 if value and value[0] else 0)
        elif isinstance(value, np.ndarray):
            array = value
        else:
            data = self._file_bytes(name, value, self.limits.vector_bytes, ".npy", "MMOPS_MAX_VECTOR_BYTES")
            try:
                array = np.load(io.BytesIO(data), allow_pickle=False)
            except Exception as exc:  # untrusted bytes: a pickled object array is refused here too
                raise InputError(name, f"cannot be read as a .npy array ({type(exc).__name__}: {exc})") from exc
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
            raise InputError(name, "must hold numbers (a float array)")
        if array.ndim != 2:
            raise InputError(name, f"has shape {array.shape}; a feature sequence is (frames, {dim})")
        if array.shape[0] == 0:
            raise InputError(name, "is an empty sequence (0 frames); send at least one frame")
        if dim and array.shape[1] != dim:
            raise InputError(name, f"has frames of {array.shape[1]} features; this model takes {dim}")
        if array.shape[0] > max_length:
            raise InputError(name, f"has {array.shape[0]} frames, over this model's max_length {max_length}")
        if not np.isfinite(array).all():
            where = np.argwhere(~np.isfinite(array))[0]
            raise InputError(name, f"holds NaN or infinity (frame {where[0]}, feature {where[1]})")
        return array.astype(np.float32)

    def _decode_audio(self, name: str, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        data = self._file_bytes(name, value, self.limits.audio_bytes, "WAV", "MMOPS_MAX_AUDIO_BYTES")
        try:
            return load_audio(data, self.spec.get("sample_rate", 16000), self.spec.get("audio_seconds", 1.0))
        except BadAudioError as exc:
            raise InputError(name, str(exc)) from exc
        except Exception as exc:  # untrusted bytes: any decoder failure is the input's fault
            raise InputError(name, f"cannot be decoded as WAV audio ({type(exc).__name__}: {exc})") from exc

    def _decode_image(self, name: str, value: Any) -> np.ndarray:
        limit = self.limits.image_bytes
        if isinstance(value, np.ndarray):
            return value
        value = self._file_bytes(name, value, limit, "image", "MMOPS_MAX_IMAGE_BYTES")
        try:
            return load_image(value, self.spec["image_size"], max_pixels=self.limits.image_pixels)
        except BadImageError as exc:
            pixels = " (MMOPS_MAX_IMAGE_PIXELS)" if f"limit of {self.limits.image_pixels} pixels" in str(exc) else ""
            raise InputError(name, f"{exc}{pixels}") from exc
        except Exception as exc:  # untrusted bytes: any decoder failure is the input's fault, not ours
            raise InputError(name, f"cannot be decoded as an image ({type(exc).__name__}: {exc})") from exc

    def validate(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """One request's fields, checked against the model's inputs and the limits, then decoded
        into one value per model input (a tabular input's columns become one row)."""
        if not isinstance(record, Mapping):
            raise InputError("item", f"must be an object with the fields {sorted(self.inputs)}")
        extra = sorted(set(record) - set(self.inputs))
        if extra:
            raise InputError(extra[0], f"is not an input of this model; it takes {sorted(self.inputs)}")
        out: dict[str, Any] = {}
        for name, columns in self.columns.items():
            given = [c for c in columns if not _absent(record.get(c))]
            if not given and name in self.optional:
                out[name] = None  # the model's learned "missing" embedding stands in
                continue
            absent = [c for c in columns if c not in given]
            if absent and self.kinds[name] != "number":  # a number column may be absent: imputed as in training
                raise InputError(
                    absent[0],
                    f"is required; this model takes {sorted(self.inputs)}"
                    + (f" ({name} may be left out)" if name in self.optional else ""),
                )
            if not given:
                raise InputError(columns[0], f"is required; this model takes {sorted(self.inputs)}")
            values = [self._decode(c, record[c]) if c in given else float("nan") for c in columns]
            out[name] = values if self.kinds[name] in ("number", "category") else values[0]
        return out


def _absent(value: Any) -> bool:
    """None or an empty string (not ``value in (None, "")``, which compares an array element-wise)."""
    return value is None or (isinstance(value, str) and value == "")


class Predictor:
    """A model artifact loaded for inference: :class:`RowDecoder` checks, :meth:`forward` answers."""

    def __init__(
        self,
        model_dir: Path,
        device: str | None = None,
        cache_size: int | None = None,
        autocast: str | None = None,
    ) -> None:
        self.model = load_model(Path(model_dir))  # a MultimodalModel, or an Ensemble of them
        self.device = pick_device(device)
        self.model.to(self.device).eval()
        self.autocast = pick_autocast(self.device, autocast)
        self.spec = self.model.spec
        # `mmops predict` takes any image the prepare stage would; the service applies Limits(spec).
        self.decoder = RowDecoder(self.spec, Limits())
        self.inputs, self.limits = self.decoder.inputs, self.decoder.limits
        size = cache_size or _env_int("MMOPS_ENCODER_CACHE_SIZE", 4096)
        self._caches = {n: _LRU(size) for n, e in self.model.encoders.items() if e.frozen}

    def validate(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return self.decoder.validate(record)

    def _frozen_features(self, encoder: Any, values: list[Any]) -> torch.Tensor | Tokens:
        """What the model takes for a cached input: vectors, or token sequences when its fusion attends."""
        batch = self._to_device(encoder.preprocess(values))
        if self.model.needs_sequences:
            return as_tokens(encoder.forward_sequence(batch), "forward_sequence").to(torch.float32)
        return encoder(batch).float()

    @torch.inference_mode()
    def forward(
        self, decoded: Sequence[Mapping[str, Any]], top_k: int = 3, options: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Answers for already validated rows (see :meth:`validate`), in one batch.

        ``options`` are a generating task's decoding settings for this batch (a caption's ``num_beams``,
        ``max_length``): its outputs take them (``with_options``); other tasks' outputs refuse them."""
        if not decoded:
            return []
        logits = self.logits(decoded)
        if options:
            if not hasattr(logits, "with_options"):
                raise InputError("options", f"the {self.model.task_name} task takes no decoding options")
            logits = logits.with_options(**options)
        return self._answers(logits.float().cpu(), top_k)

    @torch.inference_mode()
    def logits(self, decoded: Sequence[Mapping[str, Any]]) -> Any:
        """The model's raw outputs for validated rows: what :meth:`forward` answers from, and what
        ``mmops adapt`` passes its rows through (the service's own preprocessing)."""
        inputs: dict[str, Any] = {}
        index: dict[str, torch.Tensor] = {}
        amp = (
            torch.autocast(self.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with amp:
            for name, encoder in self.model.encoders.items():
                present = [i for i, d in enumerate(decoded) if d[name] is not None]
                values = [decoded[i][name] for i in present]
                position = torch.full((len(decoded),), -1, dtype=torch.long)
                position[present] = torch.arange(len(present))
                index[name] = position.to(self.device)
                if not values:
                    inputs[name] = None
                elif name in self._caches:
                    inputs[name] = self._caches[name].get_many(
                        values, lambda vs, e=encoder: self._frozen_features(e, vs)
                    )
                else:
                    inputs[name] = self._to_device(encoder.preprocess(values))
            return self.model(inputs, index, frozenset(self._caches))

    def _answers(self, logits: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        """The task's answers: the class and its top k, the labels over the threshold, the value..."""
        return self.model.task.answers(self.model.task.scores(logits), top_k)

    def predict(
        self, records: Sequence[Mapping[str, Any]], top_k: int = 3, options: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Validate every record (the first bad one raises :class:`InputError`), then answer them all."""
        if len(records) > self.limits.batch_size:
            raise InputError("batch", f"has {len(records)} items, over the limit of {self.limits.batch_size}")
        return self.forward([self.validate(r) for r in records], top_k=top_k, options=options)

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, Mapping):
            return {k: v.to(self.device) for k, v in batch.items()}
        return batch
