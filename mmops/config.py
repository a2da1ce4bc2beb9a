"""``params.yaml``: the one typed configuration of a project, shared by DVC, the flow, the CLI.

Validation happens here, once, with messages that name the offending key and how to fix it, so a
typo fails before any data is touched rather than halfway through a training run.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmops.interfaces import MODALITIES


class ConfigError(ValueError):
    """A malformed params file; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    source: str = "easy-vqa"
    limit: int = Field(0, ge=0, description="keep this many questions per source split; 0 keeps all")
    image_size: int = Field(64, ge=8, le=1024)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)


class InputConfig(_Strict):
    modality: str
    encoder: str
    params: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = Field(
        None, description="reuse this input's encoder weights from a model version NAME:VERSION or an artifact folder"
    )
    freeze: bool = Field(False, description="freeze the encoder: no training, features cached by featurize")

    @field_validator("modality")
    @classmethod
    def _known_modality(cls, v: str) -> str:
        if v not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got '{v}'")
        return v


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1, description="rows per batch (approximate when grouped by image)")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(3, ge=1)
    head_hidden: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    threads: int = Field(0, ge=0, description="torch threads per candidate; 0 = cores / parallel candidates")
    feature_cache: bool = Field(
        True, description="use cached frozen features and encode each distinct value once per batch; "
        "false recomputes every encoder for every row (the naive baseline the benchmarks compare with)"
    )


class CandidateConfig(_Strict):
    name: str
    fusion: str
    params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the train section")


class SweepConfig(_Strict):
    """Candidates generated from a grid (or a random sample of it), added to the listed ones."""

    method: Literal["grid", "random"] = "grid"
    samples: int = Field(0, ge=0, description="random: how many grid points to draw")
    seed: int = 0
    fusion: list[str] = Field(min_length=1)
    params: dict[str, list[Any]] = Field(default_factory=dict, description="fusion parameters to vary")
    train: dict[str, list[Any]] = Field(default_factory=dict, description="train settings to vary")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        unknown = set(self.train) - set(TrainConfig.model_fields)
        if unknown:
            raise ValueError(f"train: unknown keys {sorted(unknown)}")
        if self.method == "random" and not self.samples:
            raise ValueError("samples: a random sweep needs samples > 0")
        return self

    def expand(self) -> list[CandidateConfig]:
        axes = [("fusion", "", self.fusion)]
        axes += [("params", k, v) for k, v in sorted(self.params.items())]
        axes += [("train", k, v) for k, v in sorted(self.train.items())]
        points = list(itertools.product(*(values for _, _, values in axes)))
        if self.method == "random":
            points = random.Random(self.seed).sample(points, min(self.samples, len(points)))
        candidates = []
        for point in points:
            fields: dict[str, dict[str, Any]] = {"params": {}, "train": {}}
            for (section, key, _), value in zip(axes[1:], point[1:], strict=True):
                fields[section][key] = value
            name = "-".join([str(point[0]), *(f"{k}{v}" for (_, k, _), v in zip(axes[1:], point[1:], strict=True))])
            candidates.append(CandidateConfig(name=name, fusion=str(point[0]), **fields))
        return candidates


class RunnerConfig(_Strict):
    """Where candidates train: threads here, or a Dask / Ray cluster (features travel by path)."""

    kind: Literal["threads", "dask", "ray"] = "threads"
    max_workers: int = Field(1, ge=1, description="candidates trained at once (threads, or local cluster workers)")
    address: str | None = Field(None, description="an existing cluster, e.g. tcp://host:8786; none starts a local one")


class RegistryConfig(_Strict):
    model_name: str = "easy-vqa"


class PromotionConfig(_Strict):
    """Champion/challenger: measured on the test split, where both models are evaluated alike."""

    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    margin: float = Field(0.002, ge=0, description="the challenger must beat the champion by more than this")
    min_accuracy: float = Field(0.5, ge=0, le=1, description="below this a model never reaches production")
    min_macro_f1: float = Field(0.0, ge=0, le=1)


class Params(_Strict):
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    inputs: dict[str, InputConfig]
    target: str = "answer"
    train: TrainConfig = Field(default_factory=TrainConfig)
    candidates: list[CandidateConfig] = Field(default_factory=list)
    sweep: SweepConfig | None = None
    select_metric: Literal["val_accuracy", "val_macro_f1"] = "val_accuracy"
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)

    @model_validator(mode="after")
    def _check(self) -> Params:
        if len(self.inputs) < 2:
            raise ValueError("inputs: a multimodal model needs two or more inputs")
        if not self.candidates and not self.sweep:
            raise ValueError("candidates: list at least one candidate (name + fusion), or declare a sweep")
        names = [c.name for c in self.all_candidates()]
        if len(set(names)) != len(names):
            raise ValueError(f"candidates: names must be unique, got {names}")
        for c in self.candidates:
            unknown = set(c.train) - set(TrainConfig.model_fields)
            if unknown:
                raise ValueError(f"candidates[{c.name}].train: unknown keys {sorted(unknown)}")
        return self

    def all_candidates(self) -> list[CandidateConfig]:
        return [*self.candidates, *(self.sweep.expand() if self.sweep else [])]

    def candidate(self, name: str) -> CandidateConfig:
        for c in self.all_candidates():
            if c.name == name:
                return c
        raise KeyError(f"no candidate '{name}'; params.yaml has {[c.name for c in self.all_candidates()]}")

    def train_for(self, candidate: CandidateConfig) -> TrainConfig:
        return self.train.model_copy(update=candidate.train)


def load_params(path: Path) -> Params:
    if not path.is_file():
        raise ConfigError(f"{path}: no params file. Run from a project directory or pass --project.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(lines)) from None
