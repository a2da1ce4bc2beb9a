"""``mmops init``: a new project directory from a template, ready for ``mmops data import``.

Templates are plain data files under ``mmops/templates/<name>/`` (plus ``_common/`` shared by all of
them), copied as they are so that the comments in ``params.yaml`` — the project's documentation —
survive; only ``bentofile.yaml`` gets the installed mmops version, since the bento installs exactly the
wheel ``mmops package`` builds. Dot-files are stored without their dot (``gitignore``) because
setuptools' package-data globs skip hidden files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import mmops

TEMPLATES = ("vqa", "classification", "regression", "retrieval", "captioning", "sentiment")
# Templates whose import stage reads the user's files from incoming/ (a DVC dependency that must exist).
FILE_TEMPLATES = frozenset({"classification", "regression", "retrieval", "sentiment"})
COMMON = "_common"
# Files a project cannot have twice: writing over them would silently replace someone's configuration.
PROJECT_FILES = ("params.yaml", "dvc.yaml", "bentofile.yaml")
# Stored names -> names in the project.
RENAMES = {"gitignore": ".gitignore"}
VERSION_PLACEHOLDER = "__MMOPS_VERSION__"


def template_files(template: str) -> dict[str, Traversable]:
    """The files of ``template`` by their path in the project; the template's own override ``_common``'s."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template '{template}'; available: {', '.join(TEMPLATES)}")
    root = files("mmops") / "templates"
    out: dict[str, Traversable] = {}
    for folder in (COMMON, template):
        out.update(_walk(root / folder, ""))
    return out


def _walk(node: Traversable, prefix: str) -> dict[str, Traversable]:
    found: dict[str, Traversable] = {}
    for child in node.iterdir():
        if child.name.startswith((".", "__pycache__")):
            continue
        name = RENAMES.get(child.name, child.name)
        if child.is_dir():
            found.update(_walk(child, f"{prefix}{name}/"))
        else:
            found[f"{prefix}{name}"] = child
    return found


def init_project(directory: Path, template: str = "classification", git: bool = True) -> Path:
    """Create an mmops project in ``directory`` from ``template`` and return its resolved path.

    The directory may exist and hold other files (e.g. a fresh git clone), but never an mmops or DVC
    project's own files: those are refused rather than overwritten. An existing ``README.md`` is left
    as it is, and an existing ``.gitignore`` only gains the lines it lacks. Then ``git init`` (when
    ``git`` and the directory is not already inside a git work tree) and ``dvc init`` (``--no-scm``
    without git; ``--subdir`` inside a larger git repository; skipped if ``.dvc/`` exists).
    """
    sources = template_files(template)  # validates the name before anything touches the disk
    root = Path(directory).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a directory")
    clashes = [name for name in PROJECT_FILES if (root / name).exists()]
    if clashes:
        raise ValueError(
            f"{root}: already a project ({', '.join(clashes)} exists); "
            "choose a new or empty directory, or edit the existing params.yaml"
        )
    env = _tool_env(root)
    if git and shutil.which("git", path=env["PATH"]) is None:
        raise RuntimeError("git is not installed: install it, or create the project without git (git=False)")

    root.mkdir(parents=True, exist_ok=True)
    for rel, source in sorted(sources.items()):
        _write(root / rel, source, rel)
    if template in FILE_TEMPLATES:
        incoming = root / "incoming"
        incoming.mkdir(exist_ok=True)
        (incoming / ".gitkeep").touch()  # git keeps no empty folders, and DVC refuses a missing dependency

    toplevel = _git_toplevel(root, env)
    if git and toplevel is None:
        _run(["git", "init", "-q"], root, env)
        toplevel = root
    if not (root / ".dvc").exists():
        if not git:
            dvc_args = ["--no-scm"]
        elif toplevel is not None and toplevel != root:
            dvc_args = ["--subdir"]  # DVC's own repository root below the git root
        else:
            dvc_args = []
        _run(["dvc", "init", "-q", *dvc_args], root, env)
    return root


def _write(path: Path, source: Traversable, rel: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if rel == "README.md" and path.exists():
        return  # the user's own README
    if rel == ".gitignore" and path.exists():
        have = set(path.read_text().splitlines())
        extra = [line for line in source.read_text().splitlines() if line and line not in have]
        if extra:
            text = path.read_text()
            path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + "\n".join(extra) + "\n")
        return
    data = source.read_bytes()
    if rel == "bentofile.yaml":
        data = data.replace(VERSION_PLACEHOLDER.encode(), mmops.__version__.encode())
    path.write_bytes(data)


def _tool_env(root: Path) -> dict[str, str]:
    """The environment for git and dvc: this interpreter's scripts first (dvc lives in the same venv), offline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DVC_SITE_CACHE_DIR", str(root / ".mmops" / "dvc-site"))
    return env


def _git_toplevel(root: Path, env: dict[str, str]) -> Path | None:
    """The root of the git work tree holding ``root``, or None (also when git is absent)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=root, env=env, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out.stdout.strip()).resolve() if out.returncode == 0 and out.stdout.strip() else None


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    exe = shutil.which(cmd[0], path=env["PATH"])
    if exe is None:
        raise RuntimeError(f"`{cmd[0]}` not found on PATH (looked in {Path(sys.executable).parent} first)")
    out = subprocess.run([exe, *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed in {cwd} (exit {out.returncode}): {(out.stderr or out.stdout).strip()}"
        )
