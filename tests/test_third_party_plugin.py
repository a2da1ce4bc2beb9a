"""A separately installed package adds a fusion through the entry point, and mmops uses it unchanged.

The example package in examples/fusion-plugin is built and installed into a throwaway folder put on
PYTHONPATH (``pip install --target``): its ``.dist-info`` makes the entry point visible exactly as in
a real install, and the project's own environment is never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_project, mmops

EXAMPLE = REPO / "examples" / "fusion-plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("third-party")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(EXAMPLE, src)  # build outside the repository: setuptools writes build/ and egg-info
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=120)
    return site


@pytest.fixture
def with_plugin(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")])))
    return plugin_site


def test_listed_and_conformant(with_plugin: Path, tmp_path: Path):
    listing = mmops(tmp_path, "plugins", "list").stdout
    line = next(x for x in listing.splitlines() if " mlb " in x)
    assert "fusion" in line and "mmops-mlb 0.1.0" in line and "ok" in line
    check = mmops(tmp_path, "plugins", "check", "mlb", "--params", '{"rank": 16, "hidden": 8}')
    assert "6 passed, 0 failed" in check.stdout


def test_not_visible_without_the_install(tmp_path: Path):
    assert " mlb " not in mmops(tmp_path, "plugins", "list").stdout


@pytest.mark.slow
def test_trains_with_the_plugin_chosen_in_params_only(with_plugin: Path, tmp_path: Path):
    root = make_project(tmp_path / "proj", {
        "data": {"limit": 600, "image_size": 32},
        "train": {"epochs": 2, "patience": 2, "batch_size": 64},
        "candidates": [{"name": "mlb", "fusion": "mlb", "params": {"rank": 64, "hidden": 64}}],
    })
    # Small encoders keep it quick; bow_text also exercises fitting on the train split in a real run.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["inputs"]["question"].update(encoder="bow_text", params={})
    params["inputs"]["image"].update(encoder="cnn_image", params={"channels": [8, 16]})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = mmops(root, "run", "--no-bento").stdout
    assert "best candidate: mlb" in out
    spec = json.loads((root / "models" / "mlb" / "spec.json").read_text())
    assert spec["fusion"]["name"] == "mlb"
    result = json.loads((root / "models" / "mlb" / "result.json").read_text())
    assert result["metrics"]["test"]["accuracy"] > 0.3
