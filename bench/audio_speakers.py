"""Spoken digits from speakers never heard in training: ``mel_audio`` before vs after issue 16.

    .venv/bin/python bench/audio_speakers.py ../shared/data/fsdd-5            # all 5 folds, both variants
    .venv/bin/python bench/audio_speakers.py ../shared/data/fsdd-5 --per-digit 10 --epochs 2 --folds george
                                                                              # a quick check

The data is the Free Spoken Digit Dataset (FSDD, CC BY-SA 4.0; github.com/Jakobovski/free-spoken-digit-dataset):
``recordings/{digit}_{speaker}_{index}.wav``. It is not part of mmops; pass the folder that holds
``recordings/``. Leave one speaker out: for each speaker, that speaker's recordings are the test split,
never trained on and never selected on. Reported: each fold's test accuracy, their mean, and the worst
speaker; with ``--seeds N``, each seed's model, their mean, and their ensemble (``train.ensemble``: one
model averaging the N models' probabilities, mmops' own ``Ensemble``). Two protocols for val (``--protocol``):

* ``clips`` (the default since the second round of issue 16): the four other speakers all train; val is
  their held-out recordings (the last tenth of each digit's indices, 5 of 50). Val then picks the epoch
  on voices it has heard (it says little about new voices, and is not meant to: the test speaker does);
* ``speaker`` (the first round's): val is one other speaker, never trained on (``data.group_column:
  speaker``, which is what a user of mmops writes to validate on new voices); only three speakers train.

Variants (the encoder's parameters, nothing else changes):

* ``before``: mel_audio as it was: windows in samples (n_fft 400, hop 160: 50 ms / 20 ms at 8 kHz),
  log-mel, no normalisation, no augmentation, a 2-D CNN with channels [16, 32, 64], mean pooling over
  every frame;
* ``after``: today's defaults (see ``plugins/encoders/mel_audio.py``; the report records them).

It runs the prepare stage and the training loop directly (no Prefect, DVC or registry), one torch
thread by default. Output: ``bench/results/audio_speakers.json`` (or ``--out``); ``--merge`` joins the
reports of runs split over processes (e.g. one per variant).
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
from mmops_plugins.encoders.mel_audio import MelAudioEncoder

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# before: mel_audio as it was before issue 16, i.e. every parameter added since at its old value: what a
# model saved before them loads with (the encoder's saved_before).
BEFORE = dict(MelAudioEncoder.saved_before)
VARIANTS: dict[str, dict] = {
    "before": BEFORE,
    "after": {},  # the defaults
}
PROTOCOLS = {
    "clips": "leave one speaker out; the 4 other speakers train; val = their held-out recordings (the last 10% "
    "of each digit's indices), so val selects epochs on voices it has heard",
    "speaker": "leave one speaker out; val = one other speaker never trained on (data.group_column), "
    "so only 3 speakers train",
}


def manifest(data_dir: Path, per_digit: int) -> pd.DataFrame:
    """One row per recording: path, speaker, digit, index; ``per_digit`` recordings per digit and speaker."""
    folder = data_dir / "recordings"
    if not folder.is_dir():
        sys.exit(
            f"{folder} not found: pass the FSDD folder that holds recordings/ "
            "(github.com/Jakobovski/free-spoken-digit-dataset)"
        )
    rows = []
    for path in sorted(folder.glob("*.wav")):
        m = re.fullmatch(r"(\d)_([a-z]+)_(\d+)\.wav", path.name)
        if m and int(m.group(3)) < per_digit:
            rows.append(
                {
                    "audio": f"recordings/{path.name}",
                    "speaker": m.group(2),
                    "digit": m.group(1),
                    "index": int(m.group(3)),
                }
            )
    return pd.DataFrame(rows)


def params_for(variant: dict, args: argparse.Namespace) -> dict:
    grouped = {"group_column": "speaker"} if args.protocol == "speaker" else {}
    return {
        "seed": args.seed,
        "data": {"source": "manifest", "sample_rate": 8000, "audio_seconds": 1.0, **grouped},
        "inputs": {"audio": {"modality": "audio", "params": {"sample_rate": 8000, **variant}}},
        "target": "digit",
        "train": {
            "epochs": args.epochs,
            "patience": args.epochs,
            "batch_size": args.batch_size,
            "lr": 3e-3,
            "head_hidden": 128,
            "dropout": args.dropout,
            "ema": args.ema,
            "threads": args.threads,
        },
        "candidates": [{"name": "audio", "inputs": ["audio"]}],
    }


def run_fold(table: pd.DataFrame, speaker: str, args: argparse.Namespace, work: Path) -> dict:
    from mmops.config import Params
    from mmops.core.model import Ensemble, MultimodalModel
    from mmops.data.prepare import prepare
    from mmops.training.loop import Dataset, evaluate_split, train_candidate

    raw = work / "raw"  # the recordings were copied here once; the manifest names this fold's test speaker
    split = (table["speaker"] == speaker).map({True: "test", False: "train"})
    if args.protocol == "clips":  # the last tenth of each speaker's recordings of a digit: val
        split[(split == "train") & (table["index"] >= args.per_digit - max(1, args.per_digit // 10))] = "val"
    table.drop(columns="index").assign(split=split).to_csv(raw / "manifest.csv", index=False)
    out: dict = {"speaker": speaker}
    prepared = work / speaker / "prepared"
    for name in args.variants:
        params = Params.model_validate(params_for(VARIANTS[name], args))
        if not prepared.exists():
            summary = prepare(raw, prepared, params)
            out["splits"] = summary["splits"]
            if "groups" in summary:
                out["groups"] = summary["groups"]["per_split"]
        data = Dataset.load(prepared, work / "none", params, use_cache=False)
        t0 = time.perf_counter()
        runs, members = [], []
        for k in range(args.seeds):  # train.seeds: seed, seed + 1, ...
            seeded = params.model_copy(update={"seed": params.seed + k})
            result = train_candidate(seeded, seeded.candidates[0], data, work / speaker / name / str(k))
            runs.append(result)
            members.append(MultimodalModel.load(Path(result["model_dir"])))
        m = runs[0]["metrics"]
        out[name] = {
            "test_accuracy": m["test"]["accuracy"],
            "val_accuracy": m["val"]["accuracy"],
            "val_speaker": next(iter(m["val"].get("by_group", {"the training speakers": 0}))),
            "best_epoch": runs[0]["best_epoch"],
            "epochs_run": runs[0]["epochs_run"],
        }
        if args.seeds > 1:  # each seed's model, their mean, and (train.ensemble) the models averaged as one
            tests = [r["metrics"]["test"]["accuracy"] for r in runs]
            vals = [r["metrics"]["val"]["accuracy"] for r in runs]
            ensemble = Ensemble(members, [params.seed + k for k in range(args.seeds)])
            out[name] = {
                **out[name],
                "seed_test_accuracy": tests,
                "seed_val_accuracy": vals,
                "test_accuracy": sum(tests) / len(tests),
                "val_accuracy": sum(vals) / len(vals),
                "ensemble_test_accuracy": evaluate_split(ensemble, data, "test", args.batch_size)[0]["accuracy"],
                "ensemble_val_accuracy": evaluate_split(ensemble, data, "val", args.batch_size)[0]["accuracy"],
            }
        out[name]["seconds"] = round(time.perf_counter() - t0, 1)
        ens = f"  ensemble {out[name]['ensemble_test_accuracy']:.3f}" if args.seeds > 1 else ""
        print(
            f"{speaker:>10} {name:>6}: test {out[name]['test_accuracy']:.3f}{ens}  "
            f"val {out[name]['val_accuracy']:.3f}  ({out[name]['seconds']:.0f} s)",
            flush=True,
        )
    return out


def encoder_defaults(changed: dict) -> dict:
    """The encoder parameters the ``after`` variant ran with: mel_audio's defaults at 8 kHz, and which of
    them ``--after`` changed."""
    return {"defaults_changed": changed, **MelAudioEncoder(sample_rate=8000, **changed).config()}


def summarize(folds: list[dict], variants: list[str], encoders: dict[str, dict]) -> dict:
    """Per variant: mean test accuracy over the folds, the worst speaker, mean val accuracy, and the
    encoder parameters it ran with (``encoders``)."""
    summary = {}
    for name in variants:
        accs = {f["speaker"]: f[name]["test_accuracy"] for f in folds if name in f}
        worst = min(accs, key=accs.get)
        summary[name] = {
            "mean_test_accuracy": sum(accs.values()) / len(accs),
            "worst_speaker": worst,
            "worst_test_accuracy": accs[worst],
            "folds": len(accs),
            "mean_val_accuracy": sum(f[name]["val_accuracy"] for f in folds if name in f) / len(accs),
            "encoder_params": encoders[name],
        }
        print(f"{name}: mean {summary[name]['mean_test_accuracy']:.3f}, worst {worst} {accs[worst]:.3f}")
        ens = {
            f["speaker"]: f[name]["ensemble_test_accuracy"]
            for f in folds
            if "ensemble_test_accuracy" in f.get(name, {})
        }
        if ens:  # --seeds > 1: the mean above is over every seed's model; this is their ensemble's
            low = min(ens, key=ens.get)
            summary[name]["ensemble"] = {
                "mean_test_accuracy": sum(ens.values()) / len(ens),
                "worst_speaker": low,
                "worst_test_accuracy": ens[low],
            }
            print(
                f"{name}: ensemble of {len(folds[0][name]['seed_test_accuracy'])} seeds: mean "
                f"{summary[name]['ensemble']['mean_test_accuracy']:.3f}, worst {low} {ens[low]:.3f}"
            )
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
    merged = {
        **reports[0],
        "summary": summarize(
            folds, variants, {v: r["summary"][v]["encoder_params"] for r in reports for v in r["summary"]}
        ),
        "folds": folds,
        "seconds": max(r["seconds"] for r in reports),
        "processes": len(reports),
    }
    out.write_text(json.dumps(merged, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the FSDD folder holding recordings/")
    parser.add_argument("--per-digit", type=int, default=50, help="recordings per digit and speaker (50: all)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train.seeds: each fold and variant trains seeds seed..seed+N-1; reported: each seed, their mean, "
        "and their ensemble (train.ensemble: the mean of their probabilities)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.3, help="the head's dropout (train.dropout)")
    parser.add_argument("--ema", type=float, default=0.0, help="train.ema: a moving average of the weights (0: off)")
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default="clips",
        help="; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()),
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="combine the JSON of runs of one variant each, e.g. before and after run as two processes; then exit",
    )
    parser.add_argument("--folds", default="", help="comma-separated test speakers (default: every speaker)")
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--after",
        type=json.loads,
        default={},
        metavar="JSON",
        help='encoder parameters that the "after" variant sets over the defaults, e.g. '
        "'{\"dynamic_range\": 30}' (the report records them)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "audio_speakers.json")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    VARIANTS["after"] = dict(args.after)
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
    summary = summarize(folds, args.variants, {"before": BEFORE, "after": encoder_defaults(VARIANTS["after"])})
    report = {
        "protocol": f"{args.protocol}: {PROTOCOLS[args.protocol]}",
        "recordings": len(table),
        "per_digit_per_speaker": args.per_digit,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "dropout": args.dropout,
        "ema": args.ema,
        "lr": 3e-3,
        "seed": args.seed,
        "seeds": args.seeds,
        "summary": summary,
        "folds": folds,
    }
    write_report(report, args, started)


def write_report(report: dict, args: argparse.Namespace, started: float) -> None:
    """``report`` with the run's time and machine, to ``args.out`` (shared with bench/audio_adapt.py)."""
    report = {
        **report,
        "seconds": round(time.perf_counter() - started),
        "torch_threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, shared with other jobs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
