"""mel_audio's waveform augmentation (speed perturbation, noise at a random SNR): training only, the
service's features unchanged, padding left as padding. Tiny generated clips; no data set needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmops.core.plugin_registry import get_encoder

WAVES = {"speed": [0.9, 1.0, 1.1], "noise_snr": [5.0, 20.0]}


def _clip(seconds: float, rate: int = 8000, seed: int = 0) -> np.ndarray:
    """A spoken-word stand-in: a gliding voiced tone (pitch 120-180 Hz, three harmonics) under a
    rise-and-fall envelope, with a little breath noise."""
    n = round(seconds * rate)
    rng = np.random.default_rng(seed)
    pitch = np.linspace(120.0 + 10 * seed, 180.0, n)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    envelope = np.sin(np.linspace(0, np.pi, n)) ** 0.5
    return (0.4 * envelope * voiced + 0.005 * rng.standard_normal(n)).astype(np.float32)


def _encoder(**params) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights for every encoder a test compares
    return get_encoder("mel_audio")(sample_rate=8000, **params)


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
def test_eval_features_are_the_same_with_and_without_wave_augmentation(kind):
    clips = [_clip(0.3 + 0.1 * i, seed=i) for i in range(4)]
    plain, perturbed = _encoder().eval(), _encoder(**WAVES, noise_kind=kind).eval()
    assert torch.equal(plain.preprocess(clips), perturbed.preprocess(clips))
    perturbed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(plain.preprocess(clips)), perturbed(perturbed.preprocess(clips)))
    off = _encoder(**WAVES, noise_kind=kind, augment=False).train()  # augment: false switches it off too
    assert torch.equal(off.preprocess(clips), plain.preprocess(clips))


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
def test_noise_changes_the_clip_and_never_the_padding(kind):
    clips = [_clip(0.3 + 0.1 * i, seed=i) for i in range(4)]
    enc = _encoder(noise_snr=[0.0, 10.0], noise_kind=kind)
    clean = enc.eval().preprocess(clips)
    noisy = enc.train().preprocess(clips)
    assert noisy.shape == clean.shape and not torch.allclose(noisy, clean, atol=1e-2)
    # The same frames are real (padding is still exactly 0 after normalisation): pooling sees what eval sees.
    assert torch.equal((noisy[:, 0] != 0).any(dim=1), (clean[:, 0] != 0).any(dim=1))


def test_noise_level_follows_the_snr():
    wave = torch.from_numpy(np.stack([_clip(0.5), _clip(0.5, seed=1)]))
    wave = torch.nn.functional.pad(wave, (0, 4000))
    for snr in (0.0, 20.0):
        enc = _encoder(noise_snr=[snr, snr], noise_kind="white").train()
        added = enc._perturb_waves(wave) - wave
        ratio = 10 * torch.log10((wave[:, :4000] ** 2).mean(dim=1) / (added[:, :4000] ** 2).mean(dim=1))
        torch.testing.assert_close(ratio, torch.full((2,), snr), atol=0.01, rtol=0)
        assert (added[:, 4000:] == 0).all()


def test_speed_perturbation_resamples_the_clip():
    wave = torch.nn.functional.pad(torch.from_numpy(_clip(0.5)), (0, 4000))[None].repeat(8, 1)
    enc = _encoder(speed=[0.8, 1.25]).train()
    torch.manual_seed(3)
    out = enc._perturb_waves(wave)
    lengths = sorted({int((row != 0).nonzero().max()) + 1 for row in out})
    assert lengths == [3200, 5000]  # 4000 samples played 1.25x faster or 0.8x as fast
    slow = out[[int((row != 0).nonzero().max()) + 1 == 5000 for row in out].index(True)]
    # Resampled, not cut: the clip's last sample lands at the new end, its first stays first.
    assert slow[0] == wave[0, 0] and torch.isclose(slow[4999], wave[0, 3999])


def test_wave_options_are_saved_and_checked():
    enc = _encoder(**WAVES, noise_kind="babble")
    assert {k: enc.config()[k] for k in (*WAVES, "noise_kind")} == {**WAVES, "noise_kind": "babble"}
    rebuilt = get_encoder("mel_audio")(**enc.config())
    assert rebuilt.config() == enc.config()
    with pytest.raises(ValueError, match="'noise_kind' must be one of white, pink, babble"):
        _encoder(noise_kind="brown")
    with pytest.raises(ValueError, match="'noise_snr' is"):
        _encoder(noise_snr=[20.0, 5.0])
    with pytest.raises(ValueError, match="'speed' factors"):
        _encoder(speed=[0.0, 1.0])


def test_trim_starts_every_word_at_frame_zero():
    """trim_db: leading and trailing frames far below the clip's loudest one become padding, so a word
    recorded after a pause looks like the same word recorded without it."""
    word = _clip(0.4)
    rng = np.random.default_rng(0)
    hiss = (1e-4 * rng.standard_normal(1600)).astype(np.float32)  # 0.2 s of room noise, 70 dB down
    late = np.concatenate([hiss, word, hiss])
    plain = _encoder(trim_db=0.0).eval()  # no trimming (the default trims at 40 dB)
    a, b = plain.preprocess([word, late])

    def real(x: torch.Tensor) -> torch.Tensor:  # (channels, bands, frames) -> (frames,)
        return (x[0] != 0).any(dim=0)

    assert real(b).sum() > real(a).sum() + 10  # without trimming the pauses are real frames
    trimmed = _encoder(trim_db=30.0).eval()
    c, d = trimmed.preprocess([word, late])
    assert torch.equal(real(c), real(d)) and real(c)[0]  # the same real frames, from frame 0
    assert (c - d).abs().mean() < 0.1
    assert trimmed.config()["trim_db"] == 30.0 and plain.config()["trim_db"] == 0.0
    assert _encoder().config()["trim_db"] == 40.0  # the default, measured best of 20/30/40/50 dB


def test_fixed_frames_gives_every_word_one_length():
    enc = _encoder(trim_db=30.0, fixed_frames=24).eval()
    batch = enc.preprocess([_clip(0.2), _clip(0.7, seed=1)])
    assert ((batch[:, 0] != 0).any(dim=1).sum(dim=1) == 24).all()
