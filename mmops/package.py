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

    The build context is the mmops source tree, so the bento carries the exact code that trained the
    model (``mmops/`` and ``plugins/``).
    """
    import bentoml

    bentofile = (bentofile or SOURCE_ROOT / "bentofile.yaml").resolve()
    if not bentofile.is_file():
        raise FileNotFoundError(f"{bentofile}: no bentofile; mmops package needs the mmops source tree")
    build_wheel(bentofile.parent)
    # BentoML resolves the bentofile's wheel paths against the working directory, not build_ctx.
    with contextlib.chdir(bentofile.parent):
        bento = bentoml.bentos.build_bentofile(
            str(bentofile), build_ctx=str(bentofile.parent), args={"model_tag": model_tag},
            labels={"model": model_tag},
        )
    return str(bento.tag)


def build_wheel(source: Path) -> Path:
    """The mmops wheel the bento installs, so a container gets the plugins' entry points too.

    Built offline from the source tree (no build isolation: setuptools is already here).
    """
    out = source / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )
    return out / f"mmops-{mmops.__version__}-py3-none-any.whl"
