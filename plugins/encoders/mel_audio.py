"""Audio encoder: WAV → log-mel spectrogram (or MFCC, with deltas) → a CNN, as in CNN audio tagging
(Hershey et al., "CNN Architectures for Large-Scale Audio Classification", 2017).

WAV files are decoded with scipy, mixed to mono, resampled to ``sample_rate`` and padded or cut to
``seconds``; the spectrogram is ``torch.stft`` with a Hann window of ``window_ms`` every ``hop_ms``
and an HTK mel filterbank built here (torchaudio is not a dependency). For fusions that attend, the
CNN's time frames are the tokens.

What makes it hold up on voices it never heard (measured in ``bench/audio_speakers.py``):

* per-utterance normalisation (``normalize``): ``cmvn`` gives each mel band zero mean and unit
  variance over the clip's real frames (channel and speaker colouring removed), ``utterance`` one
  mean and scale per clip (loudness removed); part of ``preprocess``, so the service does exactly the same;
* augmentation in training only (``augment``): a random time shift and SpecAugment's frequency and time
  masks (Park et al., 2019); ``model.eval()`` turns it off;
* statistics pooling over frames (``pooling: stats``, mean and standard deviation of the real frames,
  projected, as in x-vectors) or learned attention pooling, instead of a plain mean that counts padding.

The old behaviour is ``n_fft: 400, hop: 160, normalize: none, augment: false, channels: [16, 32, 64],
pooling: mean`` (windows in samples: 25 ms at 16 kHz but 50 ms at 8 kHz).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmops.core.interfaces import Encoder, Tokens
from mmops.data.audio import BadAudioError, load_audio

FLOOR = 1e-6
SILENCE = torch.log(torch.tensor(FLOOR))  # the log-mel value of a frame of digital silence


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """``(n_fft // 2 + 1, n_mels)`` triangular filters equally spaced on the HTK mel scale."""
    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (freqs - lower) / (centre - lower), (upper - freqs) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(rising, falling)).T.astype(np.float32))


def decode_wav(value: Any, sample_rate: int) -> np.ndarray:
    """The decoder ``prepare`` and the service use too (:func:`mmops.data.audio.load_audio`)."""
    try:
        return load_audio(value, sample_rate)
    except BadAudioError as exc:
        raise ValueError(f"mel_audio: {exc}") from exc


def dct_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_in, n_out)`` orthonormal DCT-II: log-mel bands to cepstral coefficients (MFCC)."""
    k = np.arange(n_out)[None, :]
    n = np.arange(n_in)[:, None]
    m = np.cos(np.pi / n_in * (n + 0.5) * k) * np.sqrt(2.0 / n_in)
    m[:, 0] /= np.sqrt(2.0)
    return torch.from_numpy(m.astype(np.float32))


def deltas(x: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Regression deltas over the last (time) axis, edges repeated (as HTK and librosa compute them)."""
    padded = F.pad(x, (width, width), mode="replicate")  # x: (batch, bands, frames)
    t = x.shape[-1]
    num = sum(n * (padded[..., width + n : width + n + t] - padded[..., width - n : width - n + t])
              for n in range(1, width + 1))
    return num / (2 * sum(n * n for n in range(1, width + 1)))


NORMALIZE = ("cmvn", "utterance", "none")
POOLING = ("stats", "attention", "mean")
FEATURES = ("logmel", "mfcc")


class MelAudioEncoder(Encoder):
    modality = "audio"
    # Models saved before these parameters existed had no normalisation, no augmentation, log-mel features
    # pooled by a plain mean; their n_fft, hop and channels (saved by then, old defaults for older specs).
    saved_before: ClassVar[dict[str, Any]] = {
        "normalize": "none", "augment": False, "pooling": "mean", "features": "logmel", "use_deltas": False,
        "n_fft": 400, "hop": 160, "channels": [16, 32, 64],
    }

    def __init__(
        self, sample_rate: int = 16000, seconds: float = 1.0, n_fft: int | None = None, hop: int | None = None,
        n_mels: int = 40, channels: Sequence[int] = (32, 64, 128), window_ms: float = 25.0, hop_ms: float = 10.0,
        normalize: str = "cmvn", augment: bool = True, pooling: str = "stats", features: str = "logmel",
        n_mfcc: int = 20, use_deltas: bool = False, time_shift: float = 0.1, freq_masks: int = 2,
        freq_mask_width: int = 0, time_masks: int = 2, time_mask_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("mel_audio: 'channels' needs at least one block, e.g. [32, 64, 128]")
        for key, value, allowed in (("normalize", normalize, NORMALIZE), ("pooling", pooling, POOLING),
                                    ("features", features, FEATURES)):
            if value not in allowed:
                raise ValueError(f"mel_audio: '{key}' must be one of {', '.join(allowed)}, got '{value}'")
        self.sample_rate, self.seconds, self.n_mels = sample_rate, seconds, n_mels
        self.window_ms, self.hop_ms, self.given_fft, self.given_hop = window_ms, hop_ms, n_fft, hop
        # Windows in milliseconds mean the same thing at 8 and 48 kHz; n_fft/hop in samples win when given.
        self.win_length = int(n_fft) if n_fft else max(8, round(sample_rate * window_ms / 1000))
        self.n_fft = int(n_fft) if n_fft else 1 << (self.win_length - 1).bit_length()
        self.hop = int(hop) if hop else max(1, round(sample_rate * hop_ms / 1000))
        self.normalize, self.augment, self.pooling, self.features_kind = normalize, bool(augment), pooling, features
        self.n_mfcc, self.use_deltas = int(n_mfcc), bool(use_deltas)
        self.time_shift, self.freq_masks, self.time_masks = float(time_shift), int(freq_masks), int(time_masks)
        self.freq_mask_width, self.time_mask_fraction = int(freq_mask_width), float(time_mask_fraction)
        self.channels = [int(c) for c in channels]
        self.samples = round(sample_rate * seconds)
        # Padding frames keep one exact value: the log floor of digital silence, or 0 once normalised.
        self.pad_value = float(SILENCE) if normalize == "none" else 0.0
        self.register_buffer("filters", mel_filterbank(sample_rate, self.n_fft, n_mels), persistent=False)
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)
        if features == "mfcc":
            self.register_buffer("dct", dct_matrix(n_mels, self.n_mfcc), persistent=False)
        c_in = 3 if self.use_deltas else 1
        layers: list[nn.Module] = [nn.BatchNorm2d(c_in)]  # learns the input scale instead of a fixed one
        for c_out in self.channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.attend = nn.Linear(c_in, 1) if pooling == "attention" else None
        # Mean and standard deviation, projected back to the frames' width (the tokens' width too).
        self.project = nn.Linear(2 * c_in, c_in) if pooling == "stats" else None
        self.output_dim = c_in

    def preprocess(self, values: Sequence[Any]) -> torch.Tensor:
        """Audio to ``(batch, 1 or 3, bands, frames)`` normalised log-mel (or MFCC) features.

        Deterministic: training and the service compute exactly this; augmentation happens in
        ``forward`` and only in training mode."""
        waves = np.zeros((len(values), self.samples), dtype=np.float32)
        for i, value in enumerate(values):
            wave = decode_wav(value, self.sample_rate)[: self.samples]
            waves[i, : len(wave)] = wave
        spec = torch.stft(torch.from_numpy(waves), self.n_fft, self.hop, win_length=self.win_length,
                          window=self.window, return_complex=True)
        logmel = torch.log((spec.abs() ** 2).transpose(1, 2) @ self.filters + FLOOR).transpose(1, 2)  # (B, mels, T)
        real = (logmel != SILENCE).any(dim=1, keepdim=True)  # (B, 1, T): frames that are not padding
        x = logmel.transpose(1, 2) @ self.dct if self.features_kind == "mfcc" else logmel.transpose(1, 2)
        x = x.transpose(1, 2)  # (B, bands, T)
        if self.normalize != "none":
            weight = real.float()
            count = weight.sum(dim=2, keepdim=True).clamp(min=1.0)
            axes = (2,) if self.normalize == "cmvn" else (1, 2)
            scale = count if self.normalize == "cmvn" else count * x.shape[1]
            mean = (x * weight).sum(dim=axes, keepdim=True) / scale
            var = (((x - mean) * weight) ** 2).sum(dim=axes, keepdim=True) / scale
            x = (x - mean) / (var.sqrt() + 1e-5)
        if self.use_deltas:
            d1 = deltas(x)
            x = torch.stack([x, d1, deltas(d1)], dim=1)
        else:
            x = x.unsqueeze(1)
        return x.masked_fill(~real.unsqueeze(1), self.pad_value)

    def _real(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, T)``: frames that are not padding (the first always counts: a silent clip has one)."""
        real = (batch[:, 0] != self.pad_value).any(dim=1)
        real[:, 0] = True
        return real

    def _augment(self, batch: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random time shift, then SpecAugment frequency and time masks; each clip its own draw."""
        batch, real = batch.clone(), real.clone()
        b, _, bands, t = batch.shape
        reach = round(self.time_shift * t)
        fill = 0.0 if self.normalize != "none" else float(batch[real.unsqueeze(1).unsqueeze(2).expand_as(batch)]
                                                          .mean())
        for i in range(b):
            if reach:
                shift = int(torch.randint(-reach, reach + 1, ()))
                if shift:
                    batch[i] = torch.roll(batch[i], shift, dims=-1)
                    real[i] = torch.roll(real[i], shift, dims=-1)
                    gone = slice(0, shift) if shift > 0 else slice(t + shift, t)
                    batch[i, ..., gone], real[i, gone] = self.pad_value, False
            width = self.freq_mask_width or max(1, bands // 8)
            for _ in range(self.freq_masks):
                w = int(torch.randint(0, width + 1, ()))
                f0 = int(torch.randint(0, max(1, bands - w + 1), ()))
                batch[i, :, f0 : f0 + w, real[i]] = fill
            for _ in range(self.time_masks):
                w = int(torch.randint(0, max(1, round(self.time_mask_fraction * t)) + 1, ()))
                t0 = int(torch.randint(0, max(1, t - w + 1), ()))
                keep = real[i, t0 : t0 + w].clone()
                batch[i, :, :, t0 : t0 + w][..., keep] = fill
        real[:, 0] = True
        return batch, real

    def _frames(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, frames, channels)`` after the CNN (bands averaged), and which pooled frames are real."""
        real = self._real(batch)
        if self.training and self.augment:
            batch, real = self._augment(batch, real)
        frames = self.features(batch).mean(dim=2).transpose(1, 2)
        mask = real.float().unsqueeze(1)
        for _ in self.channels:  # the CNN's max-pools, on the mask
            mask = F.max_pool1d(mask, 2, ceil_mode=True)
        mask = mask[:, 0, : frames.shape[1]].bool()
        mask[:, 0] = True
        return frames, mask

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":  # the original pooling: every frame, padding included
            return self.features(self._augment(batch, self._real(batch))[0] if self.training and self.augment
                                 else batch).mean(dim=(2, 3))
        frames, mask = self._frames(batch)
        weight = mask.float().unsqueeze(2)
        if self.attend is not None:
            weight = torch.softmax(self.attend(frames).masked_fill(~mask.unsqueeze(2), float("-inf")), dim=1)
            return (frames * weight).sum(dim=1)
        count = weight.sum(dim=1)
        mean = (frames * weight).sum(dim=1) / count
        std = ((((frames - mean.unsqueeze(1)) * weight) ** 2).sum(dim=1) / count + 1e-5).sqrt()
        return self.project(torch.cat([mean, std], dim=1))

    def forward_sequence(self, batch: torch.Tensor) -> Tokens:
        """One token per (pooled) time frame: ``(batch, frames, channels)``.

        Clips shorter than ``seconds`` are padded; their trailing frames hold exactly the padding
        value in every band, and pooled frames made only of those are masked. The first frame always
        counts, so a silent clip still has a token.
        """
        frames, mask = self._frames(batch)
        return Tokens(frames, mask)

    def config(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "seconds": self.seconds, "n_fft": self.given_fft,
                "hop": self.given_hop, "n_mels": self.n_mels, "channels": self.channels,
                "window_ms": self.window_ms, "hop_ms": self.hop_ms, "normalize": self.normalize,
                "augment": self.augment, "pooling": self.pooling, "features": self.features_kind,
                "n_mfcc": self.n_mfcc, "use_deltas": self.use_deltas, "time_shift": self.time_shift,
                "freq_masks": self.freq_masks, "freq_mask_width": self.freq_mask_width,
                "time_masks": self.time_masks, "time_mask_fraction": self.time_mask_fraction}
