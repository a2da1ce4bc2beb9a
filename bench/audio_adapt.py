"""A new speaker's unlabelled clips, used: ``mmops adapt`` (AdaBN) and ``--pseudo-labels`` (self-training).

    .venv/bin/python bench/audio_adapt.py ../shared/data/fsdd-5                  # 5 folds, 3 seeds
    .venv/bin/python bench/audio_adapt.py ../shared/data/fsdd-5 --folds george --seeds 1 --epochs 2
                                                                                 # a quick check

Leave one speaker out on FSDD (as ``bench/audio_speakers.py``: the other four train, val is their
held-out clips), with the test speaker's 500 clips split in two halves by recording index (0-24,
25-49 of each digit). Each half is scored by models that saw, of the test speaker, only the *other*
half and only without labels; then the halves swap, so every clip is scored once and no scored clip
was ever read by adaptation. Compared in one run, on the same clips, per fold:

* ``none``: today's defaults, ``train.seeds`` models averaged (``train.ensemble``), nothing adapted;
* ``adapt``: that ensemble after ``mmops adapt`` on the other half (batch-norm statistics re-estimated,
  :func:`mmops.adapt.adapt_artifact`, through the service's own decoding of the WAV files);
* ``self-train``: ``mmops adapt --pseudo-labels T``: the adapted ensemble's answers it is at least T sure
  of (:func:`mmops.adapt.pseudo_labels`) join the training rows, the seeds retrain from scratch (what
  ``mmops run`` does after the append), and the new ensemble is adapted again on the same half.

The labels of the adaptation half are read only to report how many pseudo-labels were right. Output:
``bench/results/audio_adapt.json`` (or ``--out``); ``--merge`` joins runs split over processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_speakers import RESULTS, manifest, params_for, write_report  # the same data and recipe

METHODS = ("none", "adapt", "self-train")


def train_ensemble(params, data, folder: Path, seeds: int) -> Path:
    """``seeds`` models, laid out as ``train.ensemble`` saves them (the first seed's folder holds the
    others under ``members/<seed>/`` and ``ensemble.json``); one seed is a plain artifact."""
    from mmops.core.model import MEMBERS_DIR, write_ensemble
    from mmops.training.loop import train_candidate

    dirs = []
    for k in range(seeds):
        seeded = params.model_copy(update={"seed": params.seed + k})
        dirs.append(Path(train_candidate(seeded, seeded.candidates[0], data, folder / f"seed{k}")["model_dir"]))
    if seeds == 1:
        return dirs[0]
    ensemble = folder / "ensemble"
    shutil.copytree(dirs[0], ensemble)
    members = [(params.seed, ensemble)]
    for k, path in enumerate(dirs[1:], 1):
        shutil.copytree(path, ensemble / MEMBERS_DIR / str(params.seed + k))
        members.append((params.seed + k, ensemble / MEMBERS_DIR / str(params.seed + k)))
    write_ensemble(ensemble, members)
    return ensemble


def score(model_dir: Path, data, rows: pd.DataFrame) -> np.ndarray:
    from mmops.core.model import load_model
    from mmops.training.loop import Batcher, predict_split

    model = load_model(model_dir)
    return predict_split(model, Batcher(data, rows, model.encoders, 64, None), data.precomputed)


def run_fold(table: pd.DataFrame, speaker: str, args: argparse.Namespace, work: Path) -> dict:
    from mmops.adapt import adapt_artifact, pseudo_labels
    from mmops.config import Params
    from mmops.data.prepare import prepare
    from mmops.training.loop import Dataset

    raw = work / "raw"
    split = (table["speaker"] == speaker).map({True: "test", False: "train"})
    split[(split == "train") & (table["index"] >= args.per_digit - max(1, args.per_digit // 10))] = "val"
    table.drop(columns="index").assign(split=split).to_csv(raw / "manifest.csv", index=False)
    params = Params.model_validate(params_for({}, args))
    folder = work / speaker
    prepare(raw, folder / "prepared", params)
    data = Dataset.load(folder / "prepared", folder / "none", params, use_cache=False)
    t0 = time.perf_counter()
    test = data.split("test")
    source = table.iloc[test["line"].to_numpy() - 2]  # the manifest row of each test row (line 1: header)
    y = data.targets(test)
    base = train_ensemble(params, data, folder / "base", args.seeds)
    probs = {m: np.zeros((len(test), len(data.labels)), dtype=np.float32) for m in METHODS}
    rounds = [np.zeros_like(probs["none"]) for _ in range(args.rounds)]
    first = source["index"].to_numpy() < args.per_digit // 2
    tpos = np.flatnonzero(data.rows["split"].eq("test").to_numpy())  # test rows' positions in data.rows
    pseudo = []
    for h, scored in enumerate((first, ~first)):
        # The other half of the test speaker's clips, as a user would hand them to `mmops adapt`.
        other = raw / f"adapt-{speaker}-{h}.csv"
        source[~scored][["audio", "digit"]].to_csv(other, index=False)
        probs["none"][scored] = score(base, data, test[scored])
        adapted = folder / f"adapted{h}"
        adapt_artifact(base, other, adapted, target="digit")
        probs["adapt"][scored] = score(adapted, data, test[scored])
        if args.pseudo_labels is None:
            continue
        labeller = adapted
        for r in range(args.rounds):  # each round: the latest adapted ensemble labels, the seeds retrain
            kept, stats = pseudo_labels(labeller, other, args.pseudo_labels, "digit")
            per_digit = kept["digit"].value_counts().sort_index().to_dict()
            pseudo.append({"half": h, "round": r + 1, **stats, "per_digit": per_digit})
            # Training rows + the pseudo-labelled clips of the other half; its other clips are left out.
            guess = dict(zip(kept["audio"], kept["digit"].map(data.labels.index), strict=True))
            rows = data.rows.copy()
            split, label = rows["split"].to_numpy().copy(), rows["label"].to_numpy().copy()
            for position, path in zip(tpos[~scored], source["audio"].to_numpy()[~scored], strict=True):
                split[position] = "train" if path in guess else "unused"
                label[position] = guess.get(path, label[position])
            rows["split"], rows["label"] = split, label
            selftrained = Dataset(rows, data.values, data.precomputed, data.labels, data.task)
            retrained = train_ensemble(params, selftrained, folder / f"self{h}-{r}", args.seeds)
            labeller = folder / f"self_adapted{h}-{r}"
            adapt_artifact(retrained, other, labeller, target="digit")
            # Its test rows are the scored half's, in the same order.
            rounds[r][scored] = score(labeller, selftrained, selftrained.split("test"))
        probs["self-train"][scored] = rounds[-1][scored]
    out: dict = {"speaker": speaker, "seconds": round(time.perf_counter() - t0, 1)}
    for method in METHODS if args.pseudo_labels is not None else METHODS[:2]:
        out[method] = float((probs[method].argmax(1) == y).mean())
    if pseudo:
        out["pseudo_labels"] = pseudo
        out["self-train_by_round"] = [float((p.argmax(1) == y).mean()) for p in rounds]
    last = [p for p in pseudo if p["round"] == args.rounds]
    kept = sum(p["kept"] for p in last)
    right = sum(p.get("correct", 0.0) * p["kept"] for p in last) / max(kept, 1)
    notes = f"  (pseudo-labels kept {kept}/{sum(p['of'] for p in last)}, {right:.1%} right)" if pseudo else ""
    if args.rounds > 1 and pseudo:
        notes += "  rounds " + " ".join(f"{a:.3f}" for a in out["self-train_by_round"])
    shown = "  ".join(f"{m} {out[m]:.3f}" for m in METHODS if m in out)
    print(f"{speaker:>10}: {shown}{notes}  ({out['seconds']:.0f} s)", flush=True)
    return out


def summarize(folds: list[dict]) -> dict:
    summary = {}
    for method in METHODS:
        accs = {f["speaker"]: f[method] for f in folds if method in f}
        if not accs:
            continue
        worst = min(accs, key=accs.get)
        summary[method] = {"mean": sum(accs.values()) / len(accs), "worst_speaker": worst, "worst": accs[worst]}
    none = summary["none"]["mean"]
    for method, s in summary.items():
        s["gain_points"] = round(100 * (s["mean"] - none), 2)
        s["error_ratio"] = round((1 - s["mean"]) / (1 - none), 3)  # below 1: fewer errors than no adaptation
        print(
            f"{method:>10}: mean {s['mean']:.3f}, worst {s['worst_speaker']} {s['worst']:.3f}, "
            f"{s['gain_points']:+.1f} points, errors x{s['error_ratio']:.2f}"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the FSDD folder holding recordings/")
    parser.add_argument("--per-digit", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seeds", type=int, default=3, help="train.seeds, averaged (train.ensemble)")
    parser.add_argument("--pseudo-labels", type=float, default=0.9, help="confidence to keep a guess; 0: skip")
    parser.add_argument("--rounds", type=int, default=1, help="self-training rounds (each relabels, retrains)")
    parser.add_argument("--folds", default="", help="comma-separated test speakers (default: every speaker)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--merge", type=Path, nargs="+", help="combine the JSON of runs of other folds; then exit")
    parser.add_argument("--out", type=Path, default=RESULTS / "audio_adapt.json")
    args = parser.parse_args()
    args.pseudo_labels = args.pseudo_labels or None
    args.protocol, args.batch_size, args.dropout, args.ema = "clips", 32, 0.3, 0.0  # audio_speakers' recipe
    if args.merge:
        reports = [json.loads(p.read_text()) for p in args.merge]
        folds = sorted((f for r in reports for f in r["folds"]), key=lambda f: f["speaker"])
        merged = {**reports[0], "folds": folds, "summary": summarize(folds), "processes": len(reports)}
        args.out.write_text(json.dumps(merged, indent=2))
        print(f"wrote {args.out}")
        return
    torch.set_num_threads(args.threads)
    table = manifest(args.data, args.per_digit)
    speakers = args.folds.split(",") if args.folds else sorted(table["speaker"].unique())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "raw").mkdir()
        shutil.copytree(args.data / "recordings", Path(tmp) / "raw" / "recordings")
        folds = [run_fold(table, s, args, Path(tmp)) for s in speakers]
    report = {
        "protocol": "leave one speaker out (the other four train, val = their clips 45-49); the test speaker's "
        "clips in two halves by index; each half scored by models adapted (and self-trained) on the other "
        "half without its labels, then swapped",
        "epochs": args.epochs,
        "seed": args.seed,
        "seeds": args.seeds,
        "pseudo_label_threshold": args.pseudo_labels,
        "self_training_rounds": args.rounds,
        "summary": summarize(folds),
        "folds": folds,
    }
    write_report(report, args, started)


if __name__ == "__main__":
    main()
