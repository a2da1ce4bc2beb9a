"""Ship a trained artifact: save it into the BentoML model store and build a bento around it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

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
    way the bento carries the mmops wheel built from the code that trained the model, so a container
    gets the plugins' entry points too.
    """
    import bentoml

    bentofile = (bentofile or SOURCE_ROOT / "bentofile.yaml").resolve()
    if not bentofile.is_file():
        raise FileNotFoundError(f"{bentofile}: no bentofile; run `mmops init` or add one")
    if not (SOURCE_ROOT / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{SOURCE_ROOT}: mmops is not installed from a source tree (pip install -e), "
                                "so its wheel cannot be built into the bento")
    build_wheel(SOURCE_ROOT, bentofile.parent / "dist")
    # BentoML resolves the bentofile's wheel paths against the working directory, not build_ctx.
    with contextlib.chdir(bentofile.parent):
        bento = bentoml.bentos.build_bentofile(
            str(bentofile), build_ctx=str(bentofile.parent), args={"model_tag": model_tag},
            labels={"model": model_tag},
        )
    return str(bento.tag)


def build_wheel(source: Path, out: Path) -> Path:
    """The mmops wheel the bento installs, so a container gets the plugins' entry points too.

    Built offline from the source tree (no build isolation: setuptools is already here).
    """
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )
    return out / f"mmops-{mmops.__version__}-py3-none-any.whl"
