"""Image captioning on easy-VQA captions: test metrics, and beam search against greedy on the same model.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/captioning.py             # full data (3,220 train images)
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/captioning.py --limit 300 --epochs 2   # a quick look

A project is made from the `captioning` template (`mmops init`), imported (`mmops data import`: easy-VQA as
three phrasings per image) and prepared with the CLI; its first candidate is trained by the training loop
itself (no Prefect, DVC or registry). The model is the template's as a user gets it (64 px images, the
trained cnn_image, decoder width and layers, learning rate, batch size, epochs): an option given here
overrides that one key only. The selected model then captions the test images greedily and with
beam search: CIDEr-D, BLEU, ROUGE-L and exact match for each, and captions per second (distinct images
decoded per second of wall time, the image encoder included). By default no colour-shape pair is held
out; with --zero-shot-pairs default four pairs are test-only (compositional zero-shot) and exact match
is also given on the seen pairs and on those. Output: bench/results/captioning.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MMOPS = str(REPO / ".venv" / "bin" / "mmops")


def make_project(
    root: Path,
    limit: int,
    epochs: int | None,
    image_size: int | None,
    width: int | None,
    batch_size: int | None,
    zero_shot_pairs: str,
    lr: float | None = None,
) -> Path:
    """The captioning template's project, its first candidate only; None keeps the template's value."""
    subprocess.run([MMOPS, "init", str(root), "--template", "captioning"], check=True, capture_output=True)
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    params["data"].update(limit=limit, zero_shot_pairs=zero_shot_pairs, **given(image_size=image_size))
    params["train"].update(given(epochs=epochs, head_hidden=width, batch_size=batch_size, lr=lr))
    params["train"]["patience"] = params["train"]["epochs"]  # every epoch runs; the best on val is kept
    params["candidates"] = params["candidates"][:1]
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    for step in (["data", "import"], ["data", "prepare"], ["data", "featurize"]):
        subprocess.run([MMOPS, *step], cwd=root, check=True, capture_output=True)
    return root


def decode(model, data, rows, beams: int, batch_size: int) -> tuple[dict, np.ndarray, float]:
    from mmops.training.loop import Batcher, _group_key, evaluation_groups, predict_split

    model.task.num_beams = beams
    started = time.perf_counter()
    scores = predict_split(model, Batcher(data, rows, model.encoders, batch_size, _group_key(model)), data.precomputed)
    seconds = time.perf_counter() - started
    metrics = model.task.evaluate(data.targets(rows), scores, evaluation_groups(model.task, rows))
    return metrics, scores, seconds


def _share(generated: dict[int, str], refs: dict[int, set[str]], images: list[int]) -> float | None:
    """Exact match over some images (None when there are none)."""
    return round(float(np.mean([generated[i] in refs[i] for i in images])), 4) if images else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="images per split (0 = all)")
    parser.add_argument("--epochs", type=int, help="default: the template's train.epochs")
    parser.add_argument("--image-size", type=int, help="default: the template's data.image_size")
    parser.add_argument("--width", type=int, help="decoder width (train.head_hidden); default: the template's")
    parser.add_argument("--lr", type=float, help="peak learning rate; default: the template's train.lr")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--batch-size", type=int, help="default: the template's train.batch_size")
    parser.add_argument(
        "--zero-shot-pairs",
        choices=("none", "default"),
        default="none",
        help="default: hold four colour-shape pairs out of train (test-only, as for CLIP)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "captioning.json")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmops.config import load_params
    from mmops.core.model import MultimodalModel
    from mmops.training.loop import Dataset, train_candidate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # one line an epoch
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(
            Path(tmp) / "captions",
            args.limit,
            args.epochs,
            args.image_size,
            args.width,
            args.batch_size,
            args.zero_shot_pairs,
            args.lr,
        )
        params = load_params(root / "params.yaml")
        train = params.train_for(params.candidates[0])
        image = params.inputs["image"]
        data = Dataset.load(root / "data" / "prepared", root / "data" / "features", params)
        started = time.perf_counter()
        result = train_candidate(params, params.candidates[0], data, root / "models" / "decoder")
        train_seconds = time.perf_counter() - started
        model = MultimodalModel.load(root / "models" / "decoder")
        test = data.split("test")
        manifest = pd.read_csv(root / "data" / "raw" / "manifest.csv")
        zero_shot_pairs = set(manifest.loc[manifest["zero_shot"].astype(bool), "label"])
        images = test.drop_duplicates("image_idx")
        runs = {}
        for name, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
            metrics, scores, seconds = decode(model, data, test, beams, 256)
            captions = model.task.captions(scores)
            refs: dict[int, set[str]] = {}
            for idx, caption in zip(test["image_idx"], data.targets(test), strict=True):
                refs.setdefault(int(idx), set()).add(str(caption))
            first = {int(i): captions[p] for p, i in zip(images.index, images["image_idx"], strict=True)}
            held = [i for i in first if any(p in " | ".join(refs[i]) for p in zero_shot_pairs)]
            seen = [i for i in first if i not in set(held)]
            runs[name] = {
                "num_beams": beams,
                **{k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
                "images": metrics["images"],
                "exact_match_seen_pairs": _share(first, refs, seen),
                "exact_match_zero_shot_pairs": _share(first, refs, held),
                "zero_shot_images": len(held),
                "seconds": round(seconds, 2),
                "captions_per_s": round(metrics["images"] / seconds, 1),
                "examples": [{"references": sorted(refs[i]), "generated": first[i]} for i in list(first)[:3]],
            }
            print(name, json.dumps({k: v for k, v in runs[name].items() if k != "examples"}))
        out = {
            "data": {
                "source": "easy-vqa --as captions",
                "limit": args.limit,
                "image_size": params.data.image_size,
                "zero_shot_pairs_option": args.zero_shot_pairs,
                "rows": {s: int((data.rows["split"] == s).sum()) for s in ("train", "val", "test")},
                "test_images": len(images),
                "zero_shot_pairs": sorted(zero_shot_pairs),
            },
            "model": {
                "encoder": f"{image.encoder} {dict(image.params)} (trained)",
                "decoder_width": train.head_hidden,
                "layers": model.task.layers,
                "vocabulary": len(model.task.labels),
            },
            "training": {
                "epochs_run": result["epochs_run"],
                "best_epoch": result["best_epoch"],
                "batch_size": train.batch_size,
                "lr": train.lr,
                "val_exact_match": [round(h["val_exact_match"], 4) for h in result["history"]],
                "epoch_seconds": [round(h["seconds"], 1) for h in result["history"]],
                "seconds": round(train_seconds, 1),
                "val_cider": result["history"][result["best_epoch"] - 1]["val_cider"],
            },
            "test": runs,
            "machine": {
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "load_avg_at_end": os.getloadavg()[0],
            },
            "note": "2 cores shared with other work while measured; captions/s is wall time",
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
