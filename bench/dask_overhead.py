"""Dask's overhead at equal cores: an 8-candidate sweep of end-to-end candidates (a CNN trained on the
images, MiniLM question features cached) on 2 single-threaded Dask workers vs the threads runner with
2 threads in one process, same machine, one run each.

    nice -n 10 .venv/bin/python bench/dask_overhead.py            # 2,000 questions per split, 2 epochs

One process drives everything: the Prefect server is started and the data stages run by a first threads
sweep (not timed); then, timed, ``run_sweep --force`` on threads (2 candidates at once, 1 torch thread
each), and on a cluster of a ``dask scheduler`` and two ``dask worker --nthreads 1`` processes joined by
address: cold (fresh workers, warmed by mmops' worker plugin inside the timing) and warm (the next
sweep on the same workers). Output: bench/results/dask_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_project(root: Path, limit: int, epochs: int) -> None:
    root.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(limit=limit, image_size=32)
    params["train"].update(epochs=epochs, patience=epochs, threads=1, batch_size=64)
    params["inputs"]["image"]["params"] = {"channels": [8, 16, 32]}
    params["candidates"] = []
    params["sweep"] = {
        "fusion": ["concat", "product"],
        "params": {"hidden": [64, 128]},
        "train": {"lr": [0.003, 0.005]},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmops-dask-bench-"))
    root = tmp / "proj"
    make_project(root, args.limit, args.epochs)
    os.chdir(root)  # DVC resolves the stages' outputs against the working directory
    os.environ["MMOPS_PROJECT"] = str(root)
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    from mmops.project import Project, configure_environment

    project = Project.at(root)
    configure_environment(project)
    from mmops_flows.sweep import run_sweep

    from mmops.config import RunnerConfig

    def timed(runner: RunnerConfig) -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = run_sweep(project, runner, force=True)
        assert all(r["status"] == "completed" for r in out["results"]), out["results"]
        return time.perf_counter() - t0, out

    threads = RunnerConfig(kind="threads", max_workers=2)
    first, _ = timed(threads)  # Prefect server, DVC stages, featurize: not what is compared
    t_threads, out_threads = timed(threads)

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ}
    procs = [
        subprocess.Popen(
            [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        procs += [
            subprocess.Popen(
                [
                    BIN / "dask",
                    "worker",
                    address,
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--local-directory",
                    str(tmp / f"w{i}"),
                ],
                cwd=root,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(2)
        ]
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=180)
        dask = RunnerConfig(kind="dask", address=address)
        t_cold, _ = timed(dask)
        t_warm, out_warm = timed(dask)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)

    def ranking(out: dict) -> list:
        return sorted(((r["candidate"], r["final"]["val_accuracy"]) for r in out["results"]), key=lambda r: -r[1])

    figures = {
        "candidates": len(out_threads["results"]),
        "questions_per_split": args.limit,
        "epochs": args.epochs,
        "cores": os.cpu_count(),
        "first_threads_sweep_s (server, stages, featurize)": round(first, 1),
        "threads_2x1_s": round(t_threads, 1),
        "dask_2_workers_cold_s": round(t_cold, 1),
        "dask_2_workers_warm_s": round(t_warm, 1),
        "ratio_warm": round(t_warm / t_threads, 3),
        "ratio_cold": round(t_cold / t_threads, 3),
        "goal_ratio_warm": 1.10,
        "same_ranking": ranking(out_threads) == ranking(out_warm),
        "candidate_train_seconds_threads": round(sum(r["train_seconds"] for r in out_threads["results"]), 1),
        "candidate_train_seconds_dask_warm": round(sum(r["train_seconds"] for r in out_warm["results"]), 1),
    }
    print(json.dumps(figures, indent=2))
    out = REPO / "bench" / "results" / "dask_overhead.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
