"""Where a project keeps things, and the process environment its tools need.

Every path the pipeline reads or writes is derived here from the project root, so the CLI, the
Prefect flow, DVC's stage commands and the tests agree without passing paths around.
"""

from __future__ import annotations

import os
import subprocess
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
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.root, capture_output=True,
                                 text=True, timeout=10)
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
