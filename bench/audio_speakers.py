"""Spoken digits from speakers never heard in training: ``mel_audio`` before vs after issue 16.

    .venv/bin/python bench/audio_speakers.py ../shared/data/fsdd-5            # all 5 folds, both variants
    .venv/bin/python bench/audio_speakers.py ../shared/data/fsdd-5 --per-digit 10 --epochs 2 --folds george
                                                                              # a quick check

The data is the Free Spoken Digit Dataset (FSDD, CC BY-SA 4.0; github.com/Jakobovski/free-spoken-digit-dataset):
``recordings/{digit}_{speaker}_{index}.wav``. It is not part of mmops; pass the folder that holds
``recordings/``. Protocol: leave one speaker out. For each speaker, that speaker's recordings are the
test split; the others train, and one of them, never seen in training, is val (``data.group_column:
speaker``, which is what a user of mmops writes). Reported: each fold's test accuracy, their mean, and
the worst speaker.

Variants (the encoder's parameters, nothing else changes):

* ``before``: mel_audio as it was: windows in samples (n_fft 400, hop 160: 50 ms / 20 ms at 8 kHz),
  no normalisation, no augmentation, channels [16, 32, 64], mean pooling over every frame;
* ``after``: today's defaults: 25 ms / 10 ms windows, per-band per-utterance normalisation (CMVN),
  time shift + SpecAugment masks in training, channels [32, 64, 128], statistics pooling.

It runs the prepare stage and the training loop directly (no Prefect, DVC or registry). Output:
``bench/results/audio_speakers.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

VARIANTS: dict[str, dict] = {
    "before": {"n_fft": 400, "hop": 160, "normalize": "none", "augment": False, "channels": [16, 32, 64],
               "pooling": "mean"},
    "after": {},  # the defaults
}


def manifest(data_dir: Path, per_digit: int) -> pd.DataFrame:
    """One row per recording: path, speaker, digit; ``per_digit`` recordings per digit and speaker."""
    folder = data_dir / "recordings"
    if not folder.is_dir():
        sys.exit(f"{folder} not found: pass the FSDD folder that holds recordings/ "
                 "(github.com/Jakobovski/free-spoken-digit-dataset)")
    rows = []
    for path in sorted(folder.glob("*.wav")):
        m = re.fullmatch(r"(\d)_([a-z]+)_(\d+)\.wav", path.name)
        if m and int(m.group(3)) < per_digit:
            rows.append({"audio": f"recordings/{path.name}", "speaker": m.group(2), "digit": m.group(1)})
    return pd.DataFrame(rows)


def params_for(variant: dict, args: argparse.Namespace) -> dict:
    return {
        "seed": args.seed,
        "data": {"source": "manifest", "sample_rate": 8000, "audio_seconds": 1.0, "group_column": "speaker"},
        "inputs": {"audio": {"modality": "audio", "params": {"sample_rate": 8000, **variant}}},
        "target": "digit",
        "train": {"epochs": args.epochs, "patience": args.epochs, "batch_size": args.batch_size, "lr": 3e-3,
                  "head_hidden": 128},
        "candidates": [{"name": "audio", "inputs": ["audio"]}],
    }


def run_fold(table: pd.DataFrame, speaker: str, args: argparse.Namespace, work: Path) -> dict:
    from mmops.config import Params
    from mmops.data.prepare import prepare
    from mmops.training.loop import Dataset, train_candidate

    raw = work / "raw"  # the recordings were copied here once; the manifest names this fold's test speaker
    table.assign(split=(table["speaker"] == speaker).map({True: "test", False: "train"})).to_csv(
        raw / "manifest.csv", index=False)
    out: dict = {"speaker": speaker}
    prepared = work / speaker / "prepared"
    for name in args.variants:
        params = Params.model_validate(params_for(VARIANTS[name], args))
        if not prepared.exists():
            summary = prepare(raw, prepared, params)
            out["splits"], out["groups"] = summary["splits"], summary["groups"]["per_split"]
        data = Dataset.load(prepared, work / "none", params, use_cache=False)
        t0 = time.perf_counter()
        result = train_candidate(params, params.candidates[0], data, work / speaker / name)
        m = result["metrics"]
        out[name] = {"test_accuracy": m["test"]["accuracy"], "val_accuracy": m["val"]["accuracy"],
                     "val_speaker": next(iter(m["val"].get("by_group", {"?": 0}))),
                     "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{speaker:>10} {name:>6}: test {m['test']['accuracy']:.3f}  val {m['val']['accuracy']:.3f}  "
              f"({out[name]['seconds']:.0f} s)", flush=True)
    return out


def summarize(folds: list[dict], variants: list[str]) -> dict:
    """Per variant: mean test accuracy over the folds, the worst speaker, mean val accuracy."""
    summary = {}
    for name in variants:
        accs = {f["speaker"]: f[name]["test_accuracy"] for f in folds if name in f}
        worst = min(accs, key=accs.get)
        summary[name] = {"mean_test_accuracy": sum(accs.values()) / len(accs), "worst_speaker": worst,
                         "worst_test_accuracy": accs[worst], "folds": len(accs),
                         "mean_val_accuracy": sum(f[name]["val_accuracy"] for f in folds if name in f) / len(accs),
                         "encoder_params": VARIANTS[name] or "defaults"}
        print(f"{name}: mean {summary[name]['mean_test_accuracy']:.3f}, worst {worst} {accs[worst]:.3f}")
    return summary


def merge(paths: list[Path], out: Path) -> None:
    """One report from runs of other folds or variants (run as separate processes)."""
    reports = [json.loads(p.read_text()) for p in paths]
    by_speaker: dict[str, dict] = {}
    for r in reports:
        for f in r["folds"]:
            by_speaker.setdefault(f["speaker"], {}).update(f)
    folds = [by_speaker[s] for s in sorted(by_speaker)]
    variants = sorted({v for r in reports for v in r["summary"]}, key=list(VARIANTS).index)
    merged = {**reports[0], "summary": summarize(folds, variants), "folds": folds,
              "seconds": max(r["seconds"] for r in reports), "processes": len(reports)}
    out.write_text(json.dumps(merged, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the FSDD folder holding recordings/")
    parser.add_argument("--per-digit", type=int, default=50, help="recordings per digit and speaker (50: all)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--merge", type=Path, nargs="+", help="combine the JSON of runs of one variant each, "
                        "e.g. before and after run as two processes; then exit")
    parser.add_argument("--folds", default="", help="comma-separated test speakers (default: every speaker)")
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "audio_speakers.json")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    if args.merge:
        merge(args.merge, args.out)
        return
    torch.set_num_threads(args.threads)
    table = manifest(args.data, args.per_digit)
    speakers = args.folds.split(",") if args.folds else sorted(table["speaker"].unique())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "raw").mkdir()
        shutil.copytree(args.data / "recordings", Path(tmp) / "raw" / "recordings")  # paths stay inside the root
        folds = [run_fold(table, s, args, Path(tmp)) for s in speakers]
    summary = summarize(folds, args.variants)
    report = {
        "protocol": "leave one speaker out; val = one other speaker never trained on (data.group_column)",
        "recordings": len(table), "per_digit_per_speaker": args.per_digit, "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed, "summary": summary, "folds": folds,
        "seconds": round(time.perf_counter() - started), "torch_threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, shared with other jobs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
