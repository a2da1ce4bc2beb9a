"""Measured CLIP runs for README and docs/retrieval.md: a retrieval project trained through the CLI.

    nice -n 5 .venv/bin/python bench/clip.py easy-vqa        # -> bench/results/clip_easyvqa.json
    nice -n 5 .venv/bin/python bench/clip.py fashion-mnist   # -> bench/results/clip_fashion_mnist.json

Each makes a project with `mmops init --template retrieval`, sets the data set and a CPU-sized recipe
(frozen MiniLM text tower, cached; a CNN image tower trained from scratch), runs `mmops data import`
and `mmops run --no-bento`, and writes the shipped model's val and test metrics with chance levels.
Fashion-MNIST also fits a linear probe (logistic regression) on the image tower's embeddings over all
10 classes (trained on the train split's images, scored on test's), the usual test of what a
contrastively trained tower has learned, and zero-shot between the 2 held-out classes only, through the
served /zero_shot path: labelled by their phrases (what the importer's captions say: "sandal, an open
shoe worn on the foot"), and by their bare names for comparison. The serving templates are the
importer's caption templates (mmops/data/fashion_mnist.py explains both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MMOPS = str(Path(sys.executable).with_name("mmops"))

RECIPES = {
    "easy-vqa": {
        "data": {"source": "easy-vqa", "limit": 0, "image_size": 32},
        "target_column": "label",
        "channels": [16, 32, 64],
        "train": {"epochs": 5, "patience": 2, "batch_size": 128, "lr": 0.003},
    },
    "fashion-mnist": {
        "data": {"source": "fashion-mnist", "limit": 8000, "image_size": 28},
        "target_column": "label",
        "channels": [32, 64, 128],
        "train": {"epochs": 8, "patience": 2, "batch_size": 128, "lr": 0.003, "threads": 1},
        "templates": "fashion-mnist",  # /zero_shot's templates: the importer's caption templates
    },
}


def _mmops(root: Path, *args: str) -> str:
    done = subprocess.run(
        [MMOPS, *args, "-p", str(root)] if args[0] != "init" else [MMOPS, *args],
        capture_output=True,
        text=True,
        cwd=root if root.exists() else None,
    )
    if done.returncode:
        raise SystemExit(f"mmops {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def make_project(root: Path, dataset: str, limit: int | None) -> dict:
    recipe = RECIPES[dataset]
    if not (root / "params.yaml").is_file():  # a kept project is reused: DVC skips the unchanged data stages
        _mmops(root, "init", str(root), "--template", "retrieval")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(recipe["data"])
    if limit is not None:
        params["data"]["limit"] = limit
    params["target"]["column"] = recipe["target_column"]
    params["inputs"]["image"]["params"]["channels"] = recipe["channels"]
    params["train"].update(recipe["train"])
    if recipe.get("templates") == "fashion-mnist":
        from mmops.data.fashion_mnist import TEMPLATES

        params["target"]["params"]["templates"] = list(TEMPLATES)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def linear_probe(root: Path, per_class: int = 500, test_images: int = 3000) -> dict:
    """Logistic regression on the shipped image tower's embeddings over all 10 classes (the two held out
    of contrastive training included): ``per_class`` train images of each class from the package's
    train set, scored on the first ``test_images`` of its test set."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    from mmops.data.fashion_mnist import CLASSES, load
    from mmops.serving.retrieval import Embedder

    best = json.loads((root / "metrics" / "best.json").read_text())["best"]
    embedder = Embedder.from_model_dir(root / "models" / best)
    data = load()
    rng = np.random.default_rng(0)
    train_images, train_labels = data["train"]
    picked = np.concatenate(
        [rng.choice(np.flatnonzero(train_labels == c), per_class, replace=False) for c in range(10)]
    )
    test_all, test_labels = data["test"]

    def embed(images: np.ndarray) -> np.ndarray:
        def png(a: np.ndarray) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            return buf.getvalue()

        return np.concatenate(
            [embedder.embed_images([png(a) for a in images[i : i + 256]]) for i in range(0, len(images), 256)]
        )

    x_train, x_test = embed(train_images[picked]), embed(test_all[:test_images])
    probe = LogisticRegression(max_iter=3000, C=10.0).fit(x_train, train_labels[picked])
    predicted = probe.predict(x_test)
    truth = test_labels[:test_images]
    return {
        "accuracy": float((predicted == truth).mean()),
        "train_images": len(picked),
        "test_images": int(test_images),
        "classes": 10,
        "per_class": {CLASSES[c]: float((predicted[truth == c] == c).mean()) for c in range(10)},
        "features": "the image tower's unit embeddings (after the projection head)",
    }


def held_out_two_way(root: Path) -> dict:
    """Zero-shot among the held-out classes only (chance 1/2): the test images of sandal and pullover
    against those two labels through the served /zero_shot path (each label through every template,
    averaged). The labels are the classes' phrases, as the captions word them; ``names_only`` asks with
    the bare class names instead."""
    import numpy as np
    import pandas as pd

    from mmops.data.fashion_mnist import HELD_OUT, PHRASES
    from mmops.serving.retrieval import Embedder

    best = json.loads((root / "metrics" / "best.json").read_text())["best"]
    embedder = Embedder.from_model_dir(root / "models" / best)
    rows = pd.read_csv(root / "data" / "raw" / "manifest.csv")
    rows = rows[(rows["split"] == "test") & rows["label"].isin(HELD_OUT)]
    vectors = embedder.embed_images([(root / "data" / "raw" / p).read_bytes() for p in rows["image"]])

    def accuracy(labels: list[str]) -> dict:
        answers = embedder.zero_shot(vectors, labels)
        truth = [labels[HELD_OUT.index(c)] for c in rows["label"]]
        right = np.asarray([a["answer"] == t for a, t in zip(answers, truth, strict=True)])
        per_class = {c: float(right[(rows["label"] == c).to_numpy()].mean()) for c in HELD_OUT}
        return {"accuracy": float(right.mean()), "per_class": per_class, "labels": labels}

    return {
        **accuracy([PHRASES[c] for c in HELD_OUT]),
        "images": len(rows),
        "chance": 1 / len(HELD_OUT),
        "templates": embedder.task.templates,
        "names_only": accuracy(list(HELD_OUT)),
    }


def zero_shot_summary(out: dict) -> dict:
    """The zero-shot figures against their chance levels, from the test metrics and the 2-way check."""
    test, two = out["test"], out["held_out_two_way"]
    return {
        "all_classes_top1": test["zeroshot_top1"],
        "all_classes_chance": test["zeroshot_chance"],
        "held_out_top1_among_all": test["unseen_top1"],
        "held_out_images": test["unseen_images"],
        "held_out_top1_among_all_chance": test["zeroshot_chance"],
        "seen_top1": test["seen_i2t_r1"],
        "held_out_two_way": two["accuracy"],
        "held_out_two_way_names_only": two["names_only"]["accuracy"],
        "held_out_two_way_chance": two["chance"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(RECIPES))
    parser.add_argument("--limit", type=int, default=None, help="data.limit override (a quick check)")
    parser.add_argument("--keep", type=Path, default=None, help="project folder to keep (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--extras-only",
        action="store_true",
        help="Fashion-MNIST: add the 2-way held-out zero-shot to the results of a kept project",
    )
    args = parser.parse_args()
    if args.extras_only:
        path = args.out or ROOT / "bench" / "results" / "clip_fashion_mnist.json"
        out = json.loads(path.read_text())
        out["held_out_two_way"] = held_out_two_way(args.keep.resolve())
        out["zero_shot"] = zero_shot_summary(out)
        path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(out["held_out_two_way"])
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp) / "proj").resolve()
        params = make_project(root, args.dataset, args.limit)
        started = time.perf_counter()
        _mmops(root, "data", "import")
        _mmops(root, "run", "--no-bento")
        wall = time.perf_counter() - started
        best = json.loads((root / "metrics" / "best.json").read_text())
        result_path = root / "models" / best["best"] / "result.json"
        result = json.loads(result_path.read_text())
        out = {
            "dataset": args.dataset,
            "params": {k: params[k] for k in ("data", "inputs", "target", "train")},
            "best_epoch": result["best_epoch"],
            "epochs_run": result["epochs_run"],
            "train_seconds": round(result["train_seconds"], 1),
            "wall_seconds": round(wall, 1),
            "val": result["metrics"]["val"],
            "test": result["metrics"]["test"],
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "note": "2 shared cores, nice -n 5, 1 torch thread",
            },
        }
        if args.dataset == "fashion-mnist":
            out["linear_probe"] = linear_probe(root)
            out["held_out_two_way"] = held_out_two_way(root)
            out["zero_shot"] = zero_shot_summary(out)
        name = {"easy-vqa": "clip_easyvqa", "fashion-mnist": "clip_fashion_mnist"}[args.dataset]
        path = args.out or ROOT / "bench" / "results" / f"{name}.json"
        path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        test = out["test"]
        print(
            f"{args.dataset}: test i2t R@1 {test['i2t_r1']:.4f}  t2i R@10 {test['t2i_r10']:.4f}  "
            f"zero-shot top-1 {test['zeroshot_top1']:.4f} (chance {test['zeroshot_chance']:.4f})  "
            f"unseen top-1 {test.get('unseen_top1')}  -> {path}"
        )


if __name__ == "__main__":
    main()
