"""Ship a trained artifact: save it into the BentoML model store and build a bento around it.

A bento must serve anywhere its ``env/python`` can be installed, with nothing else: it carries the mmops
wheel and the wheel of every other package that provides a plugin the model uses (a third-party fusion,
encoder or task). Those wheels come from what is installed here: a plugin installed from a source folder
(``pip install -e`` or ``pip install ./dir``) is built from that folder; one installed from an index is
packed back into a wheel from its installed files.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

import mmops

SOURCE_ROOT = Path(mmops.__file__).resolve().parent.parent


def save_to_store(artifact: Path, name: str, labels: dict[str, str], metadata: dict) -> str:
    import bentoml

    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        shutil.copytree(artifact, model.path, dirs_exist_ok=True)
    return str(model.tag)


def build_bento(model_tag: str, bentofile: Path | None = None) -> str:
    """``bentoml build`` of ``bentofile.yaml`` with the model tag as a build argument.

    ``bentofile`` is the project's own (``mmops init`` writes one) or the mmops source tree's. Either
    way the bento carries the mmops wheel built from the code that trained the model, and the wheels of
    the packages that provide the model's other plugins, so a container gets their entry points too.
    """
    import bentoml

    from mmops.core.model import SPEC_FILE

    bentofile = (bentofile or SOURCE_ROOT / "bentofile.yaml").resolve()
    if not bentofile.is_file():
        raise FileNotFoundError(f"{bentofile}: no bentofile; run `mmops init` or add one")
    if not (SOURCE_ROOT / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{SOURCE_ROOT}: mmops is not installed from a source tree (pip install -e), "
            "so its wheel cannot be built into the bento"
        )
    spec = json.loads((Path(bentoml.models.get(model_tag).path) / SPEC_FILE).read_text())
    dist = bentofile.parent / "dist"
    build_wheel(SOURCE_ROOT, dist)
    # BentoML refuses absolute wheel paths: relative to the bentofile's folder, the working directory below.
    plugins = [
        f"./{plugin_wheel(name, dist).relative_to(bentofile.parent).as_posix()}" for name in plugin_distributions(spec)
    ]
    config = yaml.safe_load(bentofile.read_text())
    python = config.setdefault("python", {}) or {}
    python["wheels"] = [*python.get("wheels", []), *plugins]
    config["python"] = python
    config["exclude"] = [*(config.get("exclude") or []), *_never_packed(bentofile.parent)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(bentofile.parent):
        # BentoML resolves the bentofile's wheel paths against the working directory, not build_ctx; the
        # bentofile with the plugin wheels added lives outside the build context, so it is never packed.
        effective = Path(tmp) / "bentofile.yaml"
        effective.write_text(yaml.safe_dump(config, sort_keys=False))
        # reload: the service module reads the model tag when imported; a second build in this process
        # would otherwise record the first build's model in bento.yaml.
        bento = bentoml.bentos.build_bentofile(
            str(effective),
            build_ctx=str(bentofile.parent),
            args={"model_tag": model_tag},
            labels={"model": model_tag},
            reload=True,
        )
    return str(bento.tag)


def _never_packed(build_ctx: Path) -> list[str]:
    """Exclude patterns for the project's state folder and the BentoML home when they lie in the build context.

    BentoML builds in a temporary folder under its home; with the home inside the project (mmops' default,
    ``.mmops/bentoml``) an include pattern that matches at any depth (``params.yaml`` in bentofiles written
    before they were anchored) copied that folder into itself until the path was too long.
    """
    homes = [build_ctx / ".mmops", Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")]
    return [
        f"/{home.resolve().relative_to(build_ctx).as_posix()}/"
        for home in homes
        if home.resolve().is_relative_to(build_ctx) and home.resolve() != build_ctx
    ]


def build_wheel(source: Path, out: Path) -> Path:
    """The mmops wheel the bento installs, so a container gets the plugins' entry points too.

    Built offline from the source tree (no build isolation: setuptools is already here).
    """
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out / f"mmops-{mmops.__version__}-py3-none-any.whl"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def plugin_distributions(spec: dict[str, Any]) -> list[str]:
    """The installed distributions, other than mmops, that provide the encoders, fusion and task of ``spec``."""
    from mmops.core.plugin_registry import GROUPS, PluginError, discover

    task = spec.get("task") or {}
    used = [("encoder", item["encoder"]) for item in spec["inputs"].values()]
    used += [("fusion", spec["fusion"]["name"]), ("task", task.get("name") or task.get("type") or "classification")]
    found: list[str] = []
    for kind, name in used:
        if kind not in GROUPS or name is None:  # no fusion: one input, or a task that combines the inputs
            continue
        info = discover(kind).get(name)
        if info is None:
            raise PluginError(
                f"the model uses {kind} '{name}', which no installed package provides: install the "
                f"package that provides it before packaging the model"
            )
        if _canonical(info.package) != "mmops" and info.package not in found:
            found.append(info.package)
    return found


def _source_folder(dist: metadata.Distribution) -> Path | None:
    """The folder a distribution was installed from (``pip install -e DIR`` or ``pip install DIR``), if it exists.

    pip records it in ``direct_url.json`` (PEP 610); a VCS or archive URL gives None.
    """
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    url = urlparse(info.get("url", ""))
    if url.scheme != "file" or "dir_info" not in info:
        return None
    folder = Path(unquote(url.path))
    return folder if folder.is_dir() else None


def plugin_wheel(name: str, out: Path) -> Path:
    """A wheel of the installed distribution ``name`` in ``out``: from its source folder when it was installed
    from one (an editable install has only a pointer to it), otherwise packed from its installed files."""
    dist = metadata.distribution(name)
    out.mkdir(parents=True, exist_ok=True)
    source = _source_folder(dist)
    if source is None:
        return repack_wheel(dist, out)
    with tempfile.TemporaryDirectory() as tmp:
        # A copy: setuptools writes build/ and *.egg-info into the folder it builds.
        skip = shutil.ignore_patterns("build", "*.egg-info", ".git", ".venv", "__pycache__")
        shutil.copytree(source, Path(tmp) / "src", ignore=skip)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                tmp,
                str(Path(tmp) / "src"),
            ],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"cannot build a wheel of plugin package {name} from {source} for the bento "
                f"(pip wheel exited {proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        return Path(shutil.copy2(wheels[0], out / wheels[0].name))


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack_wheel(dist: metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution rebuilt from the files its RECORD lists.

    Installer-written files (RECORD, INSTALLER, REQUESTED, direct_url.json), byte code and files installed
    outside the package folder (console scripts, which pip regenerates from entry_points.txt) are left out.
    """
    files = [f for f in dist.files or [] if f.parts[0] != ".." and "__pycache__" not in f.parts]
    info_dir = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info_dir is None:
        raise RuntimeError(f"{dist.metadata['Name']}: no .dist-info in its RECORD; reinstall it with pip")
    wheel_meta = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    parts = [sorted({t.split("-")[i] for t in tags or ["py3-none-any"]}) for i in range(3)]
    norm = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = out / f"{norm}-{dist.version}-{'-'.join('.'.join(p) for p in parts)}.whl"
    skip = {f"{info_dir}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for f in files:
            arcname = f.as_posix()
            if arcname in skip:
                continue
            data = Path(dist.locate_file(f)).read_bytes()
            whl.writestr(arcname, data)
            writer.writerow([arcname, _record_hash(data), len(data)])
        writer.writerow([f"{info_dir}/RECORD", "", ""])
        whl.writestr(f"{info_dir}/RECORD", record.getvalue())
    return path
