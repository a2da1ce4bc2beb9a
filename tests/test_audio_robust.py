"""mel_audio across voices: per-utterance normalisation, windows in ms, augmentation in training only,
MFCC/deltas, pooling over real frames. Tiny generated clips; no data set needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmops_plugins.encoders.mel_audio import SILENCE, deltas

from mmops.core.plugin_registry import get_encoder

OLD = {"n_fft": 400, "hop": 160, "normalize": "none", "augment": False, "channels": [16, 32, 64], "pooling": "mean"}


def _clip(seconds: float, rate: int = 8000, seed: int = 0) -> np.ndarray:
    """A vowel-like tone with harmonics and a little noise, as a decoded waveform."""
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((220, 440, 660, 1200), 1))
    return (0.3 * wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def _encoder(**params) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_encoder("mel_audio")(sample_rate=8000, **params)


def test_per_utterance_normalisation_removes_loudness():
    loud, quiet = _clip(0.5), _clip(0.5) * 0.05
    robust = _encoder()
    a, b = robust.preprocess([loud, quiet])
    old = _encoder(**OLD).preprocess([loud, quiet])
    # Only the log floor (1e-6) keeps it from exact; before, a quiet speaker looked like another sound.
    assert (a - b).abs().mean() < 0.05 and (old[0] - old[1]).abs().mean() > 2.0
    # Real frames have zero mean and unit variance per band; padding keeps one exact value (0).
    real = (a[0] != 0).any(dim=0)
    assert 0 < int(real.sum()) < a.shape[-1]
    assert torch.allclose(a[0][:, real].mean(dim=1), torch.zeros(a.shape[1]), atol=1e-4)
    assert (a[0][:, ~real] == 0).all()
    assert (old[0, 0][:, -5:] == SILENCE).all()


def test_windows_are_milliseconds_at_any_rate():
    at8 = get_encoder("mel_audio")(sample_rate=8000)
    at16 = get_encoder("mel_audio")(sample_rate=16000)
    assert (at8.hop, at16.hop, at8.win_length, at16.win_length) == (80, 160, 200, 400)
    frames8 = at8.preprocess([_clip(1.0, 8000)]).shape[-1]
    frames16 = at16.preprocess([_clip(1.0, 16000)]).shape[-1]
    assert frames8 == frames16 == 101
    assert get_encoder("mel_audio")(sample_rate=8000, n_fft=400, hop=160).hop == 160  # samples when given


def test_augmentation_happens_in_training_only():
    enc = _encoder()
    batch = enc.preprocess([_clip(0.5, seed=i) for i in range(4)])
    enc.eval()
    with torch.no_grad():
        first, again = enc(batch), enc(batch)
    assert torch.equal(first, again)
    torch.manual_seed(1)
    shifted, real = enc._augment(batch, enc._real(batch))
    assert shifted.shape == batch.shape and not torch.equal(shifted, batch)
    assert real[:, 0].all() and (shifted[:, 0].transpose(1, 2)[~real] == 0).all()  # padding stays padding
    enc.train()
    with torch.no_grad():
        torch.manual_seed(2)
        one = enc.forward_sequence(batch).values
        torch.manual_seed(3)
        two = enc.forward_sequence(batch).values
    assert not torch.equal(one, two)
    off = _encoder(augment=False).train()
    with torch.no_grad():
        assert torch.equal(off._frames(batch)[1], off.eval()._frames(batch)[1])  # augment: false never masks


def test_stats_pooling_ignores_padding_length():
    short = _encoder(seconds=1.0).eval()
    long = _encoder(seconds=2.0).eval()
    long.load_state_dict(short.state_dict())
    clip = _clip(0.4)
    with torch.no_grad():
        assert torch.allclose(short(short.preprocess([clip])), long(long.preprocess([clip])), atol=1e-5)
    mean_short = _encoder(seconds=1.0, pooling="mean").eval()
    mean_long = _encoder(seconds=2.0, pooling="mean").eval()
    mean_long.load_state_dict(mean_short.state_dict())
    with torch.no_grad():
        a, b = mean_short(mean_short.preprocess([clip])), mean_long(mean_long.preprocess([clip]))
    assert not torch.allclose(a, b, atol=1e-3)  # a plain mean counts the padding


@pytest.mark.parametrize("pooling", ["attention", "stats"])
def test_mfcc_with_deltas_and_pooling_shapes(pooling):
    enc = _encoder(features="mfcc", n_mfcc=13, use_deltas=True, pooling=pooling, channels=[8, 16]).eval()
    batch = enc.preprocess([_clip(0.3), _clip(0.9)])
    assert batch.shape == (2, 3, 13, 101)
    with torch.no_grad():
        out, tokens = enc(batch), enc.forward_sequence(batch)
    assert out.shape == (2, enc.output_dim) == (2, 16) and tokens.values.shape[-1] == 16
    assert tokens.mask[0].sum() < tokens.mask[1].sum()


def test_deltas_of_a_ramp_are_its_slope():
    ramp = torch.arange(10, dtype=torch.float32).repeat(1, 2, 1) * 3.0
    assert torch.allclose(deltas(ramp)[..., 2:-2], torch.full((1, 2, 6), 3.0))


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="'normalize' must be one of cmvn, utterance, none"):
        get_encoder("mel_audio")(normalize="loud")
    with pytest.raises(ValueError, match="'pooling'"):
        get_encoder("mel_audio")(pooling="max")
