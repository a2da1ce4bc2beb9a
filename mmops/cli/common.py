"""What every command module shares: the consoles, the ``--project`` option, loading a project.

Its own module so that the command modules import it and never each other (no import cycle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mmops.config import ConfigError
from mmops.project import Project, configure_environment

console = Console()
err = Console(stderr=True)

ProjectOpt = Annotated[
    Path, typer.Option("--project", "-p", envvar="MMOPS_PROJECT", help="project directory (holds params.yaml)")
]


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
