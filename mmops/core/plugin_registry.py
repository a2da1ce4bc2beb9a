"""Find encoders, fusions and tasks through entry points, exactly as third-party packages provide them.

Discovery lists names without importing anything; a plugin is imported on first use. A plugin that
fails to import, is not a subclass of the right base class, or clashes with another package's name
is reported with its package and version and never takes the other plugins down.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmops.core.interfaces import Encoder, Fusion
    from mmops.core.tasks import Task

# Base classes by import path: reading a config checks task names without importing torch.
GROUPS = {
    "encoder": ("mmops.encoders", "mmops.core.interfaces:Encoder"),
    "fusion": ("mmops.fusions", "mmops.core.interfaces:Fusion"),
    "task": ("mmops.tasks", "mmops.core.tasks:Task"),
}


def _base(kind: str) -> type:
    module, _, name = GROUPS[kind][1].partition(":")
    return getattr(importlib.import_module(module), name)


class PluginError(LookupError):
    """A plugin could not be found or loaded; the message says which package and how to fix it."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str
    target: str
    package: str
    version: str
    clashes: tuple[str, ...] = field(default=())
    # Kept so loading does not scan every installed distribution's metadata again (25 ms a plugin).
    entry: EntryPoint | None = field(default=None, compare=False, repr=False)

    @property
    def origin(self) -> str:
        return f"{self.package} {self.version}"


def _dist(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    return (dist.name, dist.version) if dist is not None else ("<unknown>", "?")


@cache
def discover(kind: str) -> dict[str, PluginInfo]:
    """All plugins of ``kind`` by name, without importing them."""
    group = GROUPS[kind][0]
    found: dict[str, list[tuple[EntryPoint, str, str]]] = {}
    for ep in entry_points(group=group):
        package, version = _dist(ep)
        # The same distribution can be visible twice (editable install + build dir): keep one.
        if any(p == package and e.value == ep.value for e, p, _ in found.get(ep.name, [])):
            continue
        found.setdefault(ep.name, []).append((ep, package, version))
    infos = {}
    for name, providers in found.items():
        ep, package, version = providers[0]
        others = tuple(f"{p} {v} ({e.value})" for e, p, v in providers[1:])
        infos[name] = PluginInfo(name, kind, ep.value, package, version, others, ep)
    return infos


@cache
def _load(kind: str, name: str) -> type:
    group, base = GROUPS[kind][0], _base(kind)
    infos = discover(kind)
    if name not in infos:
        known = ", ".join(sorted(infos)) or "none installed"
        raise PluginError(f"unknown {kind} '{name}'. Known {kind}s: {known}. See `mmops plugins list`.")
    info = infos[name]
    if info.clashes:
        raise PluginError(
            f"{kind} '{name}' is provided by more than one package: {info.origin} ({info.target}) and "
            f"{', '.join(info.clashes)}. Uninstall one of them or rename its entry point in group '{group}'."
        )
    ep = info.entry or next(e for e in entry_points(group=group, name=name) if e.value == info.target)
    try:
        obj = ep.load()
    except KeyboardInterrupt:  # a real Ctrl-C stops mmops; anything else a plugin raises is its failure
        raise
    except BaseException as exc:  # SystemExit at import too: third-party code must never end mmops
        raise PluginError(
            f"{kind} '{name}' from {info.origin} failed to import ({info.target}): {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise PluginError(
            f"{kind} '{name}' from {info.origin} ({info.target}) is not a subclass of {base.__module__}.{base.__name__}"
        )
    return obj


def get_encoder(name: str) -> type[Encoder]:
    return _load("encoder", name)


def get_fusion(name: str) -> type[Fusion]:
    return _load("fusion", name)


def get_task(name: str) -> type[Task]:
    return _load("task", name)


def check_all(kind: str) -> dict[str, str | None]:
    """Load every plugin of ``kind``; map name to its error message, or None when it loads."""
    status: dict[str, str | None] = {}
    for name in discover(kind):
        try:
            _load(kind, name)
            status[name] = None
        except PluginError as exc:
            status[name] = str(exc)
    return status
