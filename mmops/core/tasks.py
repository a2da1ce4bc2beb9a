"""The third plugin contract, :class:`Task`: what is learned from the fused vector, and how it is judged.

An encoder turns one input into features, a fusion combines them; a task owns everything after that
and everything about the target column: what a cell becomes (a label index, a label set, a scaled
number), the head on top of the fusion, the loss, turning outputs into answers, the metrics with their
direction, and the fields of the service's answer. The training loop, evaluation, selection,
champion/challenger, the report and the service only ever call these methods, so a new kind of
problem (ordinal regression, contrastive retrieval, captioning) is a plugin, not an ``if`` in mmops.

Tasks are read by the prepare stage, which must stay cheap: this module and the built-in tasks import
torch only inside the methods that need it.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

HIGHER, LOWER = "max", "min"


class Task(abc.ABC):
    """A learning problem on one target column.

    Life cycle: the prepare stage calls :meth:`parse` on every cell, :meth:`vocabulary` on the train
    split's parsed values and :meth:`encode` to store each row's target. Training builds the task with
    those labels, calls :meth:`fit` on the train targets (a scaler, class weights), sizes the model's
    :meth:`head` by :attr:`output_dim` and trains on :meth:`loss`. Evaluation, the predictions file,
    ``mmops predict`` and the service turn outputs into :meth:`scores`, :meth:`evaluate`,
    :meth:`describe` and :meth:`answers`. :meth:`config` is saved in the model's ``spec.json``;
    ``cls(labels=..., **config)`` rebuilds the same task at load time.
    """

    #: Metrics the task reports, by name, with their direction (``"max"``: higher is better). The first
    #: is the default for selection (``select_metric: val_<name>``) and champion/challenger.
    metrics: ClassVar[Mapping[str, str]]
    #: Whether splits are stratified by the target (class labels), or only grouped (numbers, sets).
    stratify: ClassVar[bool] = False
    #: Raw target cells this task accepts, for ``mmops plugins check`` (no data set needed there).
    example_targets: ClassVar[tuple[str, ...]] = ("cat", "dog", "bird", "cat", "dog")
    #: A task that combines the inputs itself instead of sitting on one fused vector: contrastive
    #: towers keep each input's embedding apart, a caption decoder attends over the image's tokens.
    #: The model then builds no fusion and hands :meth:`network` every input's features by name.
    combines_inputs: ClassVar[bool] = False
    #: With :attr:`combines_inputs`: whether :meth:`network` takes token sequences (:class:`Tokens`,
    #: cached for frozen encoders like an attending fusion's) rather than one vector per input.
    needs_sequences: ClassVar[bool] = False
    #: With :attr:`combines_inputs`: the input names ``mmops plugins check`` hands :meth:`network`
    #: (one random feature tensor under each name).
    example_inputs: ClassVar[tuple[str, ...]] = ("input",)

    def __init__(self, labels: Sequence[str] = ()) -> None:
        self.labels = list(labels)

    # ------------------------------------------------------------------ the target column (prepare)
    def parse(self, cell: str) -> Any:
        """One non-empty target cell to the task's value; raise ``ValueError(reason)`` for a bad one.

        The reason lands in ``data/quarantine.csv`` beside the row's source and line.
        """
        return cell

    def vocabulary(self, train_values: Iterable[Any]) -> list[str]:
        """The label names learned from the train split (none for a number)."""
        return []

    def encode(self, value: Any, index: Mapping[str, int]) -> Any:
        """A parsed value to what ``rows.parquet`` stores; ``KeyError`` for a label outside the vocabulary."""
        return value

    # ------------------------------------------------------------------ training
    def fit(self, targets: np.ndarray) -> Task:
        """Learn what the task needs from the train split's targets (a scaler); most need nothing."""
        return self

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (resolved parameters and learned state), JSON-serialisable.

        The default reads the constructor's signature back from attributes of the same name, as
        scikit-learn's ``get_params`` does.
        """
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "labels")]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    @property
    def output_dim(self) -> int:
        """Width of the head's output (a logit per class by default)."""
        return len(self.labels)

    def head(self, in_dim: int, hidden: int, dropout: float) -> nn.Module:
        """The module on top of the fusion output; an MLP to :attr:`output_dim` by default."""
        from torch import nn

        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, self.output_dim)
        )

    def network(self, dims: Mapping[str, int], hidden: int, dropout: float) -> nn.Module:
        """With :attr:`combines_inputs`: the module whose ``forward`` takes ``{input: features}`` (a
        ``(batch, dim)`` vector each, or :class:`Tokens` with :attr:`needs_sequences`) and returns the
        outputs :meth:`loss` and :meth:`scores` read. It is the model's ``head``: its weights are saved
        and loaded with the model. A task may keep a reference to it when its loss or scores must call
        back into it (a decoder run with teacher forcing in the loss, and decoding in the scores).
        """
        raise NotImplementedError(f"{type(self).__name__} combines the inputs itself but has no network()")

    def reference_groups(self, rows: pd.DataFrame) -> np.ndarray | None:
        """The ``groups`` :meth:`evaluate` gets for these prepared rows when they are examples with several
        targets each (a caption task: the rows of one image, every caption a reference); None otherwise,
        and evaluation passes the data set's own ``group`` column (easy-VQA's answer type) if any."""
        return None

    def targets(self, stored: Sequence[Any]) -> np.ndarray:
        """Stored targets of some rows to the array :meth:`loss` and :meth:`evaluate` take."""
        return np.asarray(stored)

    @abc.abstractmethod
    def loss(self, outputs: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
        """A scalar loss of the head's ``outputs`` against :meth:`targets` of the same rows."""

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs to what evaluation and answers read (probabilities, values in target units)."""
        return outputs

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Several models' outputs for the same rows to one output, which :meth:`scores`, evaluation and
        answers then read as if one model gave it: what a deep ensemble (``train.ensemble``) serves.

        Averaging belongs to the task because only it knows what its outputs mean (class logits are
        averaged as probabilities, a regression's as values). A task without this method cannot be an
        ensemble: ``train.ensemble`` is refused for it when the configuration is read.
        """
        raise NotImplementedError(f"{type(self).__name__} does not combine models' outputs (no combine())")

    # ------------------------------------------------------------------ judging and answering
    @abc.abstractmethod
    def evaluate(self, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict:
        """Metrics of one split: every name in :attr:`metrics`, plus ``n`` and any detail for the report."""

    @abc.abstractmethod
    def describe(self, targets: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Per-row columns of the predictions file: ``target``, ``prediction`` (strings), ``confidence``,
        ``correct`` and ``error`` (NaN where they do not apply). The report's mistakes come from it."""

    @abc.abstractmethod
    def answers(self, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        """One answer per row: at least ``answer`` and ``top_k`` (a list, empty where it means nothing);
        any other fields are passed through by the service."""

    def align(self, scores: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """Scores over this task's labels to scores over ``labels`` (the current data's), by name.

        Champion/challenger evaluates an older model on today's data, whose labels may have grown:
        a label the model never knew gets a zero score (so those rows count as its errors).
        """
        if not self.labels or list(labels) == self.labels:
            return scores
        out = np.zeros((len(scores), len(labels)), dtype=np.float32)
        mine = {label: i for i, label in enumerate(self.labels)}
        for j, label in enumerate(labels):
            if label in mine:
                out[:, j] = scores[:, mine[label]]
        return out

    # ------------------------------------------------------------------ helpers for callers
    @classmethod
    def combines_models(cls) -> bool:
        """Whether the task averages several models' outputs (:meth:`combine`), as ``train.ensemble`` needs."""
        return cls.combine is not Task.combine

    @classmethod
    def direction(cls, metric: str) -> str:
        """``"max"`` or ``"min"`` for ``metric`` (``val_``/``test_`` prefixes allowed)."""
        name = metric.removeprefix("val_").removeprefix("test_")
        if name not in cls.metrics:
            raise KeyError(f"{cls.__name__} has no metric '{name}'; it reports {sorted(cls.metrics)}")
        return cls.metrics[name]

    @classmethod
    def sign(cls, metric: str) -> float:
        """+1 when higher is better, -1 when lower is: everything that ranks ranks by ``sign * value``."""
        return 1.0 if cls.direction(metric) == HIGHER else -1.0


def task_class(name: str) -> type[Task]:
    from mmops.core.plugin_registry import get_task

    return get_task(name)


def task_params(name: str, target: Any) -> dict[str, Any]:
    """The task's constructor arguments from the ``target`` section of ``params.yaml``.

    ``target.params`` go to the task as they are; the shared keys a user may set at the top of
    ``target`` (``threshold``, ``separator``) go only to a task whose constructor takes them.
    """
    accepted = inspect.signature(task_class(name).__init__).parameters
    shared = {k: getattr(target, k) for k in ("threshold", "separator") if k in accepted and hasattr(target, k)}
    return {**shared, **dict(getattr(target, "params", {}) or {})}


def build_task(name: str, params: Mapping[str, Any], labels: Sequence[str] = ()) -> Task:
    """The task plugin ``name`` built with ``params``; any failure of plugin code names the plugin and
    its package, the way a broken import does."""
    from mmops.core.plugin_registry import discover

    cls = task_class(name)
    try:
        return cls(labels=labels, **params)
    except Exception as exc:  # third-party constructor code: report it, whatever it raised
        info = discover("task")[name]
        raise ValueError(
            f"task '{name}' from {info.origin} could not be built with parameters "
            f"{dict(params)}: {type(exc).__name__}: {exc}"
        ) from exc


def task_from_spec(spec: Mapping[str, Any]) -> Task:
    """The task of a saved model; specs written before tasks were plugins said ``{"type": ...}``."""
    entry = dict(spec.get("task") or {"type": "classification"})
    if "name" in entry:
        return build_task(entry["name"], entry.get("params", {}), spec.get("labels", []))
    name = entry.pop("type")
    return build_task(name, entry, spec.get("labels", []))
