"""Scheduled retraining against a real local Prefect API, with the registry on PostgreSQL.

(`mmops run` in test_e2e covers the same lifecycle on SQLite.) Create a cron schedule, check it is
registered, run it through `mmops worker`, and see a model version reach production; append data,
run again, and see only prepare/featurize rerun and the champion/challenger decision recorded.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import BIN, free_port, make_project, project_env
from pg import pg_schema_url

from mmops.registry.store import Registry

pytestmark = pytest.mark.slow

TINY = {
    "data": {"limit": 600, "image_size": 32},
    "train": {"epochs": 2, "patience": 2, "batch_size": 64},
    "candidates": [{"name": "concat", "fusion": "concat", "params": {"hidden": 64}}],
    "promotion": {"min_accuracy": 0.0},  # two epochs on 600 rows: the rule, not the model, is under test
}


def _new_rows(folder: Path, start: int, n: int) -> Path:
    """Labelled easy-VQA rows the project has not seen, with images beside the manifest."""
    import easy_vqa

    (folder / "img").mkdir(parents=True)
    rows = []
    for split, (texts, answers, ids), paths in (
        ("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        for text, answer, image_id in list(zip(texts, answers, ids, strict=True))[start : start + n]:
            rel = f"img/{split}-{image_id}.png"
            shutil.copyfile(paths[image_id], folder / rel)
            rows.append({"question": text, "image": rel, "answer": answer, "split": split})
    rows.append({"question": "what shape is this?", "image": "img/missing.png", "answer": "circle", "split": "train"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


@pytest.fixture
def prefect_api(tmp_path):
    port = free_port()
    home = tmp_path / "prefect-server"
    env = {**project_env(tmp_path), "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    from mmops.registry.schedules import _healthy

    deadline = time.monotonic() + 90
    while not _healthy(url):
        assert proc.poll() is None and time.monotonic() < deadline, "prefect server did not start"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _wait_for_run(root: Path, env: dict, flow_run_id: str, timeout: float = 240) -> str:
    code = (
        "import sys; from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c: print(c.read_flow_run(sys.argv[1]).state.type.value)"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(
            [sys.executable, "-c", code, flow_run_id], env=env, cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s (last state {state})")


def test_schedule_worker_runs_and_champion_challenger(tmp_path, prefect_api):
    root = make_project(tmp_path / "proj", TINY)
    with pg_schema_url() as db_url:
        extra = {"PREFECT_API_URL": prefect_api, "MMOPS_DB_URL": db_url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        env = {**project_env(root), **extra}

        def cli(*args: str) -> str:
            proc = subprocess.run(
                [BIN / "mmops", *args], cwd=root, env=env, capture_output=True, text=True, timeout=120
            )
            assert proc.returncode == 0, f"mmops {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
            return proc.stdout

        t0 = time.monotonic()
        assert "nightly" in cli("schedule", "create", "--cron", "0 3 * * *", "--name", "nightly", "--no-bento")
        code = (
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    d = c.read_deployment_by_name('retrain/nightly')\n"
            "    print([s.schedule.cron for s in d.schedules], d.paused, d.parameters['project_dir'])"
        )
        registered = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert registered.strip() == f"['0 3 * * *'] False {root}"
        assert "paused" in cli("schedule", "pause", "nightly") and "paused" in cli("schedule", "list")
        cli("schedule", "resume", "nightly")
        listed = cli("schedule", "list")
        assert "0 3 * * *" in listed and "active" in listed

        worker = subprocess.Popen(
            [BIN / "mmops", "worker"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            print(f"{time.monotonic() - t0:.0f} s: worker started")
            first = cli("schedule", "run", "nightly").split()[2]
            assert _wait_for_run(root, env, first) == "COMPLETED"
            print(f"{time.monotonic() - t0:.0f} s: first run done")
            registry = Registry(db_url)
            v1 = registry.get_version("easy-vqa")
            assert (v1.version, v1.stage) == (1, "production") and v1.run.flow_run_id

            out = cli("data", "append", str(_new_rows(tmp_path / "new", 600, 150)))
            assert "appended 301 rows" in out and "data/appended/" in out
            second = cli("schedule", "run", "nightly").split()[2]
            assert _wait_for_run(root, env, second) == "COMPLETED"
            print(f"{time.monotonic() - t0:.0f} s: second run done")
        finally:
            worker.terminate()
            log = worker.communicate(timeout=30)[0]
        assert "serving nightly" in log

        v2 = registry.get_version("easy-vqa", 2)
        assert v2.stage in ("production", "staging") and v2.data_version_id != v1.data_version_id
        [decision] = [e for e in registry.events("easy-vqa", 2) if e.action == "champion-challenger"]
        assert decision.details["stages"] == {"import": "skipped", "prepare": "ran", "featurize": "ran"}
        assert decision.details["champion"] == "easy-vqa:1" and decision.details["champion_score"] is not None
        assert decision.details["flow_run_id"] and decision.reason
        quarantine = pd.read_csv(root / "data" / "prepared" / "quarantine.csv")
        assert quarantine["source"].str.startswith("appended/").sum() == 1  # the row whose image is missing
        assert "nightly: deleted" in cli("schedule", "delete", "nightly")
        registry.engine.dispose()


# ---------------------------------------------------------------- a schedule that fires by itself

MINUTELY = {
    "data": {"limit": 300, "image_size": 16},
    "train": {"epochs": 2, "patience": 2, "batch_size": 32},
    "candidates": [{"name": "concat", "fusion": "concat", "params": {"hidden": 32}}],
    "promotion": {"min_accuracy": 0.0},
}

_FLOW_RUNS = """
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    d = c.read_deployment_by_name("retrain/" + sys.argv[1])
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))
    print(json.dumps([{"id": str(r.id), "state": r.state.type.value if r.state else None,
                       "auto": r.auto_scheduled, "expected": r.expected_start_time.timestamp(),
                       "start": r.start_time.timestamp() if r.start_time else None} for r in runs]))
"""


def _flow_runs(root: Path, env: dict, name: str) -> list[dict]:
    import json

    out = subprocess.run(
        [sys.executable, "-c", _FLOW_RUNS, name], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wait(what: str, check, timeout: float, every: float = 3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def test_a_schedule_fires_by_itself_through_mmops_worker(tmp_path):
    """README's two commands: `mmops schedule create` and `mmops worker` (which starts its own Prefect
    server). The scheduled runs happen on their own; each is recorded with its own flow-run id; the tick
    after `mmops data append` reruns only prepare and featurize; a paused schedule fires nothing; the
    worker stops cleanly on SIGTERM, taking its server with it."""
    import sqlite3

    from mmops.registry.schedules import _healthy

    root = make_project(tmp_path / "proj", MINUTELY)
    env = project_env(root)
    db = root / ".mmops" / "registry.db"

    def cli(*args: str) -> str:
        proc = subprocess.run([BIN / "mmops", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"mmops {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def sql(query: str, *args) -> list[tuple]:
        with sqlite3.connect(db) as conn:
            return conn.execute(query, args).fetchall()

    t0 = time.monotonic()
    assert "minutely" in cli("schedule", "create", "--cron", "* * * * *", "--name", "minutely", "--no-bento")
    port = free_port()
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [BIN / "mmops", "worker", "--port", str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait("the worker's Prefect server", lambda: _healthy(url), 180, 1)
        api_env = {**env, "PREFECT_API_URL": url}

        def finished_after(moment: float) -> dict | None:
            runs = _flow_runs(root, api_env, "minutely")
            assert not [r for r in runs if r["state"] in ("FAILED", "CRASHED")], runs
            done = [r for r in runs if r["state"] == "COMPLETED" and r["auto"] and r["start"] > moment]
            return min(done, key=lambda r: r["start"]) if done else None

        first = _wait("a first scheduled run", lambda: finished_after(0), 600)
        print(f"{time.monotonic() - t0:.0f} s: first scheduled run {first['id']} done")
        [(v1_run,)] = sql("select run_id from model_versions where version = 1")
        assert sql("select flow_run_id, status from runs where id = ?", v1_run) == [(first["id"], "completed")]

        assert "appended 301 rows" in cli("data", "append", str(_new_rows(tmp_path / "new", 600, 150)))

        def retrained() -> dict | None:  # the scheduled run that picked up the appended rows
            done = {r["id"]: r for r in _flow_runs(root, api_env, "minutely") if r["state"] == "COMPLETED"}
            v2 = sql("select r.flow_run_id from model_versions v join runs r on r.id = v.run_id where v.version = 2")
            return done.get(v2[0][0]) if v2 else None

        second = _wait("a scheduled run that retrains on the appended rows", retrained, 600)
        print(f"{time.monotonic() - t0:.0f} s: scheduled run {second['id']} after the append done")
        assert second["auto"] and second["id"] != first["id"]
        # Only what changed reran: not the import stage, and one candidate run, on the new data.
        assert [s for (s,) in sql("select status from runs where flow_run_id = ?", second["id"])] == ["completed"]
        [(details,)] = sql("select details from events where action = 'champion-challenger' and version = 2")
        import json

        details = json.loads(details)
        assert details["stages"] == {"import": "skipped", "prepare": "ran", "featurize": "ran"}
        assert details["flow_run_id"] == second["id"]

        assert "paused" in cli("schedule", "pause", "minutely")
        paused = time.time()
        time.sleep(75)  # past the next minute boundary and the runner's polling
        # Nothing due after the pause may exist, run or not. A run due before it that the worker had
        # already claimed (Pending) still runs, and may start after the pause on a loaded machine.
        late = [r for r in _flow_runs(root, api_env, "minutely") if (r["expected"] or 0) > paused]
        assert not late, f"runs due after the pause: {late}"
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=90)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
        log.close()
    output = (tmp_path / "worker.log").read_text()
    assert code == 0, output
    assert "serving minutely" in output and "worker: stopped" in output
    assert not _healthy(url) and not (root / ".mmops" / "prefect-api-url").exists()  # its server stopped too
