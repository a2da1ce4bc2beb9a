"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package as image-caption pairs, nothing downloaded.

``apt-get install dataset-fashion-mnist`` puts the four idx files (60k train, 10k test, 28x28 grey) under
``/usr/share/datasets/fashion-mnist/``. The importer writes each kept image as a PNG and one row per
image with a caption: one of ``TEMPLATES`` (drawn at random, seeded) around the class's ``PHRASES`` entry,
its name and what kind of thing it is ("a photo of a sandal, an open shoe worn on the foot"). Two classes
(``HELD_OUT``) are kept out of train and val, so the test split measures zero-shot classification of
classes the model never saw an image of.

**Why the captions say what kind of thing each class is.** Zero-shot transfer to a new class goes
through the text: the image tower learns to land near the training captions, and a new caption is
recognised only as far as its embedding shares directions with them. A bare name gives the frozen MiniLM
little to share: in its space "a photo of a sandal" is nearer "shirt" and "bag" than "sneaker" or "ankle
boot", and "pullover" is nearer 7 of the 8 trained classes (all but bag) than "sandal" is, so with
captions "a photo of a {class}" a model trained on 8 classes put the held-out sandal and pullover images
the wrong way round (18% between the two, chance 50%; a linear or a frozen isometric text projection
instead of the MLP stayed below chance too: bench/clip_ablation.py). With attribute words (shoe, worn on
the foot, top, upper body, sleeves) that the trained classes share with the held-out ones, the same
model tells them apart 99-100% of the time (bench/clip.py, bench/clip_ablation.py). The phrases are a
fixed description of all 10 classes, written once from what the garments are; the held-out classes'
phrases are only read at test time, as their names are. Several templates give the text projection more
than 8 distinct captions to fit, and evaluation averages each class over them.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("mmops.import")

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = (
    "install Debian's dataset-fashion-mnist (`sudo apt-get install dataset-fashion-mnist`), or pass "
    "--from a folder holding the four *-idx?-ubyte.gz files"
)
# Index = the label in the idx files (Zalando's order); names as a caption would say them.
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
#: Classes with no image in train or val: each has relatives that are trained on (sneaker and ankle boot
#: for sandal; coat and shirt for pullover), which is what zero-shot transfer through the text can use.
HELD_OUT = ("sandal", "pullover")
#: What each class is, in words the classes share: a caption, and a zero-shot label, is "<template> <phrase>".
PHRASES = {
    "t-shirt": "t-shirt, a short-sleeved top worn on the upper body",
    "trouser": "trouser, long pants worn on the legs",
    "pullover": "pullover, a long-sleeved knitted top worn on the upper body",
    "dress": "dress, a one-piece garment worn on the body",
    "coat": "coat, long-sleeved outerwear worn on the upper body",
    "sandal": "sandal, an open shoe worn on the foot",
    "shirt": "shirt, a top with a collar and buttons worn on the upper body",
    "sneaker": "sneaker, a low sports shoe worn on the foot",
    "bag": "bag, a carried accessory with a handle",
    "ankle boot": "ankle boot, a high shoe worn on the foot",
}
#: Caption templates, one drawn per image (CLIP's prompt ensembling; also the retrieval task's templates).
TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "a black and white photo of a {}",
    "a low resolution photo of a {}",
    "a product photo of a {}",
    "an image of a {}",
)
COLUMNS = ["image", "caption", "label", "class", "split", "image_id", "zero_shot"]


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or plain) as an array: magic, dimension sizes (big-endian), then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes; {INSTALL}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} bytes of data for shape {shape}: the file is truncated; {INSTALL}")
    return body.reshape(shape)


def load(source: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` from the idx files in ``source``."""
    folder = Path(source or DEFAULT_DIR)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        paths = [
            next(
                (
                    folder / f"{prefix}-{kind}-idx{n}-ubyte{ext}"
                    for ext in (".gz", "")
                    if (folder / f"{prefix}-{kind}-idx{n}-ubyte{ext}").is_file()
                ),
                None,
            )
            for kind, n in (("images", 3), ("labels", 1))
        ]
        if None in paths:
            raise FileNotFoundError(
                f"{folder}: no {prefix}-images-idx3-ubyte.gz / {prefix}-labels-idx1-ubyte.gz; {INSTALL}"
            )
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max() >= len(CLASSES):
            raise ValueError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match "
                f"Fashion-MNIST; {INSTALL}"
            )
        out[split] = (images, labels)
    return out


def import_fashion_mnist(
    source: Path | None,
    out_dir: Path,
    limit: int = 0,
    val_fraction: float = 0.1,
    seed: int = 0,
    held_out: tuple[str, ...] = HELD_OUT,
) -> Path:
    """Write ``out_dir/manifest.csv`` and the PNGs it names. ``limit`` keeps N images of each split,
    drawn at random (seeded) so every class stays; val is ``val_fraction`` of the train images."""
    from PIL import Image

    unknown = sorted(set(held_out) - set(CLASSES))
    if unknown:
        raise ValueError(f"held-out classes {unknown} are not Fashion-MNIST classes: {', '.join(CLASSES)}")
    data = load(source)
    rng = np.random.default_rng(seed)
    pick = np.random.default_rng([seed, 1])  # templates from their own stream: the images kept stay the same
    held = {CLASSES.index(c) for c in held_out}
    rows = []
    for package_split, (images, labels) in data.items():
        order = rng.permutation(len(images))
        if package_split == "train":
            order = order[~np.isin(labels[order], list(held))]  # held-out classes: never an image in training
            n_val = round(val_fraction * len(order))
            parts = {"val": order[:n_val], "train": order[n_val:]}
        else:
            parts = {"test": order}
        for split, positions in parts.items():
            keep = np.sort(positions[:limit] if limit else positions)
            folder = out_dir / "images" / package_split
            folder.mkdir(parents=True, exist_ok=True)
            for i in keep:
                rel = f"images/{package_split}/{i:05d}.png"
                if not (out_dir / rel).exists():
                    Image.fromarray(images[i]).save(out_dir / rel)  # 2-D uint8: a grey PNG
                name = CLASSES[labels[i]]
                caption = TEMPLATES[pick.integers(len(TEMPLATES))].format(PHRASES[name])
                rows.append(
                    {
                        "image": rel,
                        "caption": caption,
                        "label": name,
                        "class": name,
                        "split": split,
                        "image_id": f"{package_split}/{i}",
                        "zero_shot": bool(labels[i] in held),
                    }
                )
    manifest = out_dir / "manifest.csv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(manifest, index=False)
    log.info("fashion-mnist: %d images, %s held out of train and val", len(rows), ", ".join(held_out))
    return manifest
