"""Small bring-your-own-data sets written as files, for end-to-end tests of the manifest importer.

A data set is what a user would drop into a project's ``incoming/`` folder: ``manifest.csv`` plus the
images and WAV files it names. Each target is a known function of the inputs, so a tiny model trained
for a few CPU epochs must do well above chance; a pipeline that ignores an input, misreads a column or
shuffles rows against their files shows up as accuracy near chance rather than as a crash.

* classification, ``label`` in {red, green, blue}: the image's dominant colour; half the rows also name
  the colour in the text, the other half play a tone whose pitch (low, mid, high) gives the class;
* regression, ``score``: a linear function of width, height, the tone's pitch index and the colour index,
  plus small noise;
* multilabel, ``tags``: "|"-joined subset of {bright, loud, large} from the image's brightness, the
  tone's amplitude and ``width > 52``; every row has at least one tag.

About 10% of rows have no audio (an empty cell) to exercise ``missing: learn``. Everything derives
from ``seed``: the same call writes the same bytes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import wavfile

KINDS = ("classification", "regression", "multilabel")
TARGETS = {"classification": "label", "regression": "score", "multilabel": "tags"}
COLUMNS = ("text", "image", "audio", "width", "height", "shop")
COLOURS = ("red", "green", "blue")
TONES_HZ = (330.0, 880.0, 2200.0)  # low / mid / high: well apart on a mel scale, below 8 kHz's Nyquist
SAMPLE_RATE = 8000
SECONDS = 0.5
IMAGE_SIZE = 24
SHOPS = ("north", "south", "east", "west")
NOUNS = ("mug", "lamp", "chair", "kite", "box", "shoe")
NEUTRAL = ("small", "old", "plain", "shiny", "new", "round")  # never a colour word
WIDTH_THRESHOLD = 52  # multilabel `large`
MISSING_AUDIO = 0.1
TRAIN_FRACTION = 0.8


def write_dataset(root: Path, kind: str = "classification", n: int = 240, seed: int = 0) -> Path:
    """Write ``n`` examples under ``root`` (a project's ``incoming/``) and return the manifest's path.

    Files: ``images/<i>.png`` (24x24 RGB), ``audio/<i>.wav`` (0.5 s, 8 kHz, int16 mono sine tone) and
    ``manifest.csv`` with columns text, image, audio, width, height, shop, the target (``label``,
    ``score`` or ``tags``) and split (80% train, 20% test). Paths in it are relative to ``root``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got '{kind}'")
    if n < 5:
        raise ValueError("n: at least 5 rows, so both splits have some")
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)

    order = rng.permutation(n)
    n_train = round(n * TRAIN_FRACTION)
    splits = np.empty(n, dtype=object)
    splits[order[:n_train]] = "train"
    splits[order[n_train:]] = "test"

    rows = []
    for i in range(n):
        colour = int(rng.integers(3))
        mirror_text = bool(rng.random() < 0.5)
        # Classification: the tone carries the class where the text does not; otherwise it is noise.
        tone = colour if kind == "classification" and not mirror_text else int(rng.integers(3))
        brightness = float(rng.uniform(0.45, 1.0))
        amplitude = float(rng.uniform(0.6, 0.9) if rng.random() < 0.5 else rng.uniform(0.05, 0.15))
        width, height = int(rng.integers(8, 97)), int(rng.integers(8, 97))
        shop = SHOPS[int(rng.integers(len(SHOPS)))]
        has_audio = bool(rng.random() >= MISSING_AUDIO)

        if kind == "classification":
            target = COLOURS[colour]
        elif kind == "regression":
            noise = float(rng.normal(0, 0.1))
            target = f"{0.04 * width + 0.03 * height + 1.5 * tone + 2.0 * colour + noise:.4f}"
        else:
            tags = _tags(brightness, amplitude, width)
            if not tags:  # make one tag true by changing the input it comes from, so tags stay consistent
                forced = int(rng.integers(3))
                if forced == 0:
                    brightness = float(rng.uniform(0.8, 1.0))
                elif forced == 1:
                    amplitude = float(rng.uniform(0.6, 0.9))
                else:
                    width = int(rng.integers(WIDTH_THRESHOLD + 1, 97))
                tags = _tags(brightness, amplitude, width)
            target = "|".join(tags)

        word = COLOURS[colour] if kind != "multilabel" and mirror_text else NEUTRAL[int(rng.integers(len(NEUTRAL)))]
        text = f"a {word} {NOUNS[int(rng.integers(len(NOUNS)))]} from the {shop} shop"

        image = f"images/{i}.png"
        Image.fromarray(_image(rng, colour, brightness), "RGB").save(root / image, format="PNG")
        audio = f"audio/{i}.wav"
        wave = _tone(rng, TONES_HZ[tone], amplitude)  # drawn even when not written: later rows stay the same
        if has_audio:
            wavfile.write(root / audio, SAMPLE_RATE, wave)
        rows.append([text, image, audio if has_audio else "", width, height, shop, target, splits[i]])

    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*COLUMNS, TARGETS[kind], "split"])
        writer.writerows(rows)
    return manifest


def _tags(brightness: float, amplitude: float, width: int) -> list[str]:
    flags = {"bright": brightness > 0.75, "loud": amplitude > 0.4, "large": width > WIDTH_THRESHOLD}
    return [tag for tag, on in flags.items() if on]


def _image(rng: np.random.Generator, colour: int, brightness: float) -> np.ndarray:
    """A field of ``colour`` with a smaller square of another colour and pixel noise: the colour dominates."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 30.0)
    img[..., colour] = 230.0
    other = (colour + 1 + int(rng.integers(2))) % 3
    side = IMAGE_SIZE // 3
    y, x = (int(v) for v in rng.integers(0, IMAGE_SIZE - side, size=2))
    img[y : y + side, x : x + side] = 30.0
    img[y : y + side, x : x + side, other] = 230.0
    img = img * brightness + rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _tone(rng: np.random.Generator, hz: float, amplitude: float) -> np.ndarray:
    t = np.arange(round(SAMPLE_RATE * SECONDS)) / SAMPLE_RATE
    wave = amplitude * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.01, t.shape)
    return (np.clip(wave, -1, 1) * 32767).astype(np.int16)


def write_bad_rows(manifest: Path) -> list[int]:
    """Append one row per known problem to ``manifest`` and return their line numbers (header = line 1).

    Each bad row copies a complete good row and breaks one field, so the expected quarantine reason is
    unambiguous: a missing image file, corrupt image bytes, an image path escaping the data root, a
    non-numeric width, an empty target. Order of the returned lines is that order.
    """
    manifest = Path(manifest)
    with manifest.open(newline="") as f:
        records = list(csv.reader(f))
    header, data = records[0], records[1:]
    if len(records) != len(manifest.read_text().splitlines()):
        raise ValueError(f"{manifest}: a cell spans lines; line numbers would not match records")
    target = next((c for c in TARGETS.values() if c in header), None)
    if target is None:
        raise ValueError(f"{manifest}: no target column ({', '.join(TARGETS.values())}) in {header}")
    base = dict(zip(header, next(r for r in data if all(r)), strict=True))

    corrupt = manifest.parent / "images" / "corrupt.png"
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 8)
    problems = [
        {"image": "images/does-not-exist.png"},
        {"image": "images/corrupt.png"},
        {"image": "../../etc/passwd"},
        {"width": "wide"},
        {target: ""},
    ]
    text = manifest.read_text()
    with manifest.open("a", newline="") as f:
        if text and not text.endswith("\n"):
            f.write("\n")
        writer = csv.writer(f, lineterminator="\n")
        for change in problems:
            writer.writerow([{**base, "split": "train", **change}.get(c, "") for c in header])
    first = len(records) + 1
    return list(range(first, first + len(problems)))
