"""Where a project keeps things, and the process environment its tools need.

Every path the pipeline reads or writes is derived here from the project root, so the CLI, the
Prefect flow, DVC's stage commands and the tests agree without passing paths around.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mmops.config import Params, load_params


@dataclass(frozen=True)
class Project:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> Project:
        return cls(Path(root).resolve())

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @cached_property
    def params(self) -> Params:
        return load_params(self.params_file)

    raw_dir = property(lambda self: self.root / "data" / "raw")
    appended_dir = property(lambda self: self.root / "data" / "appended")  # `mmops data append` batches
    prepared_dir = property(lambda self: self.root / "data" / "prepared")
    features_dir = property(lambda self: self.root / "data" / "features")
    models_dir = property(lambda self: self.root / "models")
    metrics_dir = property(lambda self: self.root / "metrics")
    state_dir = property(lambda self: self.root / ".mmops")

    @property
    def db_url(self) -> str:
        return os.environ.get("MMOPS_DB_URL") or f"sqlite:///{self.state_dir / 'registry.db'}"

    def git_commit(self) -> str | None:
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=self.root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None


def configure_environment(project: Project) -> None:
    """Keep Prefect, BentoML, DVC and transformers local, offline and quiet; call before importing them."""
    project.state_dir.mkdir(parents=True, exist_ok=True)
    defaults = {
        "PREFECT_HOME": str(project.state_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "DO_NOT_TRACK": "1",
        "BENTOML_HOME": str(project.state_dir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(project.state_dir / "dvc-site"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


# ---------------------------------------------------------------- crash safety

TEMP_MARK = ".mmops-tmp-"


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``path`` so that a reader (or a run after a kill -9) sees the old file or the new one,
    never half of one: write a temporary file beside it, flush it to disk, rename it over."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a library that writes files itself (``np.save``); renamed
    over ``path`` when the block ends without an error, removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temp_files(*folders: Path) -> list[Path]:
    """Temporary files left by a process killed inside :func:`atomic_write`; call it holding the run lock."""
    removed = []
    for folder in folders:
        if folder.is_dir():
            for tmp in folder.rglob(f"*{TEMP_MARK}*"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
    return removed


class NotAProjectError(ValueError):
    """The folder lacks what the data stages run on (a DVC repository and ``dvc.yaml``); says the fix."""


def check_stages(project: Project) -> None:
    """Refuse, before a stage runs, a folder that DVC cannot run the data stages in: a hand-written
    ``params.yaml`` beside data is not yet a project, and DVC's own error ("not inside of a DVC
    repository") names neither mmops nor the fix."""
    root = project.root
    missing = []
    if not any((d / ".dvc").is_dir() for d in (root, *root.parents)):  # DVC finds its repository upwards too
        missing.append(".dvc")
    if not (root / "dvc.yaml").is_file():
        missing.append("dvc.yaml")
    if missing:
        raise NotAProjectError(
            f"{root} has no {' and no '.join(missing)}: mmops runs the data stages through DVC. "
            "Scaffold a project with `mmops init <new folder>` (`--template`: see `mmops init --help`) and "
            "move your params.yaml and data/ into it, or run `dvc init` here and take dvc.yaml from such a project"
        )


class ProjectBusyError(RuntimeError):
    """Another mmops process is running this project; the message says which and what to do."""


_held: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth): re-entrant within one process


@contextlib.contextmanager
def run_lock(project: Project, wait: bool = False) -> Iterator[bool]:
    """One run at a time per project: an exclusive ``flock`` on ``.mmops/run.lock``.

    The kernel releases it when the holder dies, even by SIGKILL, so a crashed run never leaves the
    project locked. Re-entrant in one process (``mmops run`` holds it and calls the flow, which takes
    it too). Yields True to the outermost holder: the one that should clean up after a crashed run.
    ``wait``: block until the other run ends instead of raising :class:`ProjectBusyError`.
    """
    project.state_dir.mkdir(parents=True, exist_ok=True)
    path = project.state_dir / "run.lock"
    if path in _held:
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
        try:
            yield False
        finally:
            fd, depth = _held[path]
            _held[path] = (fd, depth - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                raise ProjectBusyError(
                    f"another mmops run is working on {project.root} ({_describe(holder)}); "
                    "wait for it to finish or stop it, then run again"
                ) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.time(),
                    "command": " ".join(sys.argv[:3]),
                }
            ).encode(),
            0,
        )
        _held[path] = (fd, 1)
        try:
            yield True
        finally:
            del _held[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "lock file .mmops/run.lock"
