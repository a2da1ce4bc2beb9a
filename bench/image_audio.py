"""Image + audio, neither alone enough: every built-in fusion, 3 seeds, speaker- and image-disjoint.

    .venv/bin/python bench/image_audio.py ../shared/data/fsdd-5                 # the README figures
    .venv/bin/python bench/image_audio.py ../shared/data/fsdd-5 --fusions concat --seeds 1 --per-digit 4 \
        --audio-epochs 2
                                                                                # a quick check

Task: a spoken digit (FSDD, real recordings, CC BY-SA 4.0) and a handwritten digit (scikit-learn's
``load_digits``, the UCI 8x8 scans); the label is their sum modulo 10. Either input alone is at chance
(10%); only a model that combines them can do better. Splits: the test speaker and a third of the
images are only in test; the val speaker (``data.val_groups``) and another third only in val; three
speakers and the last third train. Each recording is paired with ``--pairs`` random images of its split.

Two stages, as a user of mmops would run them on a CPU:

1. an audio-only model (``mel_audio`` with its defaults) on the train speakers' recordings, selected on
   the val speaker;
2. every fusion over that audio encoder (``init_from`` its artifact, ``freeze: true``: features cached by
   featurize) and raw pixels (``pixels``, 8x8 grey), with the classification template's train settings
   and each fusion's default parameters, for each seed. Selection uses the mean val accuracy over seeds.

``--recipe`` adds a row for ``concat`` with train.ema 0.99, smoothing 3, 30 epochs and
patience 6 (the issue-16 recipe) next to the template's 10 epochs and patience 3.
Output: ``bench/results/image_audio.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
FUSIONS = [
    "early_concat",
    "concat",
    "product",
    "weighted_sum",
    "attention",
    "cross_attention",
    "gated",
    "tensor",
    "low_rank_tensor",
    "film",
    "late",
    "mm_transformer",
    "mult",
]
RECIPE = {"ema": 0.99, "smoothing": 3, "epochs": 30, "patience": 6}


def template_train() -> dict:
    """The classification template's train section (what `mmops init` writes), threads left to us."""
    raw = yaml.safe_load((REPO / "mmops" / "templates" / "classification" / "params.yaml").read_text())
    return {k: v for k, v in raw["train"].items() if k != "threads"}


def audio_encoder_params(changed: dict) -> dict:
    """The mel_audio parameters stage 1 trained with: its defaults, and which of them ``--audio-params`` changed."""
    from mmops_plugins.encoders.mel_audio import MelAudioEncoder

    return {"defaults_changed": changed, **MelAudioEncoder(sample_rate=8000, **changed).config()}


def build_data(args: argparse.Namespace, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Copies the recordings, writes the digit images, returns (clips, pairs) manifests."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(args.seed)
    (root / "recordings").mkdir(parents=True)
    clips = []
    for path in sorted((args.data / "recordings").glob("*.wav")):
        m = re.fullmatch(r"(\d)_([a-z]+)_(\d+)\.wav", path.name)
        if m and int(m.group(3)) < args.per_digit:
            shutil.copy(path, root / "recordings" / path.name)
            clips.append({"audio": f"recordings/{path.name}", "speaker": m.group(2), "spoken": int(m.group(1))})
    clips = pd.DataFrame(clips)
    role = {args.test_speaker: "test", args.val_speaker: "val"}
    clips["part"] = clips["speaker"].map(lambda s: role.get(s, "train"))
    digits = load_digits()
    (root / "images").mkdir()
    order = rng.permutation(len(digits.target))
    thirds = np.array_split(order, 3)
    images = {part: [] for part in ("train", "val", "test")}
    for part, idx in zip(("train", "val", "test"), thirds, strict=True):
        for i in idx:
            name = f"images/{i}.png"
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(root / name)
            images[part].append((name, int(digits.target[i])))
    pairs = []
    for clip in clips.itertuples(index=False):
        pool = images[clip.part]
        for j in rng.choice(len(pool), args.pairs, replace=False):
            name, written = pool[j]
            pairs.append(
                {
                    "audio": clip.audio,
                    "image": name,
                    "speaker": clip.speaker,
                    "label": str((clip.spoken + written) % 10),
                    "split": "test" if clip.part == "test" else "train",
                }
            )
    clips = clips.assign(label=clips["spoken"].astype(str), split=np.where(clips["part"] == "test", "test", "train"))
    return clips, pd.DataFrame(pairs)


def base_params(args: argparse.Namespace, inputs: dict, candidates: list[dict], train: dict) -> dict:
    return {
        "seed": args.seed,
        "data": {
            "source": "manifest",
            "sample_rate": 8000,
            "audio_seconds": 1.0,
            "image_size": 8,
            "group_column": "speaker",
            "val_groups": [args.val_speaker],
        },
        "inputs": inputs,
        "target": "label",
        "train": train,
        "candidates": candidates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the FSDD folder holding recordings/")
    parser.add_argument("--per-digit", type=int, default=50, help="recordings per digit and speaker (FSDD has 50)")
    parser.add_argument("--pairs", type=int, default=3, help="images paired with each recording")
    parser.add_argument("--audio-epochs", type=int, default=20, help="stage 1, as bench/audio_speakers.py")
    parser.add_argument("--audio-batch", type=int, default=32, help="stage 1, as bench/audio_speakers.py")
    parser.add_argument(
        "--audio-params",
        type=json.loads,
        default={},
        metavar="JSON",
        help="mel_audio parameters over its defaults, in both stages (the report records them)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--test-speaker", default="jackson")
    parser.add_argument("--val-speaker", default="lucas")
    parser.add_argument("--fusions", default=",".join(FUSIONS))
    parser.add_argument("--recipe", action="store_true", help="also concat with the issue-16 recipe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "image_audio.json")
    args = parser.parse_args()
    if not (args.data / "recordings").is_dir():
        raise SystemExit(
            f"{args.data / 'recordings'} not found: pass the FSDD folder "
            "(github.com/Jakobovski/free-spoken-digit-dataset)"
        )
    torch.set_num_threads(args.threads)
    from mmops.config import Params
    from mmops.data.featurize import featurize
    from mmops.data.prepare import prepare
    from mmops.training.loop import Dataset, train_candidate

    started = time.perf_counter()
    rows, train = [], template_train()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clips, pairs = build_data(args, work / "raw")
        # Stage 1: the audio encoder, on the train speakers' recordings alone.
        clips.drop(columns=["part", "spoken"]).to_csv(work / "raw" / "manifest.csv", index=False)
        audio_train = {
            **train,
            "batch_size": args.audio_batch,
            "epochs": args.audio_epochs,
            "patience": args.audio_epochs,
        }
        p1 = Params.model_validate(
            base_params(
                args,
                {"audio": {"modality": "audio", "params": {"sample_rate": 8000, **args.audio_params}}},
                [{"name": "audio", "inputs": ["audio"]}],
                audio_train,
            )
        )
        prepare(work / "raw", work / "p1", p1)
        audio = train_candidate(
            p1, p1.candidates[0], Dataset.load(work / "p1", work / "none", p1, use_cache=False), work / "audio"
        )
        audio_seconds = round(time.perf_counter() - started)
        print(
            f"audio only: val {audio['metrics']['val']['accuracy']:.3f} test "
            f"{audio['metrics']['test']['accuracy']:.3f} ({audio_seconds} s)",
            flush=True,
        )
        # Stage 2: the fusions.
        pairs.to_csv(work / "raw" / "manifest.csv", index=False)
        inputs = {
            "audio": {
                "modality": "audio",
                "params": {"sample_rate": 8000, **args.audio_params},
                "init_from": str(work / "audio"),
                "freeze": True,
            },
            "image": {"modality": "image", "encoder": "pixels", "params": {"size": 8, "grayscale": True}},
        }
        names = args.fusions.split(",")
        plans = [(f, f, {}) for f in names]
        if args.recipe:
            plans += [(f"{f}+recipe", f, RECIPE) for f in ("concat",) if f in names]
        candidates = [{"name": n, "fusion": f, "train": extra} for n, f, extra in plans]
        candidates += [{"name": "image-only", "inputs": ["image"]}]
        p2 = Params.model_validate(base_params(args, inputs, candidates, train))
        summary = prepare(work / "raw", work / "p2", p2)
        context = {
            "splits": summary["splits"],
            "train": train,
            "audio_stage": {
                "val_accuracy": audio["metrics"]["val"]["accuracy"],
                "test_accuracy": audio["metrics"]["test"]["accuracy"],
                "epochs": args.audio_epochs,
                "batch_size": args.audio_batch,
                "seconds": audio_seconds,
                "encoder": audio_encoder_params(args.audio_params),
            },
        }
        featurize(work / "p2", work / "f2", p2)
        data = Dataset.load(work / "p2", work / "f2", p2)
        for candidate in p2.candidates:
            runs, t0 = [], time.perf_counter()
            for k in range(args.seeds):
                seeded = p2.model_copy(update={"seed": args.seed + k})
                r = train_candidate(seeded, candidate, data, work / "m" / f"{candidate.name}-{k}")
                runs.append(
                    {
                        "seed": args.seed + k,
                        "val": r["metrics"]["val"]["accuracy"],
                        "test": r["metrics"]["test"]["accuracy"],
                        "epochs_run": r["epochs_run"],
                        "seconds": round(r["train_seconds"], 1),
                    }
                )
            vals, tests = [r["val"] for r in runs], [r["test"] for r in runs]
            row = {
                "candidate": candidate.name,
                "fusion": candidate.fusion,
                "val_mean": statistics.mean(vals),
                "val_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "test_mean": statistics.mean(tests),
                "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "seconds": round(time.perf_counter() - t0),
                "runs": runs,
            }
            rows.append(row)
            write_report(args, context, rows, time.perf_counter() - started, complete=False)
            print(
                f"{candidate.name:>18}: val {row['val_mean']:.3f} ± {row['val_std']:.3f}  "
                f"test {row['test_mean']:.3f} ± {row['test_std']:.3f}  ({row['seconds']} s)",
                flush=True,
            )
    report = write_report(args, context, rows, time.perf_counter() - started, complete=True)
    chosen, best = report["selected_on_val"], report["best_test"]
    print(
        f"selected on val: {chosen['candidate']} (test {chosen['test_mean']:.3f}); "
        f"best test: {best['candidate']} ({best['test_mean']:.3f}); wrote {args.out}"
    )


def write_report(args: argparse.Namespace, context: dict, rows: list[dict], seconds: float, complete: bool) -> dict:
    """The JSON report, rewritten after every row (``complete: false`` until the last), so a run cut short
    still leaves the rows it finished."""
    fused = [r for r in rows if r["fusion"] and "+recipe" not in r["candidate"]]
    chosen = max(fused, key=lambda r: r["val_mean"]) if fused else None
    best = max(fused, key=lambda r: r["test_mean"]) if fused else None
    report = {
        "task": "label = (spoken digit + handwritten digit) mod 10; speaker- and image-disjoint splits",
        "speakers": {"test": args.test_speaker, "val": args.val_speaker},
        "per_digit": args.per_digit,
        "pairs_per_recording": args.pairs,
        "splits": context["splits"],
        "seeds": args.seeds,
        "train": context["train"],
        "audio_stage": context["audio_stage"],
        "selected_on_val": chosen and {"candidate": chosen["candidate"], "test_mean": chosen["test_mean"]},
        "best_test": best and {"candidate": best["candidate"], "test_mean": best["test_mean"]},
        "gap_points": round(100 * (best["test_mean"] - chosen["test_mean"]), 2) if fused else None,
        "rows": rows,
        "complete": complete,
        "seconds": round(seconds),
        "torch_threads": args.threads,
        "command": "python " + " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
