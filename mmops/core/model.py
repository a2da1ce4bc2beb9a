"""The model: one encoder per input, a fusion, the task's head; and its on-disk artifact.

Only model code lives here (the loop, devices and checkpoints policy are in :mod:`mmops.training.loop`).
The artifact is a folder: ``spec.json`` (everything needed to rebuild the modules), ``model.safetensors``
(trainable weights) and ``assets/<input>/`` for what encoders export (e.g. a frozen transformers
checkpoint). Training, evaluation, ``mmops predict`` and the service all load it through
:func:`load_model`: a plain artifact is a :class:`MultimodalModel`; one that also holds
``ensemble.json`` and ``members/<seed>/`` (``train.ensemble``) is an :class:`Ensemble` of them.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmops.core.interfaces import Encoder, Fusion, Tokens, as_tokens
from mmops.core.plugin_registry import PluginError, discover, get_encoder, get_fusion
from mmops.core.provenance import check_provenance, record_provenance
from mmops.core.tasks import Task, task_from_spec

SPEC_FILE, WEIGHTS_FILE = "spec.json", "model.safetensors"
# A deep ensemble's record, beside the first member's own files, and the folder of its other members.
ENSEMBLE_FILE, MEMBERS_DIR = "ensemble.json", "members"
# What `mmops adapt` did to an artifact (source, data, rows, layers), beside its files.
ADAPTATION_FILE = "adaptation.json"


def build_encoder(name: str, params: Mapping[str, Any]) -> Encoder:
    cls = get_encoder(name)
    try:
        return cls(**params)
    except Exception as exc:  # third-party constructor code: name the plugin and its package, whatever it raised
        info = discover("encoder").get(name)
        origin = f" from {info.origin}" if info else ""
        raise ValueError(
            f"encoder '{name}'{origin} could not be built with parameters {dict(params)}: {type(exc).__name__}: {exc}"
        ) from exc


ArtifactResolver = Callable[[str], Path]


def artifact_folder(ref: str) -> Path:
    """The default ``init_from`` resolver: an artifact folder on disk.

    A registered version ``NAME:VERSION`` needs the registry and the model store, which sit above the
    model: :func:`mmops.pipeline.resolve_artifact` resolves those and is handed in by the callers.
    """
    if Path(ref).is_dir():
        return Path(ref)
    raise ValueError(
        f"init_from '{ref}': no such artifact folder (a registered model version NAME:VERSION "
        "is resolved by `mmops run` and `mmops data featurize`)"
    )


# Frozen encoders built in this process, by spec: a sweep's candidates share one MiniLM instead of
# loading it once each. Safe because a frozen encoder never changes; bounded for long-lived workers.
_FROZEN: OrderedDict[str, Encoder] = OrderedDict()
_FROZEN_LOCK = threading.Lock()
_FROZEN_MAX = 4


def build_input_encoder(item: Mapping[str, Any], resolve: ArtifactResolver = artifact_folder) -> Encoder:
    """The encoder of one input spec, with reused weights (``init_from``) and ``freeze`` applied.

    Reuse lets a team train an image encoder once and share it, frozen and cached, across sweeps.
    """
    key = json.dumps([item["encoder"], item["params"]], sort_keys=True, default=str)
    shareable = not item.get("init_from") and not item.get("freeze")
    if shareable:
        with _FROZEN_LOCK:
            if key in _FROZEN:
                _FROZEN.move_to_end(key)
                return _FROZEN[key]
    encoder = build_encoder(item["encoder"], item["params"])
    if shareable and encoder.frozen:
        with _FROZEN_LOCK:
            _FROZEN[key] = encoder
            while len(_FROZEN) > _FROZEN_MAX:
                _FROZEN.popitem(last=False)
    if item.get("init_from"):
        source = resolve(item["init_from"])
        source_spec = json.loads((source / SPEC_FILE).read_text())
        names = [n for n, i in source_spec["inputs"].items() if i["encoder"] == item["encoder"]]
        if len(names) != 1:
            raise ValueError(f"init_from '{item['init_from']}': it has {len(names)} '{item['encoder']}' encoders")
        prefix = f"encoders.{names[0]}."
        state = {
            k.removeprefix(prefix): v for k, v in load_file(str(source / WEIGHTS_FILE)).items() if k.startswith(prefix)
        }
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"init_from '{item['init_from']}': weights do not fit this encoder: {exc}") from exc
    if item.get("freeze"):
        encoder.frozen = True
        encoder.requires_grad_(False)
        encoder.eval()
    return encoder


class SingleInput(nn.Module):
    """What stands in for the fusion of a one-input model: the input's vector, unchanged.

    Not a plugin and not a :class:`Fusion` (which fuses two or more inputs by contract): a unimodal
    baseline is the reference every fusion is measured against, so it must add nothing of its own.
    """

    needs_sequences = False
    produces_logits = False

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__()
        ((self.name, self.output_dim),) = dims.items()

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return features[self.name]

    def config(self) -> dict[str, Any]:
        return {}


class TaskInputs(nn.Module):
    """What stands in for the fusion when the task combines the inputs itself: every input's features,
    by name, as the task asked for them (vectors, or token sequences)."""

    produces_logits = False

    def __init__(self, dims: Mapping[str, int], needs_sequences: bool) -> None:
        super().__init__()
        self.dims, self.needs_sequences = dict(dims), needs_sequences

    def forward(self, features: Mapping[str, Any]) -> dict[str, Any]:
        return dict(features)

    def config(self) -> dict[str, Any]:
        return {}


class MultimodalModel(nn.Module):
    def __init__(self, spec: dict[str, Any], encoders: Mapping[str, Encoder] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.encoders = nn.ModuleDict(encoders or {n: build_input_encoder(i) for n, i in spec["inputs"].items()})
        dims = {n: e.output_dim for n, e in self.encoders.items()}
        # An input that may be absent (``missing: learn``) gets a learned vector standing in for it.
        self.missing = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(dims[n])) for n, i in spec["inputs"].items() if i.get("missing") == "learn"}
        )
        self.task: Task = task_from_spec(spec)
        self.fusion: Fusion | SingleInput | TaskInputs
        if self.task.combines_inputs:  # contrastive towers, a caption decoder: the task's network fuses
            self.fusion = TaskInputs(dims, self.task.needs_sequences)
            self.head = self.task.network(dims, spec["head"]["hidden"], spec["head"]["dropout"])
            return
        if len(dims) == 1:  # a unimodal baseline: nothing to fuse, the head sits on the encoder
            fusion_cls: type = SingleInput
            self.fusion = SingleInput(dims)
        else:
            fusion_cls = get_fusion(spec["fusion"]["name"])
            extra = {"num_classes": self.task.output_dim} if fusion_cls.produces_logits else {}
            try:
                self.fusion = fusion_cls(dims, **spec["fusion"]["params"], **extra)
            except Exception as exc:  # third-party constructor code: name the plugin and its package
                raise ValueError(
                    f"fusion {self._plugin('fusion')} could not be built with parameters "
                    f"{spec['fusion']['params']}: {type(exc).__name__}: {exc}"
                ) from exc
        # A late fusion already ends in per-modality classifiers: its output is the task's output.
        self.head = (
            nn.Identity()
            if fusion_cls.produces_logits
            else self.task.head(self.fusion.output_dim, spec["head"]["hidden"], spec["head"]["dropout"])
        )

    @property
    def labels(self) -> list[str]:
        return self.spec["labels"]

    @property
    def needs_sequences(self) -> bool:
        """Whether cached inputs reach the model as token sequences (its fusion, or its task, attends)."""
        return self.fusion.needs_sequences

    @property
    def task_name(self) -> str:
        entry = self.spec.get("task") or {}
        return entry.get("name") or entry.get("type") or "classification"

    def forward(
        self,
        inputs: Mapping[str, Any],
        index: Mapping[str, torch.Tensor] | None = None,
        precomputed: frozenset[str] = frozenset(),
    ) -> torch.Tensor:
        """Logits for a batch of rows.

        ``inputs[name]`` holds preprocessed distinct values, or their features when ``name`` is in
        ``precomputed`` (a frozen encoder's cached output: a ``(n, dim)`` vector per value, or
        :class:`Tokens` when the fusion ``needs_sequences``). ``index[name]`` maps each row to its
        distinct value, -1 where the row lacks the input (``inputs[name]`` is None when every row
        does); without it, inputs are already one per row.

        For a fusion that ``needs_sequences`` every encoder, frozen or not, gives
        ``forward_sequence`` (the feature cache keeps frozen encoders' token sequences too, so a
        model computes the same thing whether or not its features were cached); a missing input is
        its learned embedding as one token.
        """
        sequences = self.fusion.needs_sequences
        features: dict[str, Any] = {}
        for name, encoder in self.encoders.items():
            if inputs[name] is None:
                vector = self.missing[name].expand(len(index[name]), -1)
                features[name] = Tokens.from_vector(vector) if sequences else vector
                continue
            if name in precomputed:
                feats = inputs[name]
                if hasattr(feats, "features_for"):  # a lazy view of the feature cache (mmops.data.cache.CachedRows)
                    feats = feats.features_for(sequences)
                if sequences:
                    if isinstance(feats, torch.Tensor) and feats.dim() == 2:  # one token would silently mislead
                        raise ValueError(
                            f"cached features of '{name}' are pooled vectors, but fusion "
                            f"{self._plugin('fusion')} attends over token sequences"
                        )
                    feats = as_tokens(feats, f"cached features of '{name}'")
            elif sequences:
                feats = as_tokens(encoder.forward_sequence(inputs[name]), f"encoder {self._plugin('encoder', name)}")
            else:
                feats = encoder(inputs[name])
            if index is None:
                features[name] = feats
                continue
            idx = index[name]
            if sequences:
                features[name] = feats.select(idx.clamp(min=0))
                if name in self.missing:
                    features[name] = _absent_as_one_token(features[name], idx < 0, self.missing[name])
                continue
            features[name] = feats[idx.clamp(min=0)]
            if name in self.missing:
                absent = (idx < 0).view(-1, 1)
                features[name] = torch.where(absent, self.missing[name].to(feats.dtype), features[name])
        if isinstance(self.fusion, TaskInputs):  # the task's network takes the inputs apart
            return self.head(features)
        fused = self.fusion(features)
        rows = len(next(iter(index.values()))) if index else _rows(next(iter(features.values())))
        if not isinstance(fused, torch.Tensor) or tuple(fused.shape) != (rows, self.fusion.output_dim):
            got = tuple(fused.shape) if isinstance(fused, torch.Tensor) else type(fused).__name__
            raise ValueError(
                f"fusion {self._plugin('fusion')} returned {got}; the contract is (batch, output_dim) "
                f"= ({rows}, {self.fusion.output_dim})"
            )
        return self.head(fused)

    def _plugin(self, kind: str, name: str | None = None) -> str:
        """A plugin's name and the package it comes from, for error messages."""
        plugin = self.spec["inputs"][name]["encoder"] if kind == "encoder" else self.spec["fusion"]["name"]
        info = discover(kind).get(plugin)
        return f"'{plugin}' (package {info.origin})" if info else f"'{plugin}'"

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Weights that travel in safetensors: all but those of encoders frozen by their own config,
        which export their checkpoint as assets. Encoders frozen by mmops (``freeze``) travel inline."""
        frozen = tuple(
            f"encoders.{n}." for n, e in self.encoders.items() if e.frozen and not self.spec["inputs"][n].get("freeze")
        )
        return {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        spec = json.loads(json.dumps(self.spec))
        for name, encoder in self.encoders.items():
            # Every parameter, the plugin's defaults included: a plugin release that changes a default
            # must not change a model already saved (and registered).
            spec["inputs"][name]["params"] = {
                **_defaults(type(encoder)),
                **encoder.export_assets(directory / "assets" / name),
            }
            # The reused weights are in this artifact now: keep where they came from as lineage only.
            if source := spec["inputs"][name].pop("init_from", None):
                spec["inputs"][name]["initialized_from"] = source
        # Exported configs may point into the artifact: store them relative to it.
        for name in spec["inputs"]:
            params = spec["inputs"][name]["params"]
            for key, value in params.items():
                if isinstance(value, str) and value.startswith(str(directory)):
                    params[key] = "@artifact/" + Path(value).relative_to(directory).as_posix()
        spec["fusion"]["params"] = _jsonable(self.fusion.config())
        record_provenance(spec)  # the package and version behind every encoder, the fusion, the task
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        save_file(self.trainable_state(), str(directory / WEIGHTS_FILE))
        return directory

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu", plugin_mismatch: str | None = None) -> MultimodalModel:
        """``plugin_mismatch``: what to do when the installed plugin versions differ from those the model
        was saved with: ``warn`` (default), ``error`` or ``ignore``; ``$MMOPS_PLUGIN_VERSION_MISMATCH``
        sets it for a whole process (a service, a worker)."""
        spec_path = directory / SPEC_FILE
        if not spec_path.is_file():
            raise FileNotFoundError(f"{directory}: not a model artifact (no {SPEC_FILE})")
        spec = json.loads(spec_path.read_text())
        check_provenance(spec, str(directory), plugin_mismatch)
        for item in spec["inputs"].values():
            for key, value in item["params"].items():
                if isinstance(value, str) and value.startswith("@artifact/"):
                    item["params"][key] = str(directory / value.removeprefix("@artifact/"))
        _fill_saved_before(spec)
        model = cls(spec)
        state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        expected_missing = set(model.state_dict()) - set(model.trainable_state())
        if unexpected or set(missing) - expected_missing:
            raise ValueError(f"{directory}: weights do not match spec (missing {missing}, unexpected {unexpected})")
        return model.eval()


class Ensemble(nn.Module):
    """Models of one candidate trained with different seeds, answering as one (``train.ensemble``).

    It presents what callers of a :class:`MultimodalModel` use: the first member's ``spec``, ``task``,
    ``labels`` and ``encoders`` (whose ``preprocess`` every member shares: encoders are fitted on the
    train split alone, whatever the seed, so the same code still trains and serves), ``needs_sequences``
    and ``forward``, whose output is the task's :meth:`~mmops.core.tasks.Task.combine` of the members'
    outputs. Frozen features a caller precomputes (the feature cache, the service's memo) serve every
    member; the rest of the work is done once per member.
    """

    def __init__(self, members: Sequence[MultimodalModel], seeds: Sequence[int] = ()) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        first = members[0]
        for other in members[1:]:
            if (other.spec["labels"], other.spec.get("task"), list(other.spec["inputs"])) != (
                first.spec["labels"],
                first.spec.get("task"),
                list(first.spec["inputs"]),
            ):
                raise ValueError("ensemble members differ in their labels, task or inputs: they are not one candidate")
        if not type(first.task).combines_models():
            raise ValueError(f"the {first.task_name} task cannot average several models' outputs (no combine())")
        self.members = nn.ModuleList(members)
        self.seeds = list(seeds)
        self.spec, self.task = first.spec, first.task

    @property
    def encoders(self) -> nn.ModuleDict:
        return self.members[0].encoders

    @property
    def labels(self) -> list[str]:
        return self.members[0].labels

    @property
    def needs_sequences(self) -> bool:
        return self.members[0].needs_sequences

    @property
    def task_name(self) -> str:
        return self.members[0].task_name

    def forward(
        self,
        inputs: Mapping[str, Any],
        index: Mapping[str, torch.Tensor] | None = None,
        precomputed: frozenset[str] = frozenset(),
    ) -> torch.Tensor:
        """The task's combination of every member's output for these rows (N forward passes)."""
        return self.task.combine([member(inputs, index, precomputed) for member in self.members])

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu", plugin_mismatch: str | None = None) -> Ensemble:
        record = json.loads((directory / ENSEMBLE_FILE).read_text())
        members = [
            MultimodalModel.load(directory / m["path"], map_location, plugin_mismatch) for m in record["members"]
        ]
        # Encoders frozen by their own config are the same pretrained checkpoint in every member, and
        # their weights are not trained: one copy in memory, not one per member.
        for member in members[1:]:
            for name, encoder in members[0].encoders.items():
                if encoder.frozen and not members[0].spec["inputs"][name].get("freeze"):
                    member.encoders[name] = encoder
        return cls(members, [m["seed"] for m in record["members"]]).eval()


def write_ensemble(directory: Path, members: Sequence[tuple[int, Path]]) -> Path:
    """Record that ``directory`` (the first member's artifact) is an ensemble of ``members`` (seed, the
    member's artifact folder inside ``directory``; the first is ``directory`` itself). Written last, once
    every member is saved: a folder without it loads as the first member alone."""
    from mmops.project import atomic_write

    entries = [{"seed": int(seed), "path": Path(path).relative_to(directory).as_posix()} for seed, path in members]
    return atomic_write(directory / ENSEMBLE_FILE, json.dumps({"members": entries}, indent=2))


def ensemble_record(directory: Path) -> dict[str, Any] | None:
    """The ensemble an artifact folder holds (``{"members": [{"seed", "path"}, ...]}``), or None."""
    path = Path(directory) / ENSEMBLE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_model(
    directory: Path, map_location: str = "cpu", plugin_mismatch: str | None = None
) -> MultimodalModel | Ensemble:
    """The model an artifact folder holds: an :class:`Ensemble` when it records one, else the
    :class:`MultimodalModel` it always was. Every caller that loads an artifact goes through here."""
    directory = Path(directory)
    if (directory / ENSEMBLE_FILE).is_file():
        return Ensemble.load(directory, map_location, plugin_mismatch)
    return MultimodalModel.load(directory, map_location, plugin_mismatch)


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    """The entries a spec can hold (a default that is an object, not a value, is left out)."""
    out = {}
    for key, value in params.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def _fill_saved_before(spec: dict[str, Any]) -> None:
    """Give a saved spec the values of parameters its plugins gained after it was saved.

    ``save`` writes every parameter, so a key a saved spec lacks predates that parameter: it takes the
    value the plugin declares in ``saved_before`` (the one that reproduces the old behaviour), never the
    new default. A saved value always wins; an unknown plugin is left to the build to report.
    """

    def legacy(get: Callable[[str], type], name: str) -> dict[str, Any]:
        try:
            return dict(get(name).saved_before)
        except PluginError:
            return {}

    for item in spec["inputs"].values():
        item["params"] = {**legacy(get_encoder, item["encoder"]), **item["params"]}
    fusion = spec.get("fusion") or {}
    if fusion.get("name"):
        fusion["params"] = {**legacy(get_fusion, fusion["name"]), **(fusion.get("params") or {})}


def _defaults(cls: type) -> dict[str, Any]:
    """A plugin constructor's keyword defaults, as a spec can hold them."""
    return _jsonable(
        {
            p.name: p.default
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.default is not p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
    )


def _rows(features: Any) -> int:
    return features.batch if isinstance(features, Tokens) else len(features)


def _absent_as_one_token(tokens: Tokens, absent: torch.Tensor, vector: torch.Tensor) -> Tokens:
    """Rows lacking the input become one real token, the learned "missing" embedding, then padding."""
    first = torch.zeros_like(tokens.mask)
    first[:, 0] = True
    values = torch.where(
        absent.view(-1, 1, 1), torch.where(first.unsqueeze(-1), vector.to(tokens.values.dtype), 0.0), tokens.values
    )
    return Tokens(values, torch.where(absent.view(-1, 1), first, tokens.mask))
