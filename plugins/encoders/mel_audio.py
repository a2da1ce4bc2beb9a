"""Audio encoder: WAV → MFCC (or log-mel) features → 1-D convolutions over time (a TDNN, as in x-vectors:
Snyder et al., 2018), or the original 2-D CNN over the spectrogram (Hershey et al., 2017).

WAV files are decoded with scipy, mixed to mono, resampled to ``sample_rate`` and padded or cut to
``seconds``; the spectrogram is ``torch.stft`` with a Hann window of ``window_ms`` every ``hop_ms``
and an HTK mel filterbank built here (torchaudio is not a dependency); MFCC are its DCT. For fusions
that attend, the network's time frames are the tokens.

What makes it hold up on voices it never heard (measured in ``bench/audio_speakers.py``):

* per-utterance normalisation (``normalize``): ``cmvn`` gives each band (or cepstral coefficient) zero
  mean and unit variance over the clip's real frames (channel and speaker colouring removed),
  ``utterance`` one mean and scale per clip (loudness removed); part of ``preprocess``, so the service
  does exactly the same (and training augments the features, never the waveform);
* a per-clip noise floor (``dynamic_range``, dB): mel energies more than that far below the clip's peak
  are raised to it before the log-mel becomes MFCC, so a quiet room and a hissing microphone give the same
  pauses and fades (their cepstra otherwise describe each recording's background as much as the word);
* augmentation in training only (``augment``), on the batch of features at once: a random stretch of
  the frequency axis (``warp``, vocal-tract-length perturbation: a longer or shorter vocal tract; on
  MFCC it warps the spectrum they encode), of the time axis (``stretch``, a faster or slower speaker),
  a time shift, and SpecAugment's frequency and time masks (Park et al., 2019); ``model.eval()`` turns
  it off;
* ``trim_db`` (40 by default; 0 keeps the silence): leading and trailing frames that far below the clip's
  loudest frame become padding, so every word starts at frame 0 and pooling and normalisation see the
  word, not the pauses around it; in ``preprocess``, so the service trims alike. FSDD-5 leave one
  speaker out, 3 seeds: 81.5% -> 83.2% mean (20/30/50 dB did worse on three folds);
* optional, off by default: ``fixed_frames`` (the trimmed word
  resampled to that many frames), and on the waveform in training only: ``speed`` (resampling by a
  factor drawn among those given, e.g. ``[0.9, 1.0, 1.1]`` as Kaldi) and ``noise_snr`` (white, pink or
  babble noise, ``noise_kind``, mixed in at a random SNR in that dB range);
* ``arch: tdnn`` (the default): the bands are the channels of dilated 1-D convolutions over time, so a
  speaker's formants need not sit on the same rows; small (50 k weights) and fast on a CPU; the
  2-D CNN (``arch: cnn2d``) generalised far worse across speakers in that benchmark, and costs more;
* statistics pooling over frames (``pooling: stats``, mean and standard deviation of the real frames,
  projected, as in x-vectors) or learned attention pooling, instead of a plain mean that counts padding.

The old behaviour is ``n_fft: 400, hop: 160, normalize: none, augment: false, channels: [16, 32, 64],
pooling: mean, features: logmel, arch: cnn2d`` (windows in samples: 25 ms at 16 kHz but 50 ms at 8 kHz).
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
    num = sum(
        n * (padded[..., width + n : width + n + t] - padded[..., width - n : width - n + t])
        for n in range(1, width + 1)
    )
    return num / (2 * sum(n * n for n in range(1, width + 1)))


NORMALIZE = ("cmvn", "utterance", "none")
ARCH = ("tdnn", "cnn2d")
POOLING = ("stats", "attention", "mean")
FEATURES = ("logmel", "mfcc")
NOISE = ("white", "pink", "babble")


class MelAudioEncoder(Encoder):
    modality = "audio"
    # Models saved before these parameters existed had no normalisation, no augmentation, log-mel features
    # pooled by a plain mean; their n_fft, hop and channels (saved by then, old defaults for older specs).
    saved_before: ClassVar[dict[str, Any]] = {
        "normalize": "none",
        "augment": False,
        "pooling": "mean",
        "features": "logmel",
        "use_deltas": False,
        "n_fft": 400,
        "hop": 160,
        "channels": [16, 32, 64],
        # Added since (issue 16, second round): until then the CNN was 2-D, features log-mel, and training
        # neither warped nor stretched (augmentation only: a saved model answers the same either way).
        "arch": "cnn2d",
        "warp": 0.0,
        "stretch": 0.0,
        "dynamic_range": 0.0,
        # Third round: silence around the word was kept (no trimming).
        "trim_db": 0.0,
    }

    def __init__(
        self,
        sample_rate: int = 16000,
        seconds: float = 1.0,
        n_fft: int | None = None,
        hop: int | None = None,
        n_mels: int = 40,
        channels: Sequence[int] = (64, 64, 64, 64),
        window_ms: float = 25.0,
        hop_ms: float = 20.0,
        normalize: str = "cmvn",
        augment: bool = True,
        pooling: str = "stats",
        features: str = "mfcc",
        n_mfcc: int = 13,
        use_deltas: bool = False,
        time_shift: float = 0.1,
        freq_masks: int = 2,
        freq_mask_width: int = 0,
        time_masks: int = 2,
        time_mask_fraction: float = 0.1,
        arch: str = "tdnn",
        warp: float = 0.15,
        stretch: float = 0.15,
        dynamic_range: float = 40.0,
        speed: Sequence[float] = (),
        noise_snr: Sequence[float] = (),
        noise_kind: str = "pink",
        trim_db: float = 40.0,
        fixed_frames: int = 0,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("mel_audio: 'channels' needs at least one block, e.g. [32, 64, 128]")
        for key, value, allowed in (
            ("normalize", normalize, NORMALIZE),
            ("pooling", pooling, POOLING),
            ("features", features, FEATURES),
            ("arch", arch, ARCH),
            ("noise_kind", noise_kind, NOISE),
        ):
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
        self.arch, self.warp, self.stretch = arch, float(warp), float(stretch)
        self.dynamic_range = float(dynamic_range)
        self.speed = [float(f) for f in speed]
        self.noise_snr = [float(v) for v in noise_snr]
        self.noise_kind = noise_kind
        self.trim_db, self.fixed_frames = float(trim_db), int(fixed_frames)
        if any(f <= 0 for f in self.speed):
            raise ValueError(f"mel_audio: 'speed' factors must be positive, got {self.speed}")
        if self.noise_snr and (len(self.noise_snr) != 2 or self.noise_snr[0] > self.noise_snr[1]):
            raise ValueError(f"mel_audio: 'noise_snr' is [lowest, highest] dB, got {self.noise_snr}")
        self.samples = round(sample_rate * seconds)
        # Padding frames keep one exact value: the log floor of digital silence, or 0 once normalised.
        self.pad_value = float(SILENCE) if normalize == "none" else 0.0
        self.register_buffer("filters", mel_filterbank(sample_rate, self.n_fft, n_mels), persistent=False)
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)
        if features == "mfcc":
            self.register_buffer("dct", dct_matrix(n_mels, self.n_mfcc), persistent=False)
        c_in = 3 if self.use_deltas else 1
        layers: list[nn.Module]
        if arch == "tdnn":  # bands (x deltas) are the channels of 1-D convolutions over time, as in x-vectors
            c_in *= self.n_mfcc if features == "mfcc" else n_mels
            layers = [nn.BatchNorm1d(c_in)]
            for i, c_out in enumerate(self.channels):
                kernel, dilation = (5, 1) if i == 0 else (3, i + 1)
                layers += [
                    nn.Conv1d(c_in, c_out, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
                    nn.BatchNorm1d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        else:
            layers = [nn.BatchNorm2d(c_in)]  # learns the input scale instead of a fixed one
            for c_out in self.channels:
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2, ceil_mode=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.attend = nn.Linear(c_in, 1) if pooling == "attention" else None
        # Mean and standard deviation, projected back to the frames' width (the tokens' width too).
        self.project = nn.Linear(2 * c_in, c_in) if pooling == "stats" else None
        self.output_dim = c_in

    def preprocess(self, values: Sequence[Any]) -> torch.Tensor:
        """Audio to ``(batch, 1 or 3, bands, frames)`` normalised log-mel (or MFCC) features.

        Deterministic in eval mode: the service (and featurize, and evaluation) compute exactly this.
        In training mode with ``augment``, the waveforms are first perturbed (``speed``, ``noise_snr``:
        :meth:`_perturb_waves`); the rest of the augmentation happens in ``forward``."""
        waves = np.zeros((len(values), self.samples), dtype=np.float32)
        for i, value in enumerate(values):
            wave = decode_wav(value, self.sample_rate)[: self.samples]
            waves[i, : len(wave)] = wave
        audio = torch.from_numpy(waves)
        if self.training and self.augment and (self.speed or self.noise_snr):
            audio = self._perturb_waves(audio)
        spec = torch.stft(
            audio,
            self.n_fft,
            self.hop,
            win_length=self.win_length,
            window=self.window,
            return_complex=True,
        )
        logmel = torch.log((spec.abs() ** 2).transpose(1, 2) @ self.filters + FLOOR).transpose(1, 2)  # (B, mels, T)
        real = (logmel != SILENCE).any(dim=1, keepdim=True)  # (B, 1, T): frames that are not padding
        if self.trim_db or self.fixed_frames:
            logmel, real = self._align(logmel, real)
        if self.dynamic_range:  # nothing quieter than the clip's loudest band by more than this many dB
            floor = logmel.amax(dim=(1, 2), keepdim=True) - self.dynamic_range * np.log(10) / 10
            logmel = torch.maximum(logmel, floor)
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

    def _align(self, logmel: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Leading and trailing frames quieter than ``trim_db`` below the clip's loudest frame become padding
        (the word starts at frame 0); with ``fixed_frames``, the word is then resampled to that many frames
        (every speaker's word takes the same time)."""
        b, _, t = logmel.shape
        energy = torch.logsumexp(logmel, dim=1).masked_fill(~real[:, 0], float("-inf"))  # (B, T)
        peak = energy.amax(dim=1, keepdim=True)
        voiced = energy >= peak - (self.trim_db or 1e9) * np.log(10) / 10
        voiced &= real[:, 0]
        voiced[:, 0] |= ~voiced.any(dim=1)
        span = torch.arange(t)
        start = torch.where(voiced, span, t).amin(dim=1)
        end = torch.where(voiced, span, -1).amax(dim=1) + 1
        out = torch.full_like(logmel, float(SILENCE))
        fixed = min(self.fixed_frames, t) if self.fixed_frames else 0
        for i in range(b):
            word = logmel[i : i + 1, :, int(start[i]) : int(end[i])]
            if fixed:
                word = F.interpolate(word, size=fixed, mode="linear", align_corners=True)
            out[i, :, : word.shape[2]] = word[0]
        real = (out != SILENCE).any(dim=1, keepdim=True)
        return out, real

    def _perturb_waves(self, waves: torch.Tensor) -> torch.Tensor:
        """Training only, each clip its own draw: speed perturbation (``speed``: a factor among those given,
        the clip resampled so it plays that much faster, pitch and tempo together, as Kaldi's 0.9/1.0/1.1),
        then noise mixed in at a random signal-to-noise ratio (``noise_snr``: [lowest, highest] dB against
        the clip's RMS; ``noise_kind``: white, pink (1/f power) or babble (another clip of the batch)).
        Only the clip's own samples (up to its last non-zero one) change: padding stays digital silence, so
        the frames the model pools over are the real ones, as in eval."""
        b, n = waves.shape
        nonzero = waves != 0
        lengths = torch.where(nonzero.any(dim=1), n - nonzero.flip(1).float().argmax(dim=1), 0)
        if self.speed:
            factors = torch.tensor(self.speed)[torch.randint(len(self.speed), (b,))]
            out = torch.zeros_like(waves)
            for i in range(b):
                length, f = int(lengths[i]), float(factors[i])
                if length < 2 or f == 1.0:
                    out[i] = waves[i]
                    continue
                size = max(2, round(length / f))
                clip = F.interpolate(waves[i, None, None, :length], size=size, mode="linear", align_corners=True)
                out[i, : min(size, n)] = clip[0, 0, :n]
                lengths[i] = min(size, n)
            waves = out
        if self.noise_snr:
            inside = (torch.arange(n)[None, :] < lengths[:, None]).float()
            if self.noise_kind == "babble":
                noise = waves.roll(1, dims=0)
            else:
                noise = torch.randn(b, n)
                if self.noise_kind == "pink":  # power falling as 1/f: amplitudes scaled by 1/sqrt(f)
                    spectrum = torch.fft.rfft(noise, dim=1)
                    spectrum = spectrum / torch.arange(spectrum.shape[1]).clamp(min=1).sqrt()
                    noise = torch.fft.irfft(spectrum, n=n, dim=1)
            noise = noise * inside

            def rms(x: torch.Tensor) -> torch.Tensor:
                return ((x**2).sum(dim=1) / lengths.clamp(min=1)).sqrt()

            low, high = self.noise_snr
            snr = low + torch.rand(b) * (high - low)
            scale = rms(waves) / (rms(noise) + 1e-8) / 10 ** (snr / 20)
            waves = waves + noise * scale[:, None]
        return waves

    def _real(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, T)``: frames that are not padding (the first always counts: a silent clip has one)."""
        real = (batch[:, 0] != self.pad_value).any(dim=1)
        real[:, 0] = True
        return real

    def _augment(self, batch: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time augmentation on the whole batch at once, each clip its own draw: a random
        stretch of the frequency axis (``warp``: a longer or shorter vocal tract, as in VTLP), of the time
        axis (``stretch``: a faster or slower speaker) and a time shift, then SpecAugment's frequency and
        time masks. Padding stays padding (exactly ``pad_value``); masks cover real frames only."""
        b, channels, bands, t = batch.shape
        fill = 0.0 if self.normalize != "none" else float(batch[real.unsqueeze(1).unsqueeze(2).expand_as(batch)].mean())

        def draw(reach: float) -> torch.Tensor:
            return (torch.rand(b) * 2 - 1) * reach

        # affine_grid maps each output position to where it reads the input, in [-1, 1] coordinates.
        if self.warp:  # bands scaled by 1/alpha about the lowest one (MFCC: on the spectrum they encode)
            alpha = 1 + draw(self.warp)
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0], theta[:, 1, 1], theta[:, 1, 2] = 1.0, 1 / alpha, 1 / alpha - 1
            x = batch - self.pad_value  # padding is 0 here and stays 0 through every linear step
            if self.features_kind == "mfcc":
                x = torch.einsum("mk,bckt->bcmt", self.dct, x)
            grid = F.affine_grid(theta.to(batch.device), list(x.shape), align_corners=True)
            x = F.grid_sample(x, grid, align_corners=True)
            if self.features_kind == "mfcc":
                x = torch.einsum("mk,bcmt->bckt", self.dct, x)
            batch = x + self.pad_value
        if self.stretch or self.time_shift:  # time scaled by 1/speed, then shifted
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0], theta[:, 1, 1] = 1 / (1 + draw(self.stretch)), 1.0
            theta[:, 0, 2] = draw(2 * self.time_shift)  # [-1, 1] spans the clip: 2 * fraction
            theta = theta.to(batch.device)
            grid = F.affine_grid(theta, [b, channels, bands, t], align_corners=True)
            batch = F.grid_sample(batch - self.pad_value, grid, align_corners=True) + self.pad_value
            source = ((grid[:, 0, :, 0] + 1) / 2 * (t - 1)).round().long()  # (b, t): the frame each one reads
            inside = (source >= 0) & (source < t)
            real = inside & real.gather(1, source.clamp(0, t - 1))
        width = self.freq_mask_width or max(1, bands // 8)
        masked = torch.zeros(b, bands, t, dtype=torch.bool, device=batch.device)
        for reach, count, axis, size in (
            (width, self.freq_masks, 1, bands),
            (max(1, round(self.time_mask_fraction * t)), self.time_masks, 2, t),
        ):
            if count:
                w = torch.randint(0, reach + 1, (b, count, 1), device=batch.device)
                start = (torch.rand(b, count, 1, device=batch.device) * (size - w + 1).clamp(min=1)).long()
                span = torch.arange(size, device=batch.device)
                hit = ((span >= start) & (span < start + w)).any(dim=1)  # (b, size)
                masked |= hit.unsqueeze(2) if axis == 1 else hit.unsqueeze(1)
        masked &= real.unsqueeze(1)
        batch = batch.masked_fill(masked.unsqueeze(1), fill).masked_fill(~real[:, None, None, :], self.pad_value)
        real = real.clone()
        real[:, 0] = True
        return batch, real

    def _frames(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, frames, channels)`` after the CNN (bands averaged), and which pooled frames are real."""
        real = self._real(batch)
        if self.training and self.augment:
            batch, real = self._augment(batch, real)
        if self.arch == "tdnn":  # every input frame stays a frame
            return self.features(batch.flatten(1, 2)).transpose(1, 2), real
        frames = self.features(batch).mean(dim=2).transpose(1, 2)
        mask = real.float().unsqueeze(1)
        for _ in self.channels:  # the CNN's max-pools, on the mask
            mask = F.max_pool1d(mask, 2, ceil_mode=True)
        mask = mask[:, 0, : frames.shape[1]].bool()
        mask[:, 0] = True
        return frames, mask

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":  # the original pooling: every frame, padding included
            x = self._augment(batch, self._real(batch))[0] if self.training and self.augment else batch
            if self.arch == "tdnn":
                return self.features(x.flatten(1, 2)).mean(dim=2)
            return self.features(x).mean(dim=(2, 3))
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
        return {
            "sample_rate": self.sample_rate,
            "seconds": self.seconds,
            "n_fft": self.given_fft,
            "hop": self.given_hop,
            "n_mels": self.n_mels,
            "channels": self.channels,
            "window_ms": self.window_ms,
            "hop_ms": self.hop_ms,
            "normalize": self.normalize,
            "augment": self.augment,
            "pooling": self.pooling,
            "features": self.features_kind,
            "n_mfcc": self.n_mfcc,
            "use_deltas": self.use_deltas,
            "time_shift": self.time_shift,
            "freq_masks": self.freq_masks,
            "freq_mask_width": self.freq_mask_width,
            "time_masks": self.time_masks,
            "time_mask_fraction": self.time_mask_fraction,
            "arch": self.arch,
            "warp": self.warp,
            "stretch": self.stretch,
            "dynamic_range": self.dynamic_range,
            "speed": self.speed,
            "noise_snr": self.noise_snr,
            "noise_kind": self.noise_kind,
            "trim_db": self.trim_db,
            "fixed_frames": self.fixed_frames,
        }
