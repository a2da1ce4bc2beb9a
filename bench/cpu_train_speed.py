"""CPU-only training speed before and after the device code (issue 14), same benchmark, one run.

    nice -n 10 .venv/bin/python bench/cpu_train_speed.py [--before COMMIT]

"Before" is ``mmops/training/loop.py`` as it was at COMMIT (default: the parent of the commit that
added devices and mixed precision), loaded as its own module next to today's; both train the same
candidate on the same prepared data (4,000 questions per split, 32 px, 3 epochs, 1 torch thread: two
wait on each other on cores other jobs share) in this process, alternately (after, before, after,
before), so drift in the machine's load hits both.
Output: bench/results/cpu_train_speed.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ddp_overhead import prepared_project

REPO = Path(__file__).resolve().parent.parent
DEVICE_COMMIT = "e3261bf"  # "Devices in training and featurize (issue 14)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default=f"{DEVICE_COMMIT}^")
    parser.add_argument("--limit", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmops-cpu-speed-"))
    source = subprocess.run(
        ["git", "show", f"{args.before}:mmops/training/loop.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    (tmp / "loop_before.py").write_text(source)
    spec = importlib.util.spec_from_file_location("loop_before", tmp / "loop_before.py")
    before = importlib.util.module_from_spec(spec)
    sys.modules["loop_before"] = before
    spec.loader.exec_module(before)
    from mmops.training import loop as after

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = prepared_project(tmp / "proj", args.limit, args.epochs)
    from mmops.config import load_params

    params = load_params(root / "params.yaml")
    params = params.model_copy(update={"train": params.train.model_copy(update={"threads": 1})})
    candidate = params.candidates[0]
    times: dict[str, list[float]] = {"before": [], "after": []}
    accuracy: dict[str, float] = {}
    for label, module in [("after", after), ("before", before), ("after", after), ("before", before)]:
        data = module.Dataset.load(root / "data" / "prepared", root / "data" / "features", params)
        result = module.train_candidate(params, candidate, data, tmp / label)
        times[label].append(round(result["train_seconds"], 2))
        accuracy[label] = round(result["metrics"]["val"]["accuracy"], 4)
        print(label, times[label][-1], "s", accuracy[label])
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    figures = {
        "before": args.before,
        "questions_per_split": args.limit,
        "epochs": args.epochs,
        "threads": 1,
        "train_seconds": times,
        "mean_s": {k: round(v, 2) for k, v in mean.items()},
        "after_over_before": round(mean["after"] / mean["before"], 3),
        "val_accuracy": accuracy,
    }
    print(json.dumps(figures, indent=2))
    (REPO / "bench" / "results" / "cpu_train_speed.json").write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
