"""Audio encoder: WAV → log-mel spectrogram → a small CNN, as in CNN audio tagging (Hershey et al.,
"CNN Architectures for Large-Scale Audio Classification", 2017).

WAV files are decoded with scipy, mixed to mono, resampled to ``sample_rate`` and padded or cut to
``seconds``; the spectrogram is ``torch.stft`` with a Hann window and an HTK mel filterbank built here
(torchaudio is not a dependency). For fusions that attend, the CNN's time frames are the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


class MelAudioEncoder(Encoder):
    modality = "audio"

    def __init__(
        self, sample_rate: int = 16000, seconds: float = 1.0, n_fft: int = 400, hop: int = 160,
        n_mels: int = 40, channels: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("mel_audio: 'channels' needs at least one block, e.g. [16, 32, 64]")
        self.sample_rate, self.seconds, self.n_fft, self.hop, self.n_mels = sample_rate, seconds, n_fft, hop, n_mels
        self.channels = [int(c) for c in channels]
        self.samples = round(sample_rate * seconds)
        self.register_buffer("filters", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(1)]  # learns the log-mel scale instead of a fixed one
        c_in = 1
        for c_out in self.channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.output_dim = c_in

    def preprocess(self, values: Sequence[Any]) -> torch.Tensor:
        """Audio to ``(batch, 1, n_mels, frames)`` log-mel spectrograms."""
        waves = np.zeros((len(values), self.samples), dtype=np.float32)
        for i, value in enumerate(values):
            wave = decode_wav(value, self.sample_rate)[: self.samples]
            waves[i, : len(wave)] = wave
        spec = torch.stft(torch.from_numpy(waves), self.n_fft, self.hop, window=self.window, return_complex=True)
        mel = (spec.abs() ** 2).transpose(1, 2) @ self.filters  # (batch, frames, n_mels)
        return torch.log(mel + FLOOR).transpose(1, 2).unsqueeze(1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.features(batch).mean(dim=(2, 3))

    def forward_sequence(self, batch: torch.Tensor) -> Tokens:
        """One token per (pooled) time frame: ``(batch, frames, channels)``.

        Clips shorter than ``seconds`` are padded with silence, so their trailing frames are exactly
        the log floor in every mel band; pooled frames made only of those are masked. The first frame
        always counts, so a silent clip still has a token.
        """
        frames = self.features(batch).mean(dim=2).transpose(1, 2)
        real = (batch[:, 0] != SILENCE.to(batch.device)).any(dim=1, keepdim=True).float()  # (B, 1, frames)
        for _ in self.channels:  # the CNN's max-pools, on the mask
            real = F.max_pool1d(real, 2, ceil_mode=True)
        mask = real[:, 0, : frames.shape[1]].bool()
        mask[:, 0] = True
        return Tokens(frames, mask)

    def config(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "seconds": self.seconds, "n_fft": self.n_fft, "hop": self.hop,
                "n_mels": self.n_mels, "channels": self.channels}
