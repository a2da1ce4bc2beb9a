"""Plugin names and parameters in ``params.yaml``, checked before any stage runs.

``params.yaml`` keys of mmops itself are checked by pydantic when the file is read; a plugin's own
parameters are free-form there, so a typo (``rnak`` for ``rank``) used to surface only as a
``TypeError`` inside a training task, minutes later, or never (a parameter with a default silently
ignored by a ``**kwargs``). A plugin declares its parameters by its constructor's signature; this
reads them with :mod:`inspect` and names the offending key, the way the config's own keys are named.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from mmops.config import ConfigError, Params
from mmops.core.plugin_registry import GROUPS, PluginError, _load, discover

# Constructor arguments mmops supplies itself, never the user: a fusion's input sizes and class count,
# a task's labels.
SUPPLIED = {"encoder": set(), "fusion": {"dims", "num_classes"}, "task": {"labels"}}


def declared_parameters(cls: type, kind: str) -> tuple[list[str], list[str], bool]:
    """``(parameters, required ones, accepts any other keyword)`` from ``cls.__init__``'s signature."""
    names, required, open_ended = [], [], False
    for i, p in enumerate(inspect.signature(cls.__init__).parameters.values()):
        if i == 0 or p.name in SUPPLIED[kind] or p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            open_ended = True
            continue
        names.append(p.name)
        if p.default is p.empty:
            required.append(p.name)
    return names, required, open_ended


def check_plugin(
    kind: str, name: str, given: Iterable[str], name_key: str, params_key: str, provided: Iterable[str] = ()
) -> list[str]:
    """Problems with plugin ``name`` of ``kind`` used with parameter names ``given``, each prefixed by
    the key it is about (``name_key`` for the name, ``params_key.<param>`` for a parameter).
    ``provided``: parameters set elsewhere (a task's ``target.threshold``), which count as given."""
    known = discover(kind)
    if name not in known:
        listed = ", ".join(sorted(known)) or "none installed"
        return [f"{name_key}: unknown {kind} '{name}'; known {kind}s: {listed} (see `mmops plugins list`)"]
    try:
        cls = _load(kind, name)
    except PluginError as exc:
        return [f"{name_key}: {exc}"]
    names, required, open_ended = declared_parameters(cls, kind)
    given = list(given)
    problems = []
    if not open_ended:
        listed = ", ".join(names) or "none"
        problems += [
            f"{params_key}.{key}: unknown parameter of {kind} '{name}'; known: {listed}"
            for key in given
            if key not in names
        ]
    if missing := [key for key in required if key not in given and key not in provided]:
        problems.append(f"{params_key}: {kind} '{name}' needs parameter(s) {', '.join(missing)}")
    return problems


def plugin_problems(params: Params) -> list[str]:
    """Every unknown plugin name and unknown or missing plugin parameter in ``params``, by key."""
    problems = []
    for name, spec in params.inputs.items():
        problems += check_plugin(
            "encoder", spec.encoder, spec.params, f"inputs.{name}.encoder", f"inputs.{name}.params"
        )
    for i, candidate in enumerate(params.candidates):
        if candidate.fusion is None:  # a one-input candidate (a unimodal baseline) has no fusion
            continue
        problems += check_plugin(
            "fusion", candidate.fusion, candidate.params, f"candidates[{i}].fusion", f"candidates[{i}].params"
        )
    if params.sweep:
        # Every grid point hands every swept parameter to its fusion: each must be known to each fusion.
        for i, fusion in enumerate(params.sweep.fusion):
            problems += check_plugin("fusion", fusion, params.sweep.params, f"sweep.fusion[{i}]", "sweep.params")
    if "task" in GROUPS:
        target: Mapping[str, Any] = getattr(params.target, "params", None) or {}
        problems += check_plugin(
            "task", params.target.type, target, "target.type", "target.params", provided=("threshold", "separator")
        )
    return list(dict.fromkeys(problems))


def check_plugin_params(params: Params, source: str = "params.yaml") -> None:
    """Raise :class:`ConfigError` listing every plugin problem in ``params`` (see :func:`plugin_problems`)."""
    if problems := plugin_problems(params):
        raise ConfigError(f"{source}: invalid plugin configuration\n" + "\n".join(f"  {p}" for p in problems))
