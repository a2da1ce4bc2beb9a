"""Crash safety (issue 17 item 9): one run per project at a time, a killed run leaves nothing half-done.

A run killed with SIGKILL mid-training or mid-packaging, then run again, must leave the project as an
uninterrupted run does: same ``dvc status``, same completed runs and model versions, no registry run
stuck ``running`` (it is ``aborted`` with the reason), no temporary files.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, make_project, mmops, project_env
from typer.testing import CliRunner

from mmops.project import TEMP_MARK, Project, atomic_write, run_lock

# One candidate, a few optimizer steps per epoch (OneCycleLR needs more than a handful in all).
TINY = {
    "data": {"limit": 300, "image_size": 16},
    "train": {"epochs": 3, "patience": 3, "batch_size": 32},
    "candidates": [{"name": "concat", "fusion": "concat", "params": {"hidden": 32}}],
    "promotion": {"min_accuracy": 0.0},
}


def _hold_lock_elsewhere(root: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from mmops.project import Project, run_lock\n"
        "with run_lock(Project.at(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_in_the_same_project_stops_with_a_clear_message(tmp_path, monkeypatch):
    from mmops.cli.main import app

    # A long path: the message must not be wrapped inside it or between "pid" and the number.
    root = tmp_path / ("a-project-folder-with-a-long-name-" * 3) / "proj"
    root.mkdir(parents=True)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for key in ("PREFECT_HOME", "BENTOML_HOME", "DVC_SITE_CACHE_DIR"):
        monkeypatch.setenv(key, str(root / ".mmops" / key.lower()))
    holder = _hold_lock_elsewhere(root)
    try:
        for command in ("run", "train"):
            result = CliRunner().invoke(app, [command, "-p", str(root)])
            assert result.exit_code == 1, result.output
            assert f"another mmops run is working on {root} (pid {holder.pid} on " in result.output
        with pytest.raises(Exception, match="another mmops run"), run_lock(Project.at(root)):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(Project.at(root)) as outermost:  # released by the kernel when its holder died
        assert outermost


def test_the_next_run_marks_orphaned_runs_aborted_and_removes_temp_files(tmp_path, monkeypatch):
    from mmops.pipeline import run_guard
    from mmops.registry.store import Registry

    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    project = Project.at(root)
    project.state_dir.mkdir()
    registry = Registry(project.db_url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = registry.start_run("concat", {}, 0, {}, None)
    finished = registry.start_run("gated", {}, 0, {}, None)
    registry.finish_run(finished, "completed", 1.0)
    (project.state_dir / "running").mkdir()
    for run_id in (orphan, finished):
        atomic_write(
            project.state_dir / "running" / f"{run_id}.json",
            json.dumps({"run_id": run_id, "pid": dead.pid, "host": os.uname().nodename, "started": 0}),
        )
    (project.models_dir / "concat").mkdir(parents=True)
    stale = project.models_dir / "concat" / f".result.json{TEMP_MARK}{dead.pid}"
    stale.write_text('{"half": ')
    with run_guard(project):
        pass
    run = registry.get_run(orphan)
    assert run.status == "aborted" and f"pid {dead.pid}" in run.error and "killed" in run.error
    assert registry.get_run(finished).status == "completed"  # a finished run is left as it is
    assert not list((project.state_dir / "running").iterdir()) and not stale.exists()
    registry.engine.dispose()


def _count(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def _run_and_kill(root: Path, when: str, timeout: float = 400) -> None:
    """Start `mmops run`, SIGKILL its whole process group once ``when`` is seen in the registry."""
    db = root / ".mmops" / "registry.db"
    query = {
        "training": "select count(*) from runs where status = 'running'",
        "packaging": "select count(*) from model_versions",
    }[when]
    proc = subprocess.Popen(
        [BIN / "mmops", "run"],
        cwd=root,
        env=project_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before {when} was seen"
            try:
                if db.is_file() and _count(db, query)[0][0]:
                    break
            except sqlite3.OperationalError:  # the schema is still being created
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"{when} not reached in {timeout} s")
        time.sleep(0.5 if when == "training" else 0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _state(root: Path) -> dict:
    db = root / ".mmops" / "registry.db"
    dvc = subprocess.run([BIN / "dvc", "status"], cwd=root, env=project_env(root), capture_output=True, text=True)
    return {
        "dvc status": dvc.stdout.strip(),
        "completed runs": _count(db, "select name, count(*) from runs where status = 'completed' group by name"),
        "running runs": _count(db, "select count(*) from runs where status = 'running'")[0][0],
        "model versions": _count(
            db, "select name, version, stage, model_tag != '', bento_tag != '' from model_versions order by version"
        ),
        "temp files": sorted(str(p.relative_to(root)) for p in root.rglob(f"*{TEMP_MARK}*")),
        "markers": sorted(p.name for p in (root / ".mmops" / "running").glob("*")),
        "result": sorted(json.loads((root / "models" / "concat" / "result.json").read_text())),
        "metrics": sorted(p.name for p in (root / "metrics").iterdir()),
    }


@pytest.mark.slow
def test_kill_9_during_training_and_packaging_then_rerun_equals_an_uninterrupted_run(tmp_path):
    clean = make_project(tmp_path / "clean", TINY)
    mmops(clean, "run")
    crashed = make_project(tmp_path / "crashed", TINY)
    _run_and_kill(crashed, "training")
    db = crashed / ".mmops" / "registry.db"
    [(killed_run,)] = _count(db, "select id from runs where status = 'running'")
    _run_and_kill(crashed, "packaging")  # also finds and aborts the run killed in training
    mmops(crashed, "run")

    expected, got = _state(clean), _state(crashed)
    assert got == expected
    assert expected["dvc status"] and expected["running runs"] == 0 and expected["model versions"][0][3:] == (1, 1)
    [(status, error)] = _count(db, f"select status, error from runs where id = '{killed_run}'")
    assert status == "aborted" and "killed" in error
    # Nothing was trained twice: the run killed while packaging had finished its training.
    assert _count(db, "select count(*) from runs")[0][0] == 2
