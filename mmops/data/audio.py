"""Decoding audio: one function for the prepare stage, the mel encoder and the service alike.

WAV only (scipy reads it; no ffmpeg or torchaudio in the image). Mixed to mono, scaled to [-1, 1],
resampled with a polyphase filter, so a 44.1 kHz stereo file and a 8 kHz mono one look the same to a
model trained at ``sample_rate``.
"""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

# A minute of 48 kHz stereo int16 is 11 MB; anything longer is refused before it is decoded.
MAX_SECONDS = 600
# Every usual rate pair (44.1 kHz -> 16 kHz is 160/441) needs a small polyphase filter; odd ones use the FFT.
MAX_POLYPHASE = 4096


class BadAudioError(ValueError):
    """The bytes are not a decodable WAV file; the message says why in user terms."""


def load_audio(value: Any, sample_rate: int, seconds: float | None = None) -> np.ndarray:
    """WAV bytes or a path to mono float32 at ``sample_rate``; padded or cut to ``seconds`` if given.

    A 1-D float array is taken as already decoded at ``sample_rate`` (what ``prepare`` stores).
    """
    from scipy.io import wavfile
    from scipy.signal import resample, resample_poly

    if isinstance(value, np.ndarray) and value.ndim == 1:
        data = value.astype(np.float32, copy=False)
    elif isinstance(value, bytes | str | Path):
        try:
            rate, data = wavfile.read(io.BytesIO(value) if isinstance(value, bytes) else value, mmap=False)
        except FileNotFoundError as exc:
            raise BadAudioError(f"cannot open audio: {exc.strerror or exc}") from exc
        except Exception as exc:  # scipy fails on a corrupt header in many ways: each is one bad file
            raise BadAudioError(f"not a readable WAV file ({type(exc).__name__}: {exc})") from exc
        if not isinstance(data, np.ndarray) or data.ndim not in (1, 2) or data.dtype.kind not in "iuf":
            raise BadAudioError("not a readable WAV file (unsupported sample layout)")
        if rate <= 0:  # a header that says 0 Hz would divide by zero below
            raise BadAudioError(f"the WAV header gives a sample rate of {rate} Hz")
        if data.ndim == 2 and data.shape[1] == 0:
            raise BadAudioError("the WAV header gives 0 channels")
        if len(data) > MAX_SECONDS * rate:
            raise BadAudioError(f"audio is {len(data) / rate:.0f} s long, over the limit of {MAX_SECONDS} s")
        if data.dtype.kind in "iu":  # integer PCM to [-1, 1]
            info = np.iinfo(data.dtype)
            data = (data.astype(np.float32) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
        data = data.astype(np.float32)
        if data.ndim == 2:
            data = data.mean(axis=1)
        if data.size == 0:
            raise BadAudioError("the WAV file holds no samples")
        if rate != sample_rate:
            g = gcd(rate, sample_rate)
            up, down = sample_rate // g, rate // g
            if max(up, down) <= MAX_POLYPHASE:
                data = resample_poly(data, up, down).astype(np.float32)
            else:  # an odd rate (a corrupt header, say): a polyphase filter would need millions of taps
                data = resample(data, max(1, round(len(data) * sample_rate / rate))).astype(np.float32)
    else:
        raise BadAudioError(f"expected WAV bytes, a WAV path or a 1-D waveform, got {type(value).__name__}")
    if not np.isfinite(data).all():
        raise BadAudioError("the waveform holds NaN or infinite samples")
    if seconds is not None:
        n = round(sample_rate * seconds)
        data = np.pad(data[:n], (0, max(0, n - len(data))))
    return data
