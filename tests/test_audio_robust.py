"""mel_audio across voices: per-utterance normalisation, windows in ms, augmentation in training only,
MFCC/deltas, pooling over real frames. Tiny generated clips; no data set needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmops_plugins.encoders.mel_audio import SILENCE, deltas

from mmops.core.plugin_registry import get_encoder

# The encoder before issue 16: every parameter it has gained since, at its old value.
OLD = {
    "n_fft": 400,
    "hop": 160,
    "normalize": "none",
    "augment": False,
    "channels": [16, 32, 64],
    "pooling": "mean",
    "features": "logmel",
    "use_deltas": False,
    "arch": "cnn2d",
    "warp": 0.0,
    "stretch": 0.0,
    "dynamic_range": 0.0,
    "trim_db": 0.0,
}


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
    assert (at8.hop, at16.hop, at8.win_length, at16.win_length) == (160, 320, 200, 400)  # 25 ms every 20 ms
    frames8 = at8.preprocess([_clip(1.0, 8000)]).shape[-1]
    frames16 = at16.preprocess([_clip(1.0, 16000)]).shape[-1]
    assert frames8 == frames16 == 51
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
    assert batch.shape == (2, 3, 13, 51)
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
    with pytest.raises(ValueError, match="'arch' must be one of tdnn, cnn2d"):
        get_encoder("mel_audio")(arch="rnn")


def test_tdnn_keeps_one_token_per_real_frame():
    enc = _encoder().eval()  # the default: MFCC into 1-D convolutions over time
    assert enc.arch == "tdnn" and enc.features_kind == "mfcc"
    batch = enc.preprocess([_clip(0.3), _clip(0.9)])
    with torch.no_grad():
        tokens = enc.forward_sequence(batch)
    assert tokens.values.shape == (2, batch.shape[-1], enc.output_dim)
    real = (batch[:, 0] != 0).any(dim=1)
    real[:, 0] = True
    assert torch.equal(tokens.mask, real) and tokens.mask[0].sum() < tokens.mask[1].sum()
    old = _encoder(**OLD)  # the 2-D CNN is still there, for saved models and for whoever asks for it
    assert isinstance(old.features[1], torch.nn.Conv2d) and isinstance(enc.features[1], torch.nn.Conv1d)


@pytest.mark.parametrize("features", ["mfcc", "logmel"])
def test_warp_and_stretch_change_real_frames_only(features):
    enc = _encoder(features=features, time_shift=0.0, freq_masks=0, time_masks=0, warp=0.0, stretch=0.0)
    batch = enc.preprocess([_clip(0.4, seed=i) for i in range(3)])
    real = enc._real(batch)
    same, kept = enc._augment(batch, real)
    assert torch.equal(same, batch) and torch.equal(kept, real)  # nothing asked, nothing done
    enc.warp = 1e-7  # a warp of ~0: the MFCC -> spectrum -> MFCC round trip is exact (orthonormal DCT)
    torch.testing.assert_close(enc._augment(batch, real)[0], batch, atol=1e-4, rtol=0)
    enc.warp, enc.stretch = 0.2, 0.2
    torch.manual_seed(0)
    warped, moved = enc._augment(batch, real)
    assert not torch.allclose(warped, batch, atol=1e-2)
    assert (warped[:, 0].transpose(1, 2)[~moved] == 0).all()  # padding stays exactly padding
    assert moved[:, 0].all() and moved.sum() != real.sum()  # a stretched clip is longer or shorter


def test_dynamic_range_evens_out_the_noise_floor():
    """Two recordings of one sound that differ only in their background hiss look the same once everything
    more than dynamic_range dB below the clip's peak is floored (a quiet room and a noisy one)."""
    rng = np.random.default_rng(0)
    tone = _clip(0.3)
    quiet, hiss = (
        np.concatenate([tone, level * rng.standard_normal(2400).astype(np.float32)]) for level in (1e-5, 1e-3)
    )
    # trim_db off: trimming (on by default) would cut the hissing tail itself and hide what the floor does
    floored = _encoder(dynamic_range=40.0, trim_db=0.0)
    a, b = floored.preprocess([quiet, hiss])
    c, d = _encoder(dynamic_range=0.0, trim_db=0.0).preprocess([quiet, hiss])
    assert (a - b).abs().mean() < 0.2 * (c - d).abs().mean()
    assert floored.config()["dynamic_range"] == 40.0


def test_old_means_every_parameter_added_since():
    """OLD (and bench/audio_speakers.py's ``before``) name every parameter a model saved before issue 16
    loads with, at that value: a new parameter added without its old value would silently change them."""
    import importlib.util
    from pathlib import Path

    saved_before = get_encoder("mel_audio").saved_before
    assert {k: OLD[k] for k in saved_before} == saved_before
    path = Path(__file__).resolve().parent.parent / "bench" / "audio_speakers.py"
    spec = importlib.util.spec_from_file_location("audio_speakers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert {k: bench.VARIANTS["before"][k] for k in saved_before} == saved_before
