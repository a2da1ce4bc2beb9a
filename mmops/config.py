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

# The modalities an encoder plugin may declare. Here, not in mmops.core.interfaces, so that reading a
# config (the prepare stage, the CLI) does not import torch.
MODALITIES = ("text", "image", "audio", "tabular", "vectors")
# Frames a feature sequence (modality vectors) may have unless its input sets params.max_length
# (MOSEI's longest in MMSA's unaligned files: 500): prepare, the encoders and the service apply it.
VECTORS_MAX_LENGTH = 1000


class ConfigError(ValueError):
    """A malformed params file; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


SOURCES = ("easy-vqa", "manifest", "vqa-v2", "coco-captions", "imagefolder", "mmsa", "fashion-mnist")


class DataConfig(_Strict):
    source: str = "easy-vqa"
    path: str | None = Field(
        None,
        description="the source's files (a folder, or a manifest file), relative to "
        "the project root; easy-vqa needs none",
    )
    limit: int = Field(0, ge=0, description="keep this many questions per source split; 0 keeps all")
    image_size: int = Field(64, ge=8, le=1024)
    sample_rate: int = Field(16000, ge=1000, le=192000, description="audio is resampled to this rate")
    audio_seconds: float = Field(1.0, gt=0, le=60, description="audio is padded or cut to this length")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    zero_shot_pairs: Literal["default", "none"] = Field(
        "default",
        description="easy-vqa --as captions: 'default' puts every image of four colour-shape pairs in "
        "test (compositional zero-shot, for CLIP); 'none' holds none out, so every test pair is seen in train",
    )
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="carved when the manifest has no split column")
    chunk_rows: int = Field(50_000, ge=100, description="manifest rows read at a time: bounds prepare's memory")
    group_column: str | None = Field(
        None,
        description="a manifest column (speaker, patient, user, session) whose rows belong together: "
        "val and a carved test split hold groups never seen in train, so validation predicts new users",
    )
    val_groups: list[str] = Field(default_factory=list, description="with group_column: these groups are val")
    test_groups: list[str] = Field(
        default_factory=list,
        description="with group_column: these groups are test (only when the manifest has no split column)",
    )

    @model_validator(mode="after")
    def _groups_need_column(self) -> DataConfig:
        if (self.val_groups or self.test_groups) and not self.group_column:
            raise ValueError("val_groups/test_groups name groups of data.group_column: set group_column too")
        both = sorted(set(self.val_groups) & set(self.test_groups))
        if both:
            raise ValueError(f"val_groups and test_groups share {both}: a group belongs to one split")
        return self

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got '{v}'")
        return v


# Manifest column types that map onto the tabular modality, with the encoder each defaults to.
COLUMN_KINDS = {"number": "numeric", "category": "categorical"}
DEFAULT_ENCODERS = {
    "text": "bow_text",
    "image": "cnn_image",
    "audio": "mel_audio",
    "vectors": "seq_features",
    **COLUMN_KINDS,
}


class InputConfig(_Strict):
    """One model input. ``modality: number`` / ``category`` are tabular inputs over one or more
    manifest ``columns`` (default: the input's own name); ``kind`` keeps which, since prepare parses
    numbers and categories differently."""

    modality: str
    encoder: str = ""
    columns: list[str] | None = Field(None, min_length=1, description="tabular: the manifest columns it reads")
    missing: Literal["drop", "learn"] = Field(
        "drop", description="a row without this input: drop it, or learn a 'missing' embedding for it"
    )
    kind: Literal["text", "image", "audio", "vectors", "number", "category"] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = Field(
        None, description="reuse this input's encoder weights from a model version NAME:VERSION or an artifact folder"
    )
    freeze: bool = Field(False, description="freeze the encoder: no training, features cached by featurize")

    @model_validator(mode="before")
    @classmethod
    def _column_kinds(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        modality = data.get("modality")
        if modality in COLUMN_KINDS:
            data["kind"], data["modality"] = modality, "tabular"
        elif modality == "tabular" and not data.get("kind"):
            data["kind"] = "category" if data.get("encoder") == "categorical" else "number"
        elif modality in MODALITIES:
            data.setdefault("kind", modality)
        if not data.get("encoder") and data.get("kind") in DEFAULT_ENCODERS:
            data["encoder"] = DEFAULT_ENCODERS[data["kind"]]
        return data

    @field_validator("modality")
    @classmethod
    def _known_modality(cls, v: str) -> str:
        if v not in MODALITIES:
            known = [*(m for m in MODALITIES if m != "tabular"), *COLUMN_KINDS]
            raise ValueError(f"modality must be one of {', '.join(known)}, got '{v}'")
        return v


class TargetConfig(_Strict):
    column: str = "answer"
    type: str = Field(
        "classification",
        description="a task plugin (`mmops plugins list`): classification, "
        "multilabel, regression, or one a package adds",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the task plugin's own parameters")
    separator: str = Field("|", min_length=1, description="multilabel: separates a row's labels in one cell")
    threshold: float = Field(0.5, gt=0, lt=1, description="multilabel: a label is predicted above this score")


class DistributedConfig(_Strict):
    """Data-parallel training of one candidate: ``processes`` ranks, each on a shard of the image groups."""

    processes: int = Field(1, ge=1, le=256, description="ranks (processes) per candidate; 1 trains in-process")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on the CPU")


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1, description="rows per batch (approximate when grouped by image)")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(3, ge=1)
    head_hidden: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    threads: int = Field(0, ge=0, description="torch threads per candidate; 0 = cores / parallel candidates")
    device: str = Field(
        "auto",
        description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps; "
        "the MMOPS_DEVICE environment variable overrides it",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16: autocast on CUDA or CPU; fp16: autocast with a gradient scaler, CUDA only"
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="data-parallel training of each candidate over several processes (`mmops train --nproc N`)",
    )
    feature_cache: bool = Field(
        True,
        description="use cached frozen features and encode each distinct value once per batch; "
        "false recomputes every encoder for every row (the naive baseline the benchmarks compare with)",
    )
    ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="decay of an exponential moving average of the weights that val "
        "judges and the artifact keeps (0.99-0.999 typical); 0 = off",
    )
    smoothing: int = Field(
        1,
        ge=1,
        le=20,
        description="early stopping: patience counts from the best mean of the "
        "last N val scores, so one lucky epoch on a small val split does not stop training",
    )
    seeds: int = Field(
        1,
        ge=1,
        le=20,
        description="train each candidate with this many seeds (seed, seed+1, ...): "
        "the leaderboard and registry show mean ± std and selection uses the mean; the artifact "
        "is the first seed's model (unless ensemble)",
    )
    ensemble: bool = Field(
        False,
        description="keep every seed's model and serve the average of their outputs (a deep ensemble: "
        "mean probability for classification, mean value for regression); needs seeds >= 2. Its own "
        "val/test figures are what the leaderboard, selection and registry use (the members' mean ± "
        "std stay recorded). Inference costs `seeds` forward passes, and the artifact holds `seeds` models",
    )


class CandidateConfig(_Strict):
    name: str
    fusion: str | None = Field(None, description="a fusion plugin; not needed (and not used) with one input")
    params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the train section")
    inputs: list[str] | None = Field(
        None,
        min_length=1,
        description="the inputs this candidate reads (default: all); one input trains a "
        "unimodal baseline with no fusion, the first question of any multimodal project",
    )

    def input_names(self, all_inputs: list[str]) -> list[str]:
        return list(self.inputs) if self.inputs else list(all_inputs)


class SweepConfig(_Strict):
    """Candidates generated from a grid (or a random sample of it), added to the listed ones."""

    method: Literal["grid", "random"] = "grid"
    samples: int = Field(0, ge=0, description="random: how many grid points to draw")
    seed: int = 0
    fusion: list[str] = Field(default_factory=list)
    params: dict[str, list[Any]] = Field(default_factory=dict, description="fusion parameters to vary")
    train: dict[str, list[Any]] = Field(default_factory=dict, description="train settings to vary")
    ablation: bool = Field(
        False,
        description="also train every single input and every leave-one-out subset "
        "next to the first candidate (the modality table in the leaderboard and report)",
    )

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        unknown = set(self.train) - set(TrainConfig.model_fields)
        if unknown:
            raise ValueError(f"train: unknown keys {sorted(unknown)}")
        if self.method == "random" and not self.samples:
            raise ValueError("samples: a random sweep needs samples > 0")
        if not self.fusion and not self.ablation:
            raise ValueError("fusion: list the fusions to sweep (or set ablation: true)")
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
    """Where candidates train: threads here, or a Dask cluster (features travel by path)."""

    kind: Literal["threads", "dask"] = "threads"
    max_workers: int = Field(1, ge=1, description="candidates trained at once (threads, or local cluster workers)")
    address: str | None = Field(None, description="an existing cluster, e.g. tcp://host:8786; none starts a local one")


class RegistryConfig(_Strict):
    model_name: str = "easy-vqa"


class IndexConfig(_Strict):
    """The vector index a contrastive model's bento ships: which rows are searchable, and how."""

    splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["train", "val"],
        min_length=1,
        description="the prepared splits whose rows form the gallery (test stays unseen by default)",
    )
    input: str | None = Field(
        None,
        description="the input whose distinct values are indexed (default: the "
        "task's image input; its text input makes captions searchable)",
    )
    exact_below: int = Field(
        20_000,
        ge=0,
        description="galleries smaller than this are searched exactly; "
        "larger ones approximately: product-quantised codes re-ranked exactly "
        "(faiss), or an HNSW graph (usearch) where faiss is missing",
    )


class PromotionConfig(_Strict):
    """Champion/challenger: measured on the test split, where both models are evaluated alike."""

    metric: str = Field(
        "accuracy",
        description="a test metric of the task (accuracy, macro_f1, mae...); when left out, the task's first metric",
    )
    margin: float = Field(0.002, ge=0, description="the challenger must beat the champion by more than this")
    min_accuracy: float = Field(0.5, ge=0, le=1, description="below this a model never reaches production")
    min_macro_f1: float = Field(0.0, ge=0, le=1)


class Params(_Strict):
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    inputs: dict[str, InputConfig]
    target: TargetConfig = Field(default_factory=TargetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    candidates: list[CandidateConfig] = Field(default_factory=list)
    sweep: SweepConfig | None = None
    select_metric: str = "val_accuracy"  # when left out: val_ and the task's first metric
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)

    @field_validator("target", mode="before")
    @classmethod
    def _target_shorthand(cls, v: Any) -> Any:
        return {"column": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> Params:
        task = self.target.type
        metrics = list(self.task_metrics)
        if "select_metric" not in self.model_fields_set:
            self.select_metric = f"val_{metrics[0]}"
        if "metric" not in self.promotion.model_fields_set:
            self.promotion.metric = metrics[0]
        allowed = [f"val_{m}" for m in metrics]
        if self.select_metric not in allowed:
            raise ValueError(
                f"select_metric: a {task} target is selected on one of {allowed}, got '{self.select_metric}'"
            )
        if self.promotion.metric not in metrics:
            raise ValueError(
                f"promotion.metric: a {task} target is compared on one of {metrics}, got '{self.promotion.metric}'"
            )
        for name, spec in self.inputs.items():
            if spec.kind == "audio" and spec.params.get("sample_rate", self.data.sample_rate) != self.data.sample_rate:
                raise ValueError(
                    f"inputs.{name}.params.sample_rate must equal data.sample_rate "
                    f"({self.data.sample_rate}): prepare resamples audio to that rate"
                )
        if not self.inputs:
            raise ValueError("inputs: declare at least one input")
        if not self.candidates and not (self.sweep and self.sweep.fusion):
            raise ValueError("candidates: list at least one candidate (name + fusion), or declare a sweep")
        for c in [*self.candidates, *(self.sweep.expand() if self.sweep else [])]:
            used = c.input_names(list(self.inputs))
            unknown = [n for n in used if n not in self.inputs]
            if unknown:
                raise ValueError(f"candidates[{c.name}].inputs: unknown {unknown}; the inputs are {list(self.inputs)}")
            if len(used) > 1 and c.fusion is None and not self.task_combines_inputs:
                raise ValueError(
                    f"candidates[{c.name}]: {len(used)} inputs: name a fusion (only a one-input "
                    "candidate, or one of a task that combines the inputs itself, has none)"
                )
        names = [c.name for c in self.all_candidates()]
        if len(set(names)) != len(names):
            raise ValueError(f"candidates: names must be unique, got {names}")
        for c in self.candidates:
            unknown = set(c.train) - set(TrainConfig.model_fields)
            if unknown:
                raise ValueError(f"candidates[{c.name}].train: unknown keys {sorted(unknown)}")
        self._check_ensembles()
        return self

    def _check_ensembles(self) -> None:
        """``train.ensemble`` (top level or a candidate's override) is refused here, before anything
        trains, where it cannot work: one seed has nothing to average, and a task without ``combine()``
        (captions, retrieval towers) cannot average its models' outputs."""
        from mmops.core.tasks import task_class

        for c in self.all_candidates():
            train = {**self.train.model_dump(), **c.train}
            if not train.get("ensemble"):
                continue
            where = "train" if "ensemble" not in c.train else f"candidates[{c.name}].train"
            if int(train.get("seeds") or 1) < 2:
                raise ValueError(
                    f"{where}.ensemble averages the models of several seeds, but candidate '{c.name}' trains one "
                    "(train.seeds: 1): set train.seeds: 3 (or more), or ensemble: false"
                )
            if not task_class(self.target.type).combines_models():
                raise ValueError(
                    f"{where}.ensemble: the {self.target.type} task cannot average several models' outputs "
                    f"(its plugin has no combine()); set ensemble: false"
                )

    @property
    def task_combines_inputs(self) -> bool:
        """Whether the target's task combines the inputs itself (then candidates name no fusion)."""
        from mmops.core.tasks import task_class

        return task_class(self.target.type).combines_inputs

    @property
    def task_metrics(self) -> dict[str, str]:
        """The target's task plugin's metrics and their direction (``max``/``min``)."""
        from mmops.core.plugin_registry import PluginError
        from mmops.core.tasks import task_class

        try:
            return dict(task_class(self.target.type).metrics)
        except PluginError as exc:
            raise ValueError(f"target.type: {exc}") from None

    def metric_sign(self, metric: str) -> float:
        """+1 when a higher ``metric`` (``val_``/``test_`` prefixes allowed) is better, -1 when lower is.

        Training, candidate selection and champion/challenger all rank by ``sign * value``."""
        from mmops.core.tasks import task_class

        return task_class(self.target.type).sign(metric)

    def all_candidates(self) -> list[CandidateConfig]:
        listed = [*self.candidates, *(self.sweep.expand() if self.sweep else [])]
        if self.sweep and self.sweep.ablation and listed:
            known = {c.name for c in listed}
            listed += [c for c in self.ablation_candidates(listed[0]) if c.name not in known]
        return listed

    def ablation_candidates(self, base: CandidateConfig) -> list[CandidateConfig]:
        """``base`` on every single input and every leave-one-out subset of its inputs (same fusion and
        training): does fusion beat the best single modality, and what does each input add?"""
        names = base.input_names(list(self.inputs))
        subsets = [[n] for n in names]
        if len(names) > 2:
            subsets += [[m for m in names if m != n] for n in names]
        return [
            base.model_copy(
                update={
                    "name": f"{base.name}-only-{s[0]}"
                    if len(s) == 1
                    else f"{base.name}-without-" + next(n for n in names if n not in s),
                    "inputs": s,
                    "fusion": base.fusion if len(s) > 1 else None,
                    "params": base.params if len(s) > 1 else {},
                }
            )
            for s in subsets
            if len(s) < len(names)
        ]

    def candidate(self, name: str) -> CandidateConfig:
        for c in self.all_candidates():
            if c.name == name:
                return c
        raise KeyError(f"no candidate '{name}'; params.yaml has {[c.name for c in self.all_candidates()]}")

    def columns(self, name: str) -> list[str]:
        """The manifest columns an input reads."""
        return self.inputs[name].columns or [name]

    def train_for(self, candidate: CandidateConfig) -> TrainConfig:
        # Validated, not copied: an override such as {"distributed": {"processes": 2}} becomes its model.
        return TrainConfig.model_validate({**self.train.model_dump(), **candidate.train})


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
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(lines)) from None
