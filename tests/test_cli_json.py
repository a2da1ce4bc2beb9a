"""Listings and `show` commands for scripts and pipes: `--json` with full ids, and tables that never cut an id.

Piped, rich fitted tables into 80 columns and cut cells ("producti…", "easy-vqa…"). CliRunner's stdout is
not a terminal, exactly like a pipe.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from mmops.cli.main import app
from mmops.registry.store import Registry

NAME = "easy-vqa-classifier-with-a-long-name"


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[dict[str, str], list[str]]]:
    """A project whose registry holds three runs and versions of NAME, version 2 in production."""
    saved = dict(os.environ)  # loading a project sets PREFECT_HOME, BENTOML_HOME, ... for the process
    shutil.copy(REPO / "params.yaml", tmp_path)
    db_url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(db_url)
    runs = []
    for i in range(3):
        run = registry.start_run(
            f"candidate-{i}",
            {"train": {"lr": 0.001 * (i + 1)}},
            1,
            {"prepare:data/prepared": f"hash{i}"},
            "abc123",
            flow_run_id=f"flow-run-{i}",
        )
        registry.log_metrics(run, {"val_accuracy": 0.5 + i / 10, "train_loss": 1.0 / (i + 1)}, step=1)
        registry.log_metrics(run, {"val_accuracy": 0.6 + i / 10, "test_accuracy": 0.55 + i / 10})
        registry.finish_run(run, "completed", 1.5)
        registry.add_model_version(
            NAME, run, {"val_accuracy": 0.6 + i / 10}, model_tag=f"{NAME}:tag{i}", bento_tag=f"mmops:bento-tag-{i}"
        )
        runs.append(run)
    registry.transition(NAME, 2, "production", "best so far")
    yield {"MMOPS_DB_URL": db_url, "MMOPS_PROJECT": str(tmp_path), "COLUMNS": "60"}, runs
    os.environ.clear()
    os.environ.update(saved)


def _invoke(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def test_listings_and_shows_print_json_with_full_ids(project):
    env, runs = project
    listed = json.loads(_invoke(env, "runs", "list", "--json"))
    assert {r["id"] for r in listed} == set(runs) and all(len(r["id"]) == 32 for r in listed)
    assert sorted(r["final_metrics"]["test_accuracy"] for r in listed) == pytest.approx([0.55, 0.65, 0.75])

    shown = json.loads(_invoke(env, "runs", "show", runs[1][:6], "--json"))
    assert shown["id"] == runs[1] and shown["flow_run_id"] == "flow-run-1"
    assert shown["config"] == {"train": {"lr": 0.002}}
    assert shown["per_epoch"] == [{"epoch": 1, "val_accuracy": pytest.approx(0.6), "train_loss": 0.5}]
    assert shown["data_version"]["hashes"] == {"prepare:data/prepared": "hash1"}

    versions = json.loads(_invoke(env, "models", "list", "--json"))
    assert [(v["ref"], v["stage"]) for v in versions] == [
        (f"{NAME}:3", "candidate"),
        (f"{NAME}:2", "production"),
        (f"{NAME}:1", "candidate"),
    ]
    assert {v["run_id"] for v in versions} == set(runs)
    assert versions[0]["bento_tag"] == "mmops:bento-tag-2"

    model = json.loads(_invoke(env, "models", "show", f"{NAME}:2", "--json"))
    assert model["stage"] == "production" and model["production"] == f"{NAME}:2" and model["run_id"] == runs[1]
    assert model["events"][-1]["reason"] == "best so far" and model["events"][-1]["to_stage"] == "production"

    lineage = json.loads(_invoke(env, "lineage", f"{NAME}:1", "--json"))
    assert lineage["run"]["id"] == runs[0] and lineage["run"]["git_commit"] == "abc123"
    assert lineage["data_version"]["hashes"] == {"prepare:data/prepared": "hash0"}

    plugins = json.loads(_invoke(env, "plugins", "list", "--json"))
    concat = next(p for p in plugins if p["name"] == "concat")
    assert concat["kind"] == "fusion" and concat["package"] == "mmops" and concat["error"] is None
    assert {p["kind"] for p in plugins} >= {"encoder", "fusion"}


def test_piped_tables_never_cut_ids_or_stages(project):
    env, runs = project  # 60 columns, not a terminal
    out = _invoke(env, "models", "list")
    assert "…" not in out
    for ref, stage in ((f"{NAME}:3", "candidate"), (f"{NAME}:2", "production")):
        line = next(x for x in out.splitlines() if ref in x)
        assert stage in line and "mmops:bento-tag" in line
    out = _invoke(env, "runs", "list")
    assert "…" not in out and all(run[:8] in out for run in runs) and "candidate-2" in out
    out = _invoke(env, "plugins", "list")
    assert "…" not in out and "low_rank_tensor" in out and "cross_attention" in out
    assert runs[0] in _invoke(env, "lineage", f"{NAME}:1")
