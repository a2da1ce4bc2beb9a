"""Shared fixtures: small mmops projects built from the repository's own dvc.yaml and params.yaml."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# A subset small enough for CI on 2 cores, large enough to learn (about 85% test accuracy).
SMALL = {
    "data": {"limit": 4000, "image_size": 32},
    "train": {"epochs": 20, "patience": 20, "batch_size": 64, "lr": 0.005},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "exclusive: bounds on latency that need the machine to themselves; `make test` runs them after the "
        "parallel part, alone",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n 2 --dist loadgroup`` (what `make test` runs): each file's tests stay on one
    worker, so its module fixtures are built once, and every test of the shared trained project runs
    on the same worker, so that project is trained once."""
    for item in items:
        group = "trained_project" if "trained_project" in getattr(item, "fixturenames", ()) else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A fresh DVC project (no git) with the repo's stages and params, plus ``overrides``."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=project_env(root))
    return root


def project_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BENTOML_", "MMOPS_"))}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "MMOPS_PROJECT": str(root),
            "PREFECT_HOME": str(root / ".mmops" / "prefect"),
            "BENTOML_HOME": str(root / ".mmops" / "bentoml"),
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(root / ".mmops" / "dvc-site"),
            "HF_HUB_OFFLINE": "1",
            "BENTOML_DO_NOT_TRACK": "true",
            "DO_NOT_TRACK": "1",
            "COLUMNS": "160",
        }
    )
    return env


def mmops(root: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [BIN / "mmops", *args], cwd=root, env=project_env(root), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mmops {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `make test` runs the suite in two pytest sessions (the parallel part, then the timing-bound tests
# alone): with this set, both use one trained project kept in that folder instead of training it twice.
SHARED_ENV = "MMOPS_TEST_SHARED"


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One full `mmops run` (flow, DVC stages, training, registry, bento) shared by the e2e tests."""
    shared = os.environ.get(SHARED_ENV)
    if not shared:
        root = make_project(tmp_path_factory.mktemp("e2e") / "proj", SMALL)
        return root, mmops(root, "run")
    from filelock import FileLock

    folder = Path(shared).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    root, done = folder / "proj", folder / "run.json"
    with FileLock(str(folder / "lock")):
        if not done.is_file():  # a half-built project from an interrupted session is rebuilt
            shutil.rmtree(root, ignore_errors=True)
            proc = mmops(make_project(root, SMALL), "run")
            done.write_text(
                json.dumps({"args": [str(a) for a in proc.args], "stdout": proc.stdout, "stderr": proc.stderr})
            )
    run = json.loads(done.read_text())
    return root, subprocess.CompletedProcess(run["args"], 0, run["stdout"], run["stderr"])


@contextlib.contextmanager
def serve_bento(
    root: Path, bento_tag: str, env: dict[str, str] | None = None, timeout: float = 90
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`bentoml serve` of a project's bento on a free local port, stopped on exit; yields (url, process).

    The server's output goes to a file, not a pipe: its access log would fill a pipe nobody reads
    and block the server mid-test.
    """
    import httpx

    port = free_port()
    log = root / f"serve-{port}.log"
    proc = subprocess.Popen(
        [BIN / "bentoml", "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)],
        cwd=root,
        env={**project_env(root), **(env or {})},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-5000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"bento did not become ready in {timeout} s:\n{log.read_text()[-5000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
