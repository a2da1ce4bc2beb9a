"""`mmops init --template captioning` -> an image folder with caption sidecars -> import -> run -> bento ->
HTTP /caption: a test image gets one of its own references; bad requests get a 4xx naming the field, and
the service still answers afterwards. `mmops caption` decodes the same way."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import mmops, serve_bento
from PIL import Image

pytestmark = pytest.mark.slow

COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 190, 40)}
PHRASINGS = ("a {} picture", "a {} square", "all {}")


def _image(colour: tuple[int, int, int], seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-25, 25, (16, 16, 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def _folder(incoming: Path) -> None:
    """Solid colours with a little noise; each image's sidecar holds three phrasings of its colour."""
    for split, per_colour in (("train", 14), ("test", 2)):
        for c, (name, rgb) in enumerate(COLOURS.items()):
            for i in range(per_colour):
                stem = incoming / split / f"{name}_{i}"
                stem.parent.mkdir(parents=True, exist_ok=True)
                _image(rgb, 100 * c + i + (1000 if split == "test" else 0)).save(stem.with_suffix(".png"))
                stem.with_suffix(".txt").write_text("\n".join(p.format(name) for p in PHRASINGS) + "\n")


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_captioning_template_from_sidecars_to_served_captions(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    mmops(tmp_path, "init", str(root), "--template", "captioning")
    _folder(root / "incoming")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source="imagefolder", path="incoming", image_size=16, val_fraction=0.2)
    params["inputs"]["image"]["params"]["channels"] = [8, 16]
    params["target"]["params"].update(max_length=6, num_beams=2)
    params["train"].update(epochs=12, patience=12, head_hidden=32, batch_size=16, lr=0.005)
    params["candidates"] = params["candidates"][:1]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())  # the README's step for your own files
    dvc["stages"]["import"].update(deps=["incoming"], params=["data.source", "data.path", "data.limit"])
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))

    mmops(root, "data", "import")
    assert "0 bad" in mmops(root, "data", "validate").stdout
    run = mmops(root, "run", timeout=900)
    best = json.loads((root / "metrics" / "best.json").read_text())
    for metric in ("cider", "bleu_1", "bleu_4", "rouge_l", "exact_match"):
        assert metric in best["test"], best["test"]
    bento = re.search(r"bento: (\S+)", run.stdout).group(1)

    tests = sorted((root / "incoming" / "test").glob("*.png"))
    references = {p: {ph.format(p.stem.split("_")[0]) for ph in PHRASINGS} for p in tests}
    cli = json.loads(mmops(root, "caption", *map(str, tests), "--json").stdout)
    assert sum(row["caption"] in references[Path(row["image"])] for row in cli) >= len(tests) - 1, cli

    with serve_bento(root, bento) as (url, _):
        answer = httpx.post(f"{url}/caption", json={"images": [_b64(p) for p in tests], "num_beams": 3}, timeout=60)
        assert answer.status_code == 200, answer.text
        served = answer.json()
        assert sum(a["caption"] in references[p] for a, p in zip(served, tests, strict=True)) >= len(tests) - 1
        assert all(a["score"] <= 0 and a["model"] for a in served)
        greedy = httpx.post(
            f"{url}/caption", json={"images": [_b64(tests[0])], "num_beams": 1, "max_length": 2}, timeout=30
        )
        assert greedy.status_code == 200 and len(greedy.json()[0]["caption"].split()) <= 2, greedy.text

        text = base64.b64encode(b"this is not an image").decode()
        bad = {
            "not an image": ({"images": [text]}, "images[0].image"),
            "beams 0": ({"images": [_b64(tests[0])], "num_beams": 0}, "num_beams"),
            "beams 99": ({"images": [_b64(tests[0])], "num_beams": 99}, "num_beams"),
            "length 0": ({"images": [_b64(tests[0])], "max_length": 0}, "max_length"),
            "length over the model's": ({"images": [_b64(tests[0])], "max_length": 7}, "max_length"),
            "no images": ({"images": []}, "images"),
        }
        for name, (body, words) in bad.items():
            r = httpx.post(f"{url}/caption", json=body, timeout=30)
            assert 400 <= r.status_code < 500 and words in r.text, (name, r.status_code, r.text)
        empty = httpx.post(f"{url}/caption", content=b"", headers={"content-type": "application/json"}, timeout=30)
        assert 400 <= empty.status_code < 500, empty.text
        png = io.BytesIO()
        _image(COLOURS["blue"], 7).save(png, format="PNG")
        again = httpx.post(f"{url}/caption", json={"images": [base64.b64encode(png.getvalue()).decode()]}, timeout=30)
        assert again.status_code == 200 and again.json()[0]["caption"] in {p.format("blue") for p in PHRASINGS}
