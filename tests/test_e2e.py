"""The spine end to end: `mmops run` from a fresh project, then a rerun that skips unchanged stages."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import BIN, mmops, project_env

from mmops.registry.store import Registry

pytestmark = pytest.mark.slow


def test_run_versions_trains_registers_and_packages(trained_project):
    root, proc = trained_project
    out = proc.stdout
    for stage in ("import", "prepare", "featurize"):
        assert f"stage {stage}" in out and "ran" in out.split(f"stage {stage}")[1].splitlines()[0]
    assert "Leaderboard" in out and "model version: easy-vqa:1" in out and "bento: mmops:" in out
    board = json.loads((root / "metrics" / "leaderboard.json").read_text())
    assert {r["candidate"] for r in board} == {"concat", "product"}
    best = json.loads((root / "metrics" / "best.json").read_text())
    assert best["selected_by"] == "val_accuracy"
    assert best["val"]["accuracy"] == max(r["val_accuracy"] for r in board)
    # Far above the question-only prior (about 67%): the image branch learned.
    assert best["test"]["accuracy"] > 0.75
    assert set(best["test"]["by_type"]) == {"yes/no", "shape", "colour"}
    assert (root / "models" / best["best"] / "model.safetensors").is_file()
    assert (root / "metrics" / "confusion.json").is_file()

    registry = Registry(f"sqlite:///{root / '.mmops' / 'registry.db'}")
    runs = registry.runs()
    assert {r.name for r in runs} == {"concat", "product"} and all(r.status == "completed" for r in runs)
    run = registry.get_run(board[0]["run_id"])
    assert run.seed == 42 and "prepare:data/prepared" in run.data_version.hashes and run.duration_s > 0
    assert any(m.key == "val_accuracy" and m.step == 1 for m in run.metrics)
    [version] = registry.model_versions("easy-vqa")
    assert version.bento_tag.startswith("mmops:") and version.metrics["val_accuracy"] == best["val"]["accuracy"]
    # The first model that meets the minimums becomes production, with the decision on record.
    assert version.stage == "production" and "promoted to production" in out
    [decision] = registry.events("easy-vqa")
    assert decision.action == "champion-challenger" and decision.details["stages"]["prepare"] == "ran"

    status = subprocess.run(
        [BIN / "dvc", "status"], cwd=root, env=project_env(root), capture_output=True, text=True, check=True
    )
    assert "up to date" in status.stdout


def test_rerun_with_nothing_changed_is_a_no_op(trained_project):
    root, _ = trained_project
    proc = mmops(root, "run")
    for stage in ("import", "prepare", "featurize"):
        assert "skipped (unchanged)" in proc.stdout.split(f"stage {stage}")[1].splitlines()[0]
    assert "nothing changed: easy-vqa:1" in proc.stdout and "Leaderboard" in proc.stdout
    assert len(Registry(f"sqlite:///{root / '.mmops' / 'registry.db'}").runs()) == 2  # nothing retrained


def test_forced_rerun_skips_unchanged_stages_and_is_deterministic(trained_project):
    root, _ = trained_project
    before = json.loads((root / "metrics" / "leaderboard.json").read_text())
    proc = mmops(root, "run", "--no-bento", "--force")
    for stage in ("import", "prepare", "featurize"):
        assert f"stage {stage}" in proc.stdout
        assert "skipped (unchanged)" in proc.stdout.split(f"stage {stage}")[1].splitlines()[0]
    # Same data, same seed: the challenger ties the champion, so it is staged and the champion stays.
    assert "easy-vqa:2 staged to staging" in proc.stdout and "does not beat the champion" in proc.stdout
    after = json.loads((root / "metrics" / "leaderboard.json").read_text())
    assert {a["run_id"] for a in after}.isdisjoint({b["run_id"] for b in before})  # really retrained
    for a, b in zip(before, after, strict=True):
        assert (a["candidate"], a["val_accuracy"], a["test_accuracy"]) == (
            b["candidate"],
            b["val_accuracy"],
            b["test_accuracy"],
        )


def test_cli_evaluate_and_predict(trained_project):
    root, _ = trained_project
    proc = mmops(root, "evaluate")
    assert "val" in proc.stdout and "test" in proc.stdout and "yes/no" in proc.stdout
    proc = mmops(root, "predict", "--image", "data/raw/images/test/0.png", "--question", "what color is the shape?")
    answer = proc.stdout.split()[0]
    labels = json.loads((root / "data" / "prepared" / "labels.json").read_text())
    assert answer in labels
    bad = mmops(root, "predict", "--image", "dvc.yaml", "--question", "what shape?", check=False)
    assert bad.returncode == 2 and "image" in bad.stderr and "not a decodable image" in bad.stderr
