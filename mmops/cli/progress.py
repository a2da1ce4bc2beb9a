"""Per-candidate training progress for `mmops run`, `sweep` and `train`: epoch, loss, val metric, time left.

A run trains for minutes and used to print nothing meanwhile. On a terminal each candidate gets a rich
progress bar; anywhere else (a pipe, a log file, CI) one plain line per epoch, which is what logs and
``grep`` can use. Events come from :func:`mmops.pipeline.progress_to`, from the threads that train the
candidates, so printing is serialized.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn


@dataclass
class _Candidate:
    epochs: int
    seconds: list[float] = field(default_factory=list)
    task: TaskID | None = None


def seconds_left(state: _Candidate, epoch: int) -> float:
    """At most this long until the candidate stops: the mean epoch time times the epochs still allowed.

    An upper bound: early stopping may end training sooner.
    """
    return max(0, state.epochs - epoch) * sum(state.seconds) / max(1, len(state.seconds))


class EpochProgress:
    """Receives ``(event, candidate, fields)`` from the pipeline and shows them.

    ``live`` (default: whether the console is a terminal) chooses rich bars over plain lines.
    """

    def __init__(self, console: Console, metric: str, live: bool | None = None) -> None:
        self.console, self.metric = console, metric
        self.live = console.is_terminal if live is None else live
        self.lock = threading.Lock()
        self.candidates: dict[str, _Candidate] = {}
        self.progress = (
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}", markup=False),
                console=console,
                transient=False,
            )
            if self.live
            else None
        )

    def __enter__(self) -> EpochProgress:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()

    def __call__(self, event: str, name: str, **fields: Any) -> None:
        with self.lock:
            getattr(self, f"_{event}")(name, **fields)

    def _line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def _start(self, name: str, epochs: int) -> None:
        state = self.candidates[name] = _Candidate(epochs)
        if self.progress:
            state.task = self.progress.add_task(name, total=epochs, stats="starting")
        else:
            self._line(f"{name}: training, at most {epochs} epochs")

    def _epoch(self, name: str, record: dict[str, Any]) -> None:
        state = self.candidates.setdefault(name, _Candidate(record["epoch"]))
        epoch, value = record["epoch"], record.get(self.metric)
        state.seconds.append(record.get("seconds", 0.0))
        metric = f"{self.metric} {value:.4f}" if value is not None else f"{self.metric} -"
        stats = (
            f"loss {record['train_loss']:.4f}  {metric}  {state.seconds[-1]:.1f} s/epoch  "
            f"<= {seconds_left(state, epoch):.0f} s left"
        )
        if self.progress and state.task is not None:
            self.progress.update(state.task, completed=epoch, stats=stats)
        else:
            self._line(f"{name}: epoch {epoch}/{state.epochs}  {stats}")

    def _end(self, name: str, status: str, reused: bool = False, error: str | None = None) -> None:
        state = self.candidates.get(name)
        what = "unchanged, reused" if reused else status + (f": {error}" if error else "")
        if self.progress and state is not None and state.task is not None:
            self.progress.update(state.task, completed=state.epochs if status == "completed" else None, stats=what)
        else:
            took = f" after {len(state.seconds)} epochs, {sum(state.seconds):.0f} s" if state and state.seconds else ""
            self._line(f"{name}: {what}{took}")


@contextlib.contextmanager
def epoch_progress(console: Console, metric: str) -> Iterator[EpochProgress]:
    """Show the progress of every candidate trained in this process while the block runs."""
    from mmops import pipeline

    with EpochProgress(console, metric) as display, pipeline.progress_to(display):
        yield display
