"""What a model was built with: the package and version behind each plugin, and a hash of installed code.

A version number alone does not tell two builds apart (an editable install, a plugin edited in place
keeps its version), so reuse decisions use a hash of the files of every distribution involved: the
candidate's fingerprint changes when the fusion, an encoder, the task or mmops itself changes, and only
then. Files are hashed once per process and re-read only when their size or modification time moves,
so a fingerprint costs a directory walk (about a millisecond for mmops), not a read of every file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Iterable
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from mmops.core.plugin_registry import GROUPS, discover

OWN_DISTRIBUTION = "mmops"

_FILES: dict[str, tuple[int, int, str]] = {}  # path -> (mtime_ns, size, sha256 of the content)
_FILES_LOCK = threading.Lock()


def _file_digest(path: str, stat: os.stat_result) -> str:
    with _FILES_LOCK:
        cached = _FILES.get(path)
    if cached and cached[:2] == (stat.st_mtime_ns, stat.st_size):
        return cached[2]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _FILES_LOCK:
        _FILES[path] = (stat.st_mtime_ns, stat.st_size, value)
    return value


def _code_roots(dist: Distribution) -> list[Path]:
    """The folders (or single modules) a distribution's code lives in, wherever it was installed from.

    Found through the import system, so an editable install points at its source tree, not at the
    ``.pth`` file its RECORD lists.
    """
    names = set((dist.read_text("top_level.txt") or "").split())
    names |= {ep.value.split(":")[0].split(".")[0] for ep in dist.entry_points if ep.group.startswith("mmops.")}
    names.add(dist.metadata["Name"].replace("-", "_").lower())
    roots: list[Path] = []
    for name in sorted(n for n in names if n.isidentifier()):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin and Path(spec.origin).is_file():
            roots.append(Path(spec.origin))
    return sorted(set(roots))


def _tree_digest(roots: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for root in roots:
        if root.is_file():
            entries = [(root.name, str(root))]
        else:
            entries = []
            for folder, dirs, files in os.walk(root):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
                entries += [
                    (os.path.relpath(os.path.join(folder, f), root), os.path.join(folder, f))
                    for f in files
                    if not f.endswith((".pyc", ".pyo"))
                ]
        for rel, path in sorted(entries):
            try:
                stat = os.stat(path)
            except OSError:  # vanished while walking
                continue
            digest.update(f"{root.name}/{rel}\0{_file_digest(path, stat)}\n".encode())
    return digest.hexdigest()[:16]


def distribution_code_hash(dist: Distribution) -> str:
    """A hash of the installed code of one distribution (every file of its packages but bytecode)."""
    roots = _code_roots(dist)
    if roots:
        return _tree_digest(roots)
    # No importable package found: fall back to the files its RECORD lists.
    files = [Path(str(dist.locate_file(f))) for f in dist.files or [] if not str(f).endswith((".pyc", ".pyo"))]
    return _tree_digest(f for f in files if f.is_file())


def _distribution_of(kind: str, name: str) -> Distribution | None:
    info = discover(kind).get(name) if kind in GROUPS else None
    dist = getattr(info.entry, "dist", None) if info is not None else None
    return dist if isinstance(dist, Distribution) else None


def plugin_provenance(kind: str, name: str) -> dict[str, str] | None:
    """``{"package", "version"}`` of the distribution that provides plugin ``name`` of ``kind``
    (``encoder``, ``fusion``, ``task``); None when no installed package provides it."""
    info = discover(kind).get(name) if kind in GROUPS else None
    if info is None:
        return None
    return {"package": info.package, "version": info.version}


def code_versions(plugins: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``{"<package> <version>": code hash}`` for mmops and every distribution behind ``plugins``
    (``(kind, name)`` pairs); a plugin no package provides is left out (using it fails elsewhere)."""
    dists: dict[str, Distribution] = {}
    try:
        own = distribution(OWN_DISTRIBUTION)
        dists[f"{own.metadata['Name']} {own.version}"] = own
    except PackageNotFoundError:
        pass
    for kind, name in plugins:
        dist = _distribution_of(kind, name)
        if dist is not None:
            dists.setdefault(f"{dist.metadata['Name']} {dist.version}", dist)
    return {key: distribution_code_hash(dist) for key, dist in sorted(dists.items())}
