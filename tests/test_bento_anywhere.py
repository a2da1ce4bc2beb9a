"""A bento serves anywhere its own env/python installs: it carries the wheels of every plugin package the model
uses, its service imports nothing of training, and rebuilding it never packs BentoML's own folders.

Builds run in subprocesses: BentoML reads BENTOML_HOME once, at import, and the plugin package is visible only
on the PYTHONPATH those subprocesses get (the project's environment is never modified).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO

EXAMPLE = REPO / "examples" / "fusion-plugin"
TINY_SPEC = {
    "candidate": "tiny",
    "labels": ["no", "yes"],
    "image_size": 16,
    "target": "answer",
    "seed": 0,
    "inputs": {
        "image": {"modality": "image", "encoder": "cnn_image", "params": {"channels": [4]}},
        "thumb": {"modality": "image", "encoder": "pixels", "params": {}},
    },
    "fusion": {"name": "concat", "params": {"hidden": 8}},
    "head": {"hidden": 8, "dropout": 0.0},
}
# N times in one process: save a random-weight model of SPEC into the store, build the project's bento for it.
BUILD = """
import json, sys
from pathlib import Path
from mmops.core.model import MultimodalModel
from mmops.serving.package import build_bento, save_to_store
spec, root, times = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
MultimodalModel(spec).save(root / "artifact")
tags = [save_to_store(root / "artifact", "tiny", labels={}, metadata={}) for _ in range(times)]
print(json.dumps([[tag, build_bento(tag, root / "bentofile.yaml")] for tag in tags]))
"""


def _env(home: Path, site: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENTOML_", "MMOPS_", "PYTHONPATH"))}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", HF_HUB_OFFLINE="1")
    if site:
        env["PYTHONPATH"] = str(site)
    return env


def build(spec: dict, root: Path, home: Path, times: int = 1, site: Path | None = None) -> list[Path]:
    """Bento folders built from ``root``'s bentofile, each for its own copy of a random-weight model of ``spec``."""
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, json.dumps(spec), str(root), str(times)],
        env=_env(home, site),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = []
    for model_tag, tag in json.loads(proc.stdout.splitlines()[-1]):
        bento = home / "bentos" / tag.split(":")[0] / tag.split(":")[1]
        info = yaml.safe_load((bento / "bento.yaml").read_text())
        # The model this bento serves, also where containerize looks for it: never an earlier build's.
        assert info["args"]["model_tag"] == model_tag
        assert [m["tag"] for m in info["services"][0]["models"]] == [model_tag]
        built.append(bento)
    return built


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/fusion-plugin installed from its folder into a throwaway site (as a user's ``pip install DIR``)."""
    tmp = tmp_path_factory.mktemp("third-party")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(EXAMPLE, src)
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


def _files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_rebuilding_an_init_project_packs_its_own_files_and_the_plugin_wheels(plugin_site: Path, tmp_path: Path):
    """BENTOML_HOME inside the project (as mmops sets it): an unanchored include copied the store into the bento."""
    from mmops.scaffold import init_project

    root = init_project(tmp_path / "proj", "vqa", git=False)
    home = root / ".mmops" / "bentoml"
    spec = {**TINY_SPEC, "fusion": {"name": "mlb", "params": {"rank": 4, "hidden": 8}}}
    first, second = build(spec, root, home, times=2, site=plugin_site)
    for bento in (first, second):
        src = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
        assert src == {"bentofile.yaml", "params.yaml"}, sorted(src)[:20]
        wheels = {w.name for w in (bento / "env" / "python" / "wheels").iterdir()}
        assert wheels == {"mmops-0.1.0-py3-none-any.whl", "mmops_mlb-0.1.0-py3-none-any.whl"}


def test_plugin_wheels_come_from_the_source_folder_or_the_installed_files(plugin_site: Path, tmp_path: Path):
    from mmops.serving import package

    code = """
import json, sys
from pathlib import Path
from mmops.serving.package import plugin_distributions, plugin_wheel
spec = json.loads(sys.argv[1])
names = plugin_distributions(spec)
print(json.dumps([names, [str(plugin_wheel(n, Path(sys.argv[2]))) for n in names]]))
"""
    spec = {**TINY_SPEC, "fusion": {"name": "mlb", "params": {}}}

    def wheels(out: Path) -> tuple[list[str], list[Path]]:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec), str(out)],
            capture_output=True,
            text=True,
            env=_env(tmp_path / "bentoml", plugin_site),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        names, paths = json.loads(proc.stdout.splitlines()[-1])
        return names, [Path(p) for p in paths]

    names, [built] = wheels(tmp_path / "from-source")
    assert names == ["mmops-mlb"] and built.name == "mmops_mlb-0.1.0-py3-none-any.whl"
    expected = {"mmops_mlb/__init__.py", "mmops_mlb/fusion.py", "mmops_mlb-0.1.0.dist-info/entry_points.txt"}
    assert expected <= _files(built)

    # Installed from an index: no source folder recorded, so the wheel is packed from the installed files.
    [info] = plugin_site.glob("mmops_mlb-*.dist-info")
    (info / "direct_url.json").unlink()
    _, [repacked] = wheels(tmp_path / "repacked")
    assert repacked.name == "mmops_mlb-0.1.0-py3-none-any.whl"
    assert expected <= _files(repacked) and not any("__pycache__" in f for f in _files(repacked))
    site = tmp_path / "reinstalled"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(repacked)],
        check=True,
        capture_output=True,
        timeout=120,
    )  # pip checks every file against RECORD
    assert "mlb = mmops_mlb.fusion:MLBFusion" in next(site.glob("*.dist-info/entry_points.txt")).read_text()
    assert package.plugin_distributions(TINY_SPEC) == []  # built-ins travel in the mmops wheel


def test_a_plugin_the_environment_lacks_is_named_before_building():
    from mmops.core.plugin_registry import PluginError
    from mmops.serving.package import plugin_distributions

    with pytest.raises(PluginError, match=r"fusion 'mlb'.*install the package"):
        plugin_distributions({**TINY_SPEC, "fusion": {"name": "mlb", "params": {}}})
