"""Issue 14: a sweep joins a real Dask cluster by address. A `dask scheduler` and two `dask worker`
processes are started on loopback on their own (as on separate machines sharing the project folder);
`mmops sweep --runner dask --address` warms each worker once, its candidates run on both workers and
rank exactly as with the threads runner, and a worker killed mid-candidate has that candidate run
again on the other worker while the sweep completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, free_port, make_project, mmops, project_env

SWEEP = {
    "data": {"limit": 600, "image_size": 16},
    "train": {"epochs": 2, "threads": 1, "batch_size": 64, "head_hidden": 32},
    "inputs": {"image": {"params": {"channels": [4, 8]}}},
    "candidates": [],
    "sweep": {"fusion": ["concat", "product"], "params": {"hidden": [16, 32]}},
}


def _ranking(root: Path) -> list[tuple[str, float]]:
    board = json.loads((root / "metrics" / "leaderboard.json").read_text())
    assert all(r["status"] == "completed" for r in board), board
    return sorted(((r["candidate"], r["val_accuracy"]) for r in board), key=lambda r: (-r[1], r[0]))


def _pids(root: Path, since: float) -> dict[str, int]:
    out = {}
    for path in (root / "models").glob("*/result.json"):
        try:
            if path.stat().st_mtime >= since:
                out[path.parent.name] = json.loads(path.read_text())["pid"]
        except (OSError, ValueError):  # being written
            continue
    return out


@pytest.mark.slow
def test_sweep_on_a_dask_cluster_joined_by_address(tmp_path):
    from distributed import Client

    root = make_project(tmp_path / "proj", SWEEP)
    # One thread: candidates in threads of one process share torch's global random generator.
    mmops(root, "sweep", "--runner", "threads", "--workers", "1")
    expected = _ranking(root)

    env, logs = project_env(root), tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            cwd=root,
            env=env,
            stdout=(logs / "scheduler.log").open("w"),
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        workers = [
            subprocess.Popen(
                [
                    BIN / "dask",
                    "worker",
                    address,
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--name",
                    f"w{i}",
                    "--local-directory",
                    str(tmp_path / f"w{i}"),
                ],
                cwd=root,
                env=env,
                stdout=(logs / f"w{i}.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            for i in range(2)
        ]
        procs += workers
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)

        started = time.time()
        sweep = subprocess.Popen(
            [BIN / "mmops", "sweep", "--runner", "dask", "--address", address, "--force"],
            cwd=root,
            env=env,
            stdout=(logs / "sweep.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        killed_run, completed_on = None, set()
        while sweep.poll() is None:  # kill the first worker to start a second candidate, in the middle of it
            done = set(_pids(root, started).values())
            completed_on |= done
            for marker in (root / ".mmops" / "running").glob("*.json") if killed_run is None else ():
                try:
                    info = json.loads(marker.read_text())
                except (OSError, ValueError):
                    continue
                if info.get("pid") in done and info["pid"] in {w.pid for w in workers}:
                    os.kill(info["pid"], signal.SIGKILL)
                    killed_run = info["run_id"]
                    break
            time.sleep(0.05)
        output = (logs / "sweep.log").read_text()
        assert sweep.returncode == 0, output[-4000:]
        assert killed_run, f"no worker started a second candidate:\n{output[-3000:]}"

        assert _ranking(root) == expected  # rank exactly as with threads, the retried candidate included
        # Both workers completed candidates. Dask also reruns a finished candidate whose result was still
        # held by the dead worker, so the artifacts left at the end may all be the survivor's.
        completed_on |= set(_pids(root, started).values())
        assert completed_on == {workers[0].pid, workers[1].pid}
        board = json.loads((root / "metrics" / "leaderboard.json").read_text())
        assert killed_run not in {r["run_id"] for r in board}  # its candidate completed in a new run

        # The surviving worker was warmed once (MiniLM loaded by the plugin), and a new sweep's
        # registration leaves it as it is.
        from mmops.cluster import dask_address
        from mmops.config import RunnerConfig
        from mmops.project import Project

        with Client(address, timeout=60) as client:
            before = client.run(lambda dask_worker: dask_worker.mmops_warm)
            with dask_address(Project.at(root), RunnerConfig(kind="dask", address=address)):
                pass
            after = client.run(lambda dask_worker: dask_worker.mmops_warm)
        assert next(iter(before.values()))["frozen"] == ["question"] and before == after
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
