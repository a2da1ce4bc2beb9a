"""What every command module shares: the consoles, the ``--project`` option, loading a project.

Its own module so that the command modules import it and never each other (no import cycle).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mmops.config import ConfigError
from mmops.project import Project, configure_environment

console = Console()
# Errors are not wrapped: they name paths and commands that users copy, and a line break inside one
# ("pid\n4242", a path split at a hyphen) breaks the copy and any grep for it.
err = Console(stderr=True, soft_wrap=True)

ProjectOpt = Annotated[
    Path, typer.Option("--project", "-p", envvar="MMOPS_PROJECT", help="project directory (holds params.yaml)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (full ids, every field) instead of a table")]
# Columns that must survive any width (ids, refs, stages): never an ellipsis, fold on a very narrow terminal.
KEEP = {"no_wrap": True, "overflow": "fold"}


def print_json(data: Any) -> None:
    """JSON on stdout, bypassing rich: no wrapping, colour or highlighting to break a parser."""
    sys.stdout.write(
        json.dumps(data, indent=2, default=lambda o: o.isoformat() if isinstance(o, datetime) else str(o)) + "\n"
    )


def print_table(table: Table) -> None:
    """A table in full when stdout is not a terminal.

    Piped, rich assumes 80 columns and cuts cells to fit ("producti…"); a pipe has no width, so the table
    gets the width it needs.
    """
    if console.is_terminal:
        console.print(table)
        return
    needed = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(width=max(console.width, needed), highlight=False).print(table)


def load_project(path: Path) -> Project:
    """The project at ``path`` with its environment configured and params checked (errors name the key)."""
    project = Project.at(path)
    configure_environment(project)
    try:
        project.params  # noqa: B018 - fail early, with the offending key, on a malformed config
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    return project


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def best_candidate(project: Project) -> str:
    """The candidate ``metrics/best.json`` names (the last run's pick on val), or a clean exit saying how
    to get one."""
    board = project.metrics_dir / "best.json"
    if not board.is_file():
        raise fail("no trained candidates yet: run `mmops train` or `mmops run` first")
    return json.loads(board.read_text())["best"]
