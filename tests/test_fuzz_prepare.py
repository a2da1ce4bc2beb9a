"""``prepare`` never crashes on a bad file or an odd cell: property-based, with Hypothesis.

Each generated manifest mixes good rows with rows carrying exactly one fault: corrupt PNG/JPEG/WAV
bytes (a WAV whose header says 0 Hz among them), odd path, number, split, text, category and label
cells. Faults that must fail are "bad": their row is quarantined by its line. Random byte flips may or
may not leave a file decodable, so those rows only have to land on exactly one side. Good rows are kept.
"""

from __future__ import annotations

import csv
import io
import struct
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from mmops.config import load_params
from mmops.data.audio import BadAudioError, load_audio
from mmops.data.prepare import prepare

REPO = Path(__file__).resolve().parent.parent
BASE_PER_LABEL = 4
RATE = 1000  # the lowest sample rate params allow: tiny clips, fast resampling

PARAMS = {
    "seed": 0,
    "data": {"source": "manifest", "image_size": 8, "sample_rate": RATE, "audio_seconds": 0.05},
    "inputs": {
        "question": {"modality": "text", "encoder": "bow_text"},
        "image": {"modality": "image", "encoder": "pixels"},
        "audio": {"modality": "audio", "encoder": "mel_audio"},
        "size": {"modality": "number", "columns": ["width"]},
        "shop": {"modality": "category"},
    },
    "target": {"column": "label", "type": "classification"},
    "candidates": [{"name": "concat", "fusion": "concat"}],
}


def _png(fmt: str = "PNG", shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), (shade, 80, 160)).save(buf, fmt)
    return buf.getvalue()


def _wav(rate: int = RATE, channels: int = 1, bits: int = 16, samples: bytes | None = None) -> bytes:
    """A PCM WAV with whatever header fields it is given, true or not."""
    data = samples if samples is not None else np.arange(40, dtype=np.int16).tobytes()
    byte_rate = (rate * channels * bits // 8) % 2**32
    fmt = struct.pack("<HHIIHH", 1, channels, rate, byte_rate, channels * bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


GOOD_PNG, GOOD_JPEG, GOOD_WAV = _png(), _png("JPEG"), _wav()


def _flip(data: bytes, positions: list[int], byte: int) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p % len(out)] ^= byte or 1
    return bytes(out)


# Each fault: (column, value, kind of file bytes or None, outcome) with outcome "bad" or "maybe".
garbage = st.binary(min_size=0, max_size=48)
bad_image = st.one_of(
    st.just(b""),
    garbage.map(lambda g: b"\x89PNG\r\n\x1a\n" + g),  # a PNG signature, then junk
    garbage.map(lambda g: b"\xff\xd8\xff" + g),  # a JPEG start, then junk
    st.integers(0, 40).map(lambda n: GOOD_PNG[:n]),  # cut before any pixel data
    st.integers(0, 120).map(lambda n: GOOD_JPEG[:n]),  # cut inside the JPEG headers
)
bad_audio = st.one_of(
    st.just(_wav(rate=0)),  # the header says 0 Hz
    st.just(_wav(channels=0)),
    st.sampled_from([0, 1, 7, 12, 72]).map(lambda b: _wav(bits=b)),  # impossible or unsupported widths
    st.integers(0, 43).map(lambda n: GOOD_WAV[:n]),  # a header cut short
    garbage.map(lambda g: b"RIFF" + g),
)
maybe_image = st.tuples(
    st.sampled_from([GOOD_PNG, GOOD_JPEG]),
    st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
    st.integers(0, 255),
)
maybe_audio = st.one_of(
    st.tuples(st.just(GOOD_WAV), st.lists(st.integers(0, 10_000), min_size=1, max_size=6), st.integers(0, 255)).map(
        lambda t: _flip(*t)
    ),
    st.builds(
        _wav,
        rate=st.integers(1, 2**32 - 1),
        channels=st.integers(1, 4),
        bits=st.sampled_from([8, 16, 24, 32, 40, 48, 64]),
    ),
)
whitespace = st.sampled_from(["", " ", "\t", "\n", "\u3000", " \r\n "])
text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(lambda s: s.strip())
bad_number = st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999", "abc", "1,5", "--1", "½", "0x10", "one"])
good_number = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(-1e6, 1e6).map(repr),
    st.sampled_from([" 3 ", "+3", ".5", "5.", "1e5", "-0"]),
)
bad_path = st.sampled_from(
    ["../outside.png", "/etc/hostname", "missing.png", "x" * 300 + ".png", ".", "f", "f/\x00.png"]
)

faults = st.one_of(
    st.tuples(st.just("image"), bad_image, st.just("bad")),
    st.tuples(st.just("image"), maybe_image.map(lambda t: _flip(*t)), st.just("maybe")),
    st.tuples(st.just("audio"), bad_audio, st.just("bad")),
    st.tuples(st.just("audio"), maybe_audio, st.just("maybe")),
    st.tuples(st.just("image_path"), bad_path, st.just("bad")),
    st.tuples(st.just("audio_path"), bad_path, st.just("bad")),
    st.tuples(st.just("question"), whitespace, st.just("bad")),
    st.tuples(st.just("width"), st.one_of(bad_number, whitespace), st.just("bad")),
    st.tuples(st.just("shop"), whitespace, st.just("bad")),
    st.tuples(st.just("label"), whitespace, st.just("bad")),
    st.tuples(st.just("split"), st.sampled_from(["validation", "TRAIN", "", "tests"]), st.just("bad")),
)
good_row = st.fixed_dictionaries(
    {
        "question": text,
        "width": good_number,
        "shop": st.text("xyz", min_size=1, max_size=2),
        "label": st.sampled_from(["a", "b"]),
        "split": st.sampled_from(["train", "train", "test"]),
        "image": st.sampled_from([GOOD_PNG, GOOD_JPEG]),
    }
)
rows_strategy = st.lists(st.tuples(good_row, st.one_of(st.none(), faults)), min_size=1, max_size=10)


def _run(tmp: Path, generated: list[tuple[dict, tuple | None]]) -> tuple[dict, set[int], pd.DataFrame]:
    """Write the manifest and files, run prepare; returns the expected outcome per line, the kept
    lines, and the quarantine."""
    raw = tmp / "raw"
    (raw / "f").mkdir(parents=True)
    (tmp / "outside.png").write_bytes(GOOD_PNG)
    # Every label has several train rows, so none is rare whichever rows the seeded split holds out.
    base = [
        ({"question": "what?", "width": "1", "shop": "x", "label": label, "split": "train", "image": GOOD_PNG}, None)
        for label in ("a", "b") * BASE_PER_LABEL
    ]
    records, expected = [], {}
    for i, (row, fault) in enumerate(base + generated):
        line = i + 2  # the header is line 1
        cells = {k: v for k, v in row.items() if k != "image"}
        image, audio = row["image"], GOOD_WAV
        cells["image"], cells["audio"] = f"f/{i}.img", f"f/{i}.wav"
        outcome = "good"
        if fault is not None:
            column, value, outcome = fault
            if column == "image":
                image = value
            elif column == "audio":
                audio = value
            elif column == "image_path":
                cells["image"] = value
            elif column == "audio_path":
                cells["audio"] = value
            else:
                cells[column] = value
        (raw / f"f/{i}.img").write_bytes(image)
        (raw / f"f/{i}.wav").write_bytes(audio)
        records.append(cells)
        expected[line] = outcome
    # Quote every cell: an unquoted bare CR is a line break to any CSV reader, so not a cell at all.
    pd.DataFrame(records).to_csv(raw / "manifest.csv", index=False, quoting=csv.QUOTE_ALL)
    (tmp / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    params = load_params(tmp / "params.yaml")
    summary = prepare(raw, tmp / "out", params, appended_dir=tmp / "appended")
    kept = set(pd.read_parquet(tmp / "out" / "rows.parquet")["line"].astype(int))
    quarantine = pd.read_csv(tmp / "out" / "quarantine.csv", dtype=str, keep_default_na=False)
    assert summary["rows"] == len(expected)
    return expected, kept, quarantine


# Derandomized: the same examples on every run (a CI failure reproduces); no example database on disk.
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(generated=rows_strategy)
def test_prepare_quarantines_every_bad_row_and_keeps_every_good_one(generated):
    note(f"rows after the base rows: {generated!r}")
    with tempfile.TemporaryDirectory() as tmp:
        expected, kept, quarantine = _run(Path(tmp), generated)
    note(f"kept {sorted(kept)}; quarantine:\n{quarantine[['line', 'field', 'reason']].to_string()}")
    quarantined = set(quarantine["line"].astype(int))
    assert quarantine["reason"].str.strip().ne("").all() and quarantine["field"].str.strip().ne("").all()
    assert kept.isdisjoint(quarantined), "a row both kept and quarantined"
    assert kept | quarantined == set(expected), "a row neither kept nor quarantined"
    bad = {line for line, outcome in expected.items() if outcome == "bad"}
    good = {line for line, outcome in expected.items() if outcome == "good"}
    assert bad <= quarantined, f"bad rows kept: {sorted(bad - quarantined)}"
    assert good <= kept, f"good rows quarantined: {quarantine[quarantine['line'].astype(int).isin(good)]}"


def test_a_wav_whose_header_says_zero_hz_is_one_quarantined_row(tmp_path):
    """The crash that started this: ZeroDivisionError out of the prepare stage."""
    with pytest.raises(BadAudioError, match="0 Hz"):
        load_audio(_wav(rate=0), RATE, 0.05)
    row = {"question": "q", "width": "2", "shop": "y", "label": "a", "split": "train", "image": GOOD_PNG}
    expected, kept, quarantine = _run(tmp_path, [(row, ("audio", _wav(rate=0), "bad"))])
    bad_line = max(expected)
    assert kept == set(expected) - {bad_line}
    [row] = quarantine.to_dict("records")
    assert (row["line"], row["field"]) == (str(bad_line), "audio") and "0 Hz" in row["reason"]


def test_an_absurd_sample_rate_is_resampled_quickly_or_refused():
    """A corrupt header may claim any rate: no polyphase filter with billions of taps."""
    out = load_audio(_wav(rate=2**31 - 1, bits=8), RATE, 0.05)
    assert out.shape == (50,) and np.isfinite(out).all()
