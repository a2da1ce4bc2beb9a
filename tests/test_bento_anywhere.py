"""A bento serves anywhere its own env/python installs: it carries the wheels of every plugin package the model
uses, its service imports nothing of training, and rebuilding it never packs BentoML's own folders.

Builds run in subprocesses: BentoML reads BENTOML_HOME once, at import, and the plugin package is visible only
on the PYTHONPATH those subprocesses get (the project's environment is never modified).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO, free_port, make_project

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


def _src_files(bento: Path) -> set[str]:
    return {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}


def test_rebuilding_an_init_project_packs_its_own_files_and_the_plugin_wheels(plugin_site: Path, tmp_path: Path):
    """BENTOML_HOME inside the project (as mmops sets it): an unanchored include copied the store into the bento."""
    from mmops.scaffold import init_project

    root = init_project(tmp_path / "proj", "vqa", git=False)
    home = root / ".mmops" / "bentoml"
    spec = {**TINY_SPEC, "fusion": {"name": "mlb", "params": {"rank": 4, "hidden": 8}}}
    first, second = build(spec, root, home, times=2, site=plugin_site)
    for bento in (first, second):
        assert _src_files(bento) == {"bentofile.yaml", "params.yaml"}, sorted(_src_files(bento))[:20]
        wheels = {w.name for w in (bento / "env" / "python" / "wheels").iterdir()}
        assert wheels == {"mmops-0.1.0-py3-none-any.whl", "mmops_mlb-0.1.0-py3-none-any.whl"}


def test_a_bentofile_written_before_patterns_were_anchored_still_builds_clean(tmp_path: Path):
    from mmops.scaffold import init_project

    root = init_project(tmp_path / "proj", "vqa", git=False)
    bentofile = root / "bentofile.yaml"
    old = bentofile.read_text().replace('"/params.yaml"', '"params.yaml"').replace('exclude:\n  - "/.mmops/"\n', "")
    assert '- "params.yaml"' in old and "/.mmops/" not in old
    bentofile.write_text(old)
    [bento] = build(TINY_SPEC, root, root / ".mmops" / "bentoml")
    assert _src_files(bento) == {"bentofile.yaml", "params.yaml"}, sorted(_src_files(bento))[:20]


def _record_is_true(wheel: Path) -> bool:
    """Every file of the wheel is in its RECORD with its sha256 and size, as installers expect."""
    import base64
    import hashlib

    with zipfile.ZipFile(wheel) as z:
        [record] = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        rows = {row[0]: row[1:] for row in csv.reader(z.read(record).decode().splitlines())}
        for name in z.namelist():
            if name != record:
                data = z.read(name)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                if rows.get(name) != [f"sha256={digest}", str(len(data))]:
                    return False
    return set(rows) == set(z.namelist())


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
    site = tmp_path / "site"
    shutil.copytree(plugin_site, site)  # changed below; other tests share the fixture
    [info] = site.glob("mmops_mlb-*.dist-info")

    def wheel(out: Path) -> Path:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec), str(out)],
            capture_output=True,
            text=True,
            env=_env(tmp_path / "bentoml", site),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        names, [path] = json.loads(proc.stdout.splitlines()[-1])
        assert names == ["mmops-mlb"]
        assert Path(path).name == "mmops_mlb-0.1.0-py3-none-any.whl"
        return Path(path)

    expected = {"mmops_mlb/__init__.py", "mmops_mlb/fusion.py", "mmops_mlb-0.1.0.dist-info/entry_points.txt"}
    # `pip install DIR`: built from that folder, which direct_url.json names.
    assert expected <= _files(wheel(tmp_path / "from-source"))

    # Installed from an index: no source folder recorded, so the wheel is packed from the installed files.
    direct_url = info / "direct_url.json"
    direct_url.unlink()
    repacked = wheel(tmp_path / "repacked")
    assert expected <= _files(repacked) and not any("__pycache__" in f for f in _files(repacked))
    assert _record_is_true(repacked)
    reinstalled = tmp_path / "reinstalled"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(reinstalled), str(repacked)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    entry_points = next(reinstalled.glob("*.dist-info/entry_points.txt")).read_text()
    assert "mlb = mmops_mlb.fusion:MLBFusion" in entry_points

    # `pip install -e DIR`: the installed files are only a pointer; the wheel is built from DIR as it is now.
    source = tmp_path / "editable-src"
    shutil.copytree(EXAMPLE, source)
    (source / "mmops_mlb" / "edited.py").write_text("EDITED = True\n")
    direct_url.write_text(json.dumps({"url": source.as_uri(), "dir_info": {"editable": True}}))
    shutil.rmtree(site / "mmops_mlb")
    assert expected | {"mmops_mlb/edited.py"} <= _files(wheel(tmp_path / "editable"))
    assert not (source / "build").exists()  # built from a copy: the user's folder is left as it was

    assert package.plugin_distributions(TINY_SPEC) == []  # built-ins travel in the mmops wheel


def test_a_plugin_the_environment_lacks_is_named_before_building():
    from mmops.core.plugin_registry import PluginError
    from mmops.serving.package import plugin_distributions

    with pytest.raises(PluginError, match=r"fusion 'mlb'.*install the package"):
        plugin_distributions({**TINY_SPEC, "fusion": {"name": "mlb", "params": {}}})


# Trains the default candidate and the third-party one on a little easy-VQA (no flow, no DVC: the bentos are
# the point here), then builds a bento for each in this one process.
TRAIN_AND_BUILD = """
import json, sys
from pathlib import Path
from mmops.data.easyvqa import import_easy_vqa
from mmops.data.featurize import featurize
from mmops.data.prepare import prepare
from mmops.pipeline import train_one
from mmops.project import Project, configure_environment
from mmops.serving.package import build_bento, save_to_store
project = Project.at(sys.argv[1])
configure_environment(project)
params, data = project.params, project.root / "data"
import_easy_vqa(data / "raw", limit=params.data.limit)
prepare(data / "raw", project.prepared_dir, params)
featurize(project.prepared_dir, project.features_dir, params)
built = {}
for candidate in params.candidates:
    result = train_one(project, candidate)
    assert result["status"] == "completed", result
    tag = save_to_store(Path(result["model_dir"]), "easy-vqa", labels={"registry_version": candidate.name}, metadata={})
    built[candidate.name] = [tag, build_bento(tag)]
print(json.dumps(built))
"""
# Run by the fresh environment's python: the service's own model process answers a decoded request, and
# nothing of training (the flow, DVC, Prefect, the registry, the training loop) was imported on the way.
CHECK = """
import json, sys
from pathlib import Path
import mmops
import mmops.serving.service as service
from mmops.serving.predictor import Limits, RowDecoder
model = service.ModelService()
spec = json.loads((Path(model.model_ref.path) / "spec.json").read_text())
row = RowDecoder(spec, Limits(spec)).validate({"image": Path(sys.argv[1]).read_bytes(), "question": sys.argv[2]})
[answer] = model.infer([row])
training = sorted(m for m in sys.modules if m.split(".")[0] in {"prefect", "dvc", "mmops_flows"}
                  or m.startswith(("mmops.training", "mmops.pipeline", "mmops.registry")))
print(json.dumps({"mmops": mmops.__file__, "answer": answer["answer"], "training_modules": training,
                  "fusion": type(model.predictor.model.fusion).__module__}))
"""


def _clean_env(venv: Path, home: Path) -> dict[str, str]:
    """Only the fresh environment: its bin first, no PYTHONPATH, no project, the relocated BentoML home."""
    keep = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in ("HOME", "LANG", "TMPDIR")}
    return {
        **keep,
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "VIRTUAL_ENV": str(venv),
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "PIP_NO_COMPILE": "1",  # the same files, minutes faster: byte code is written on first import anyway
    }


def _relocate(store: Path, home: Path, model_tag: str, bento_tag: str) -> Path:
    """What `bentoml export` + `import` (or containerize) carries to another machine: the bento and its model."""
    for kind, tag in (("models", model_tag), ("bentos", bento_tag)):
        name, version = tag.split(":")
        shutil.copytree(store / kind / name / version, home / kind / name / version)
    return home / "bentos" / bento_tag.replace(":", "/")


def _serve_and_ask(venv: Path, home: Path, bento_tag: str, image: Path, question: str) -> dict:
    port = free_port()
    log = home / f"serve-{port}.log"
    proc = subprocess.Popen(
        [venv / "bin" / "bentoml", "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)],
        cwd=home,
        env=_clean_env(venv, home),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise AssertionError(log.read_text()[-4000:])
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        r = httpx.post(
            f"{url}/predict",
            files={"image": ("q.png", image.read_bytes(), "image/png")},
            data={"question": question},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_bentos_serve_from_an_environment_made_of_their_own_files_only(plugin_site: Path, tmp_path: Path):
    """The default model and one with a third-party fusion, each served from a bento in a fresh virtual environment
    that has only what the bento's env/python installs (requirements.txt from the local index, then its wheels)."""
    root = make_project(
        tmp_path / "proj",
        {
            "data": {"limit": 150, "image_size": 16},
            "train": {"epochs": 1, "patience": 1, "batch_size": 64},
            "candidates": [
                {"name": "concat", "fusion": "concat", "params": {"hidden": 16}},
                {"name": "mlb", "fusion": "mlb", "params": {"rank": 8, "hidden": 16}},
            ],
        },
    )
    store = root / ".mmops" / "bentoml"
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_BUILD, str(root)],
        env=_env(store, plugin_site),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = json.loads(proc.stdout.splitlines()[-1])
    row = next(r for r in csv.DictReader((root / "data" / "raw" / "manifest.csv").open()) if r["split"] == "test")
    image, question = root / "data" / "raw" / row["image"], row["question"]

    home, venv = tmp_path / "elsewhere", tmp_path / "venv"
    default, plugin = (_relocate(store, home, *built[name]) for name in ("concat", "mlb"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)  # no system site-packages

    def install(bento: Path) -> None:  # what the bento's container runs
        done = subprocess.run(
            ["bash", str(bento / "env" / "python" / "install.sh")],
            env=_clean_env(venv, home),
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def check(model_tag: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [venv / "bin" / "python", "-c", CHECK, str(image), question],
            cwd=home,
            env={**_clean_env(venv, home), "MMOPS_MODEL_TAG": model_tag},
            capture_output=True,
            text=True,
            timeout=600,
        )

    install(default)
    first = check(built["concat"][0])
    assert first.returncode == 0, first.stderr[-4000:]
    answer = json.loads(first.stdout.splitlines()[-1])
    assert answer["mmops"].startswith(str(venv)) and answer["training_modules"] == []
    assert answer["fusion"] == "mmops_plugins.fusions.concat"
    served = _serve_and_ask(venv, home, built["concat"][1], image, question)
    assert served["model"] == "concat" and served["answer"] == answer["answer"]

    # Without the plugin bento's own wheels the plugin model cannot load: its fusion is nowhere.
    lacking = check(built["mlb"][0])
    assert lacking.returncode != 0 and "unknown fusion 'mlb'" in lacking.stderr
    # The plugin bento's env/python is the default one plus the plugin's wheel: installing it over this
    # environment gives the environment it would make from nothing (the same requirements, the same mmops wheel).
    env_files = [b / "env" / "python" for b in (default, plugin)]
    assert (env_files[0] / "requirements.txt").read_text() == (env_files[1] / "requirements.txt").read_text()
    assert {w.name for w in (env_files[1] / "wheels").iterdir()} == {
        "mmops-0.1.0-py3-none-any.whl",
        "mmops_mlb-0.1.0-py3-none-any.whl",
    }
    assert _files(env_files[0] / "wheels" / "mmops-0.1.0-py3-none-any.whl") == _files(
        env_files[1] / "wheels" / "mmops-0.1.0-py3-none-any.whl"
    )
    install(plugin)
    second = check(built["mlb"][0])
    assert second.returncode == 0, second.stderr[-4000:]
    answer = json.loads(second.stdout.splitlines()[-1])
    assert answer["fusion"] == "mmops_mlb.fusion" and answer["training_modules"] == []
    served = _serve_and_ask(venv, home, built["mlb"][1], image, question)
    assert served["model"] == "mlb" and served["answer"] == answer["answer"]
