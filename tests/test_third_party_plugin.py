"""A separately installed package adds a fusion through the entry point, and mmops uses it unchanged.

The example package in examples/fusion-plugin is built and installed into a throwaway folder put on
PYTHONPATH (``pip install --target``): its ``.dist-info`` makes the entry point visible exactly as in
a real install, and the project's own environment is never modified.
"""

from __future__ import annotations

import base64
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


def install_example(example: Path, tmp: Path) -> Path:
    """``pip install --target`` of an example package into ``tmp/site``; returns that folder."""
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(example, src)  # build outside the repository: setuptools writes build/ and egg-info
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return site


def on_pythonpath(site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return site


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example(EXAMPLE, tmp_path_factory.mktemp("third-party"))


@pytest.fixture
def with_plugin(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return on_pythonpath(plugin_site, monkeypatch)


def test_listed_and_conformant(with_plugin: Path, tmp_path: Path):
    listing = mmops(tmp_path, "plugins", "list").stdout
    line = next(x for x in listing.splitlines() if " mlb " in x)
    assert "fusion" in line and "mmops-mlb 0.1.0" in line and "ok" in line
    check = mmops(tmp_path, "plugins", "check", "mlb", "--params", '{"rank": 16, "hidden": 8}')
    # The six contract checks, and the fusion learns a XOR of its two inputs (`mmops plugins check` asks it).
    assert "7 passed, 0 failed" in check.stdout and "PASS learns a two-input function" in check.stdout


def test_not_visible_without_the_install(tmp_path: Path):
    assert " mlb " not in mmops(tmp_path, "plugins", "list").stdout


@pytest.mark.slow
def test_trains_with_the_plugin_chosen_in_params_only(with_plugin: Path, tmp_path: Path):
    root = make_project(
        tmp_path / "proj",
        {
            "data": {"limit": 600, "image_size": 32},
            "train": {"epochs": 2, "patience": 2, "batch_size": 64},
            "candidates": [{"name": "mlb", "fusion": "mlb", "params": {"rank": 64, "hidden": 64}}],
        },
    )
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


# ------------------------------------------------------------------ a third-party task and an attending fusion

ORDINAL = REPO / "examples" / "ordinal-plugin"
LEVELS = ["low", "medium", "high"]


@pytest.fixture(scope="module")
def ordinal_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example(ORDINAL, tmp_path_factory.mktemp("ordinal"))


@pytest.fixture
def with_ordinal(ordinal_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return on_pythonpath(ordinal_site, monkeypatch)


def test_the_documented_task_is_the_tested_one():
    """docs/plugins.md shows the example task in full; it must be exactly the file this module installs."""
    doc = (REPO / "docs" / "plugins.md").read_text()
    listing = doc.split("<!-- ordinal-task:begin -->\n```python\n", 1)[1].split("```\n<!-- ordinal-task:end -->", 1)[0]
    assert listing == (ORDINAL / "mmops_ordinal" / "task.py").read_text()


def test_task_and_attending_fusion_listed_and_conformant(with_ordinal: Path, tmp_path: Path):
    listing = mmops(tmp_path, "plugins", "list").stdout
    task = next(x for x in listing.splitlines() if " ordinal " in x)
    fusion = next(x for x in listing.splitlines() if " attentive_pool " in x)
    assert "task" in task and "mmops-ordinal 0.1.0" in task and "ok" in task
    assert "fusion" in fusion and "ok" in fusion
    for name in ("ordinal", "attentive_pool"):
        check = mmops(tmp_path, "plugins", "check", name, check=False)
        assert check.returncode == 0 and " 0 failed" in check.stdout, check.stdout


def test_a_task_failing_at_construction_is_named_with_its_package(with_ordinal: Path, tmp_path: Path):
    check = mmops(tmp_path, "plugins", "check", "ordinal", "--params", '{"levels": ["only"]}', check=False)
    assert check.returncode != 0
    assert "task 'ordinal' from mmops-ordinal 0.1.0" in check.stdout and "levels" in check.stdout


@pytest.mark.slow
def test_third_party_task_and_fusion_train_and_serve_from_the_bento(with_ordinal: Path, tmp_path: Path):
    """Ordinal levels of the bring-your-own-data regression set (tertiles of its score), learned by the
    installed task over the installed masked-attention fusion (GRU word states, CNN positions, mel
    frames), packaged and answered over HTTP by the bento."""
    import httpx
    import numpy as np
    import pandas as pd
    from byod import write_dataset
    from conftest import serve_bento

    root = tmp_path / "proj"
    mmops(tmp_path, "init", str(root), "--template", "regression")
    incoming = root / "incoming"
    manifest = write_dataset(incoming, "regression", n=180)
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    score = rows["score"].astype(float)
    cuts = np.quantile(score[rows["split"] == "train"], [1 / 3, 2 / 3])
    rows["level"] = [LEVELS[int(np.searchsorted(cuts, s))] for s in score]
    rows.to_csv(manifest, index=False)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update({"image_size": 24, "audio_seconds": 0.5})
    params["train"].update({"epochs": 8, "patience": 8, "batch_size": 32, "lr": 0.005})
    params["inputs"]["text"].update(encoder="gru_text", params={})
    params["target"] = {"column": "level", "type": "ordinal", "params": {"levels": LEVELS}}
    params.pop("select_metric", None)
    params["promotion"].pop("metric", None)
    params["candidates"] = [{"name": "pool", "fusion": "attentive_pool", "params": {"hidden": 32}}]
    params.pop("sweep", None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    mmops(root, "data", "import")
    run = mmops(root, "run", timeout=900)
    best = json.loads((root / "metrics" / "best.json").read_text())
    assert best["test"]["mae"] < 0.8 and best["test"]["accuracy"] > 0.4, best  # chance: mae 0.89, accuracy 1/3
    spec = json.loads((root / "models" / "pool" / "spec.json").read_text())
    assert spec["task"]["name"] == "ordinal" and spec["task"]["params"]["levels"] == LEVELS
    bento = run.stdout.split("bento: ", 1)[1].split()[0]

    test_rows = rows[rows["split"] == "test"].head(6)
    with serve_bento(root, bento) as (url, _):
        items = []
        for _, r in test_rows.iterrows():
            item = {
                "text": r["text"],
                "width": float(r["width"]),
                "height": float(r["height"]),
                "shop": r["shop"],
                "image": base64.b64encode((incoming / r["image"]).read_bytes()).decode(),
            }
            if r["audio"]:
                item["audio"] = base64.b64encode((incoming / r["audio"]).read_bytes()).decode()
            items.append(item)
        answers = httpx.post(f"{url}/predict_batch", json={"items": items}, timeout=60).json()
    assert len(answers) == len(items) and all(a["answer"] in LEVELS for a in answers), answers
    assert all(abs(sum(t["probability"] for t in a["top_k"]) - 1) < 1e-3 for a in answers)
