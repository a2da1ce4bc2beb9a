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
import warnings
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
    """The distribution behind a plugin's entry point.

    Checked by what it offers, not by class: once a library has put the ``importlib_metadata`` backport's
    finder on ``sys.meta_path`` (one of mmops' dependencies does, on import), entry points come with the
    backport's ``PathDistribution``, which is not a subclass of the standard library's ``Distribution``,
    and an ``isinstance`` test silently dropped the plugin's package from the code fingerprint.
    """
    info = discover(kind).get(name) if kind in GROUPS else None
    dist = getattr(info.entry, "dist", None) if info is not None else None
    if dist is None or not all(hasattr(dist, a) for a in ("metadata", "version", "read_text", "files")):
        return None
    return dist


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


# ---------------------------------------------------------------- what a saved model records

MISMATCH_ENV = "MMOPS_PLUGIN_VERSION_MISMATCH"
MISMATCH_POLICIES = ("warn", "error", "ignore")


class PluginVersionWarning(UserWarning):
    """A model is loaded under other plugin versions than it was saved with."""


class PluginVersionError(RuntimeError):
    """A model is refused because it was saved with other plugin versions (``MMOPS_PLUGIN_VERSION_MISMATCH=error``)."""


def _plugins_of(spec: dict) -> list[tuple[str, str, dict]]:
    """``(kind, name, entry)`` for every plugin a spec names; ``entry`` is the dict its provenance goes in.

    A task is listed only in the plugin form (``{"name": ..., "params": ...}``): the older
    ``{"type": ...}`` form hands its other keys to the task as parameters.
    """
    found = [("encoder", item["encoder"], item) for item in spec.get("inputs", {}).values()]
    if isinstance(spec.get("fusion"), dict) and spec["fusion"].get("name"):
        found.append(("fusion", spec["fusion"]["name"], spec["fusion"]))
    task = spec.get("task")
    if isinstance(task, dict) and task.get("name"):
        found.append(("task", task["name"], task))
    return found


def record_provenance(spec: dict) -> dict:
    """Add ``"plugin": {"package", "version"}`` to every encoder, the fusion and the task of ``spec``."""
    for kind, name, entry in _plugins_of(spec):
        if (found := plugin_provenance(kind, name)) is not None:
            entry["plugin"] = found
    return spec


def check_provenance(spec: dict, where: str, policy: str | None = None) -> list[str]:
    """Compare the plugin versions a spec was saved with to those installed now.

    ``policy`` (default: ``$MMOPS_PLUGIN_VERSION_MISMATCH``, else ``warn``): ``warn`` emits a
    :class:`PluginVersionWarning`, ``error`` raises :class:`PluginVersionError`, ``ignore`` does
    neither. Specs saved before provenance was recorded are not checked. Returns the differences.
    """
    policy = (policy or os.environ.get(MISMATCH_ENV) or "warn").lower()
    if policy not in MISMATCH_POLICIES:
        raise ValueError(f"{MISMATCH_ENV}={policy!r}: use one of {', '.join(MISMATCH_POLICIES)}")
    differences = []
    for kind, name, entry in _plugins_of(spec):
        saved, installed = entry.get("plugin"), plugin_provenance(kind, name)
        if not saved or installed is None:  # an old artifact; an uninstalled plugin fails when built
            continue
        if (saved.get("package"), saved.get("version")) != (installed["package"], installed["version"]):
            differences.append(
                f"{kind} '{name}' was saved with {saved.get('package')} {saved.get('version')}, "
                f"installed is {installed['package']} {installed['version']}"
            )
    if differences and policy != "ignore":
        message = (
            f"{where}: {'; '.join(differences)}. The model is rebuilt from its saved parameters, but the "
            f"plugin code differs and its answers may too. Install the versions it was saved with, or "
            f"retrain; {MISMATCH_ENV}=error refuses such models, =ignore loads them silently."
        )
        if policy == "error":
            raise PluginVersionError(message)
        warnings.warn(message, PluginVersionWarning, stacklevel=3)
    return differences
