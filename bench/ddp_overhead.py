"""Data-parallel overhead on the CPU: one candidate trained by 2 processes x 1 torch thread (gloo DDP)
vs 1 process x 2 torch threads, same data, seed and budget; one run each, on this machine. A third run,
1 process x 1 thread, is the control: on cores other jobs share, two torch threads in one process wait
on each other at every operation, and the DDP ratio must not be read as a gain of DDP itself.

    nice -n 10 .venv/bin/python bench/ddp_overhead.py            # 4,000 questions per split, 4 epochs
    nice -n 10 .venv/bin/python bench/ddp_overhead.py --seeds 3  # accuracies as means over 3 seeds

One seed's accuracy moves by about a point between seeds on this small set, as much as the gap being
measured: with ``--seeds N`` each configuration trains N seeds (``train.seeds``) and the accuracies are
their means, with the standard deviations beside them.

Both go through ``pipeline.train_one`` (the DDP run's wall time includes starting its two ranks).
Output: bench/results/ddp_overhead.json (times, their ratio, both accuracies).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def prepared_project(root: Path, limit: int, epochs: int) -> Path:
    """params.yaml plus the import, prepare and featurize stages, called directly."""
    from mmops.config import load_params
    from mmops.data.easyvqa import import_easy_vqa
    from mmops.data.featurize import featurize
    from mmops.data.prepare import prepare

    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(limit=limit, image_size=32)
    params["train"].update(epochs=epochs, patience=epochs, batch_size=128)
    params["candidates"] = [{"name": "concat", "fusion": "concat", "params": {"hidden": 128}}]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(root / "params.yaml")
    import_easy_vqa(root / "data" / "raw", limit=limit)
    prepare(root / "data" / "raw", root / "data" / "prepared", loaded)
    featurize(root / "data" / "prepared", root / "data" / "features", loaded)
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per configuration (accuracy: their mean)")
    parser.add_argument(
        "--accuracy-only",
        action="store_true",
        help="only 2 processes x 1 thread against 1 process x 1 thread (the same model per step), "
        "for the accuracy gap; skips the slow 2-thread run the time ratio needs",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ddp_overhead.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmops-ddp-bench-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = prepared_project(tmp / "proj", args.limit, args.epochs)
    from mmops import pipeline
    from mmops.project import Project

    project = Project.at(root)
    base = project.params.candidates[0]

    def run(processes: int, threads: int) -> tuple[float, dict]:
        train = {"threads": threads, "distributed": {"processes": processes}, "seeds": args.seeds}
        candidate = base.model_copy(update={"train": train})
        t0 = time.perf_counter()
        result = pipeline.train_one(project, candidate, force=True)
        assert result["status"] == "completed", result.get("error")
        return time.perf_counter() - t0, result

    if args.accuracy_only:
        t_ddp, ddp = run(2, 1)
        t_one, one = run(1, 1)
        means = {name: r["final"]["test_accuracy"] for name, r in (("ddp", ddp), ("one_thread", one))}
        figures = {
            "questions_per_split": args.limit,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "test_accuracy_mean": {k: round(v, 4) for k, v in means.items()},
            "test_accuracy_std": {
                name: round(r.get("final_std", {}).get("test_accuracy", 0.0), 4)
                for name, r in (("ddp", ddp), ("one_thread", one))
            },
            "per_seed": {
                name: [round(x["test_accuracy"], 4) for x in r.get("seeds", [])]
                or [round(r["final"]["test_accuracy"], 4)]
                for name, r in (("ddp", ddp), ("one_thread", one))
            },
            "accuracy_gap_points": round(100 * abs(means["ddp"] - means["one_thread"]), 2),
            "goal_points": 0.5,
            "two_processes_1_thread_s": round(t_ddp, 1),
            "one_process_1_thread_s": round(t_one, 1),
        }
        print(json.dumps(figures, indent=2))
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    t_single, single = run(1, 2)
    t_ddp, ddp = run(2, 1)
    t_one, one = run(1, 1)
    figures = {
        "questions_per_split": args.limit,
        "epochs": args.epochs,
        "cores": os.cpu_count(),
        "one_process_2_threads_s": round(t_single, 1),
        "two_processes_1_thread_s": round(t_ddp, 1),
        "one_process_1_thread_s": round(t_one, 1),
        "ratio": round(t_ddp / t_single, 3),
        "goal_ratio": 1.25,
        "ratio_vs_1_thread": round(t_ddp / t_one, 3),
        "train_seconds": {
            "single": round(single["train_seconds"], 1),
            "ddp": round(ddp["train_seconds"], 1),
            "one_thread": round(one["train_seconds"], 1),
        },
        "epoch_seconds": {
            "single": [round(h["seconds"], 2) for h in single["history"]],
            "ddp": [round(h["seconds"], 2) for h in ddp["history"]],
            "one_thread": [round(h["seconds"], 2) for h in one["history"]],
        },
        "test_accuracy": {
            "single": round(single["final"]["test_accuracy"], 4),
            "ddp": round(ddp["final"]["test_accuracy"], 4),
        },
        "val_accuracy": {
            "single": round(single["final"]["val_accuracy"], 4),
            "ddp": round(ddp["final"]["val_accuracy"], 4),
        },
        "test_accuracy_one_thread": round(one["final"]["test_accuracy"], 4),
        "accuracy_gap_points": round(100 * abs(single["final"]["test_accuracy"] - ddp["final"]["test_accuracy"]), 2),
        "ranks_disjoint": ddp["distributed"]["disjoint"],
        "seeds": args.seeds,
    }
    if args.seeds > 1:
        figures["test_accuracy_std"] = {
            name: round(r["final_std"]["test_accuracy"], 4)
            for name, r in (("single", single), ("ddp", ddp), ("one_thread", one))
        }
    print(json.dumps(figures, indent=2))
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
