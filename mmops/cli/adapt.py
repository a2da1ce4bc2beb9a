"""``mmops adapt``: a trained model adapted to a new speaker, site or device from its unlabelled inputs.

Thin over :mod:`mmops.adapt`; bad input exits with code 2 and names the row and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from mmops.cli.common import ProjectOpt, best_candidate, console, fail, load_project, print_table
from mmops.project import Project

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def adapt(
    data: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            help="manifest (.csv, .jsonl, .parquet) of the new domain's inputs, in the model's columns; "
            "file paths are relative to its folder; a target column, when present, only measures",
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="the adapted model's name (default: the manifest's name, or its folder's)")
    ] = None,
    candidate: Annotated[str | None, typer.Option(help="candidate to adapt (default: the best)")] = None,
    package: Annotated[
        bool, typer.Option(help="register it as a version of '<model_name>-<name>' and build its bento")
    ] = False,
    pseudo_labels: Annotated[
        float | None,
        typer.Option(
            min=0.5,
            max=1.0,
            help="also append the rows the adapted model is this sure of (e.g. 0.9), labelled with its answers, "
            "as training data (self-training); retrain with `mmops run`, then adapt again",
        ),
    ] = None,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Adapt a trained model to new inputs without labels: batch-norm statistics re-estimated (AdaBN)."""
    project = load_project(project_dir)
    name = (name or (data.stem if data.stem != "manifest" else data.resolve().parent.name)).lower()
    if not NAME.fullmatch(name):
        raise fail(f"--name {name!r}: use lowercase letters, digits, '-', '_' or '.' (up to 63), e.g. --name site-2", 2)
    candidate = candidate or best_candidate(project)
    source = project.models_dir / candidate
    if not (source / "result.json").is_file():
        raise fail(f"no trained candidate '{candidate}' in {project.models_dir}", 2)
    from mmops.adapt import AdaptError, adapt_artifact, register_adapted

    out_dir = project.models_dir / "adapted" / name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("adapting", total=None)
            summary = adapt_artifact(
                source,
                data,
                out_dir,
                target=project.params.target.column,
                batch_size=project.params.train.batch_size,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except (AdaptError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    members = f" in {summary['members']} members" if summary["members"] > 1 else ""
    console.print(
        f"adapted [bold]{candidate}[/] on {summary['rows']} rows of {data}: "
        f"{summary['layers']} batch-norm layers{members}"
    )
    if summary["refused"]:
        console.print(f"{len(summary['refused'])} rows refused (not used):")
        table = Table()
        for column in ("line", "field", "reason"):
            table.add_column(column)
        for problem in summary["refused"][:10]:
            table.add_row(str(problem["line"]), problem["field"], problem["reason"])
        print_table(table)
    if "before" in summary:
        before, after = summary["before"], summary["after"]
        console.print(f"on its {before['rows']} labelled rows (labels only measure; they never train):")
        table = Table()
        table.add_column("metric")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for key in before:
            if key not in ("rows", "unknown_targets", "n"):
                table.add_row(key, f"{before[key]:.4f}", f"{after[key]:.4f}")
        print_table(table)
    console.print(f"model: {out_dir}")
    if pseudo_labels is not None:
        _append_pseudo_labels(project, out_dir, data, name, pseudo_labels)
    if package:
        run_id = json.loads((source / "result.json").read_text()).get("run_id")
        try:
            out = register_adapted(project, out_dir, name, summary, run_id)
        except AdaptError as exc:
            raise fail(str(exc), 2) from None
        console.print(f"model version {out['model_version']}  model {out['model_tag']}  bento {out['bento_tag']}")


def _append_pseudo_labels(project: Project, adapted: Path, data: Path, name: str, threshold: float) -> None:
    """The adapted model's confident answers on the manifest's rows, appended as a training batch
    (``mmops data append``: versioned with the data, re-prepared by the next run)."""
    from mmops.adapt import AdaptError, append_pseudo_labels
    from mmops.adapt import pseudo_labels as label_rows  # the command's option has the function's name

    params = project.params
    try:
        kept, stats = label_rows(adapted, data, threshold, params.target.column, params.train.batch_size)
    except AdaptError as exc:
        raise fail(str(exc), 2) from None
    checked = f"; {stats['correct']:.1%} of them match the labels in {data.name}" if "correct" in stats else ""
    console.print(f"pseudo-labels: {stats['kept']} of {stats['of']} rows at confidence >= {threshold}{checked}")
    if kept.empty:
        console.print("nothing to append: lower --pseudo-labels, or adapt on more rows")
        return
    try:
        out = append_pseudo_labels(kept, data, name, project.appended_dir, params, {"threshold": threshold, **stats})
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    where = out["path"].relative_to(project.root)
    if out["unchanged"]:
        console.print(f"the same pseudo-labels are already appended as {where}: nothing to retrain")
        return
    replaced = f" (replacing the earlier round {', '.join(out['replaced'])})" if out["replaced"] else ""
    console.print(
        f"appended them as {where}{replaced}: run `mmops run` to retrain with them, then `mmops adapt {data}` again"
    )
