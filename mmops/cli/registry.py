"""Registry and lifecycle commands: runs, models, lineage, db, schedule, worker.

Kept apart from ``mmops.cli.main`` (which mounts these apps) so the registry's command line reads as one
piece; heavy imports stay inside the commands, as there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from mmops.cli.common import KEEP, JsonOpt, ProjectOpt, console, fail, load_project, print_json, print_table
from mmops.project import Project

runs_app = typer.Typer(no_args_is_help=True, help="Training runs in the registry.")
models_app = typer.Typer(no_args_is_help=True, help="Model versions, stages and promotion.")
db_app = typer.Typer(no_args_is_help=True, help="The registry database (SQLite or MMOPS_DB_URL).")
schedule_app = typer.Typer(no_args_is_help=True, help="Scheduled retraining (Prefect deployments of `retrain`).")

_project, _fail = load_project, fail


def _registry(project: Project):
    from mmops.registry.store import Registry

    return Registry(project.db_url)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | dict) else value
    return out


def _data_version_json(dv) -> dict[str, Any] | None:
    return {"id": dv.id, "digest": dv.digest, "hashes": dv.hashes} if dv else None


def _run_json(run, series: bool = False, data_version: bool = True) -> dict[str, Any]:
    """A run as ``--json`` prints it: every field, the full id, metrics as numbers."""
    out = {
        "id": run.id,
        "name": run.name,
        "status": run.status,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "duration_s": run.duration_s,
        "seed": run.seed,
        "host": run.host,
        "git_commit": run.git_commit,
        "flow_run_id": run.flow_run_id,
        "error": run.error,
        "artifact": run.artifact,
        "final_metrics": run.final_metrics(),
    }
    if data_version:
        out["data_version"] = _data_version_json(run.data_version)
    if series:
        out["config"] = run.config
        points: dict[int, dict[str, float]] = {}
        for m in run.metrics:
            if m.step is not None:
                points.setdefault(m.step, {})[m.key] = m.value
        out["per_epoch"] = [{"epoch": step, **points[step]} for step in sorted(points)]
    return out


def _version_json(mv) -> dict[str, Any]:
    return {
        "ref": mv.ref,
        "name": mv.name,
        "version": mv.version,
        "stage": mv.stage,
        "run_id": mv.run_id,
        "model_tag": mv.model_tag,
        "bento_tag": mv.bento_tag,
        "metrics": mv.metrics,
        "created_at": mv.created_at,
        "stage_changed_at": mv.stage_changed_at,
    }


# ---------------------------------------------------------------- runs


@runs_app.command("list")
def runs_list(project_dir: ProjectOpt = Path("."), limit: int = 20, as_json: JsonOpt = False) -> None:
    """The latest runs with their status and final metrics."""
    project = _project(project_dir)
    if as_json:
        print_json([_run_json(run) for run in _registry(project).runs(limit)])
        return
    table = Table()
    for col in ("run", "name", "status", "started", "seconds", "val acc", "test acc", "host"):
        table.add_column(col, **(KEEP if col in ("run", "name", "status") else {}))
    for run in _registry(project).runs(limit):
        final = run.final_metrics()
        table.add_row(
            run.id[:8],
            run.name,
            run.status,
            f"{run.started_at:%Y-%m-%d %H:%M}",
            f"{run.duration_s or 0:.0f}",
            _fmt(final.get("val_accuracy")),
            _fmt(final.get("test_accuracy")),
            run.host,
        )
    print_table(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="run id (a unique prefix will do)")],
    project_dir: ProjectOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """One run: config, data version, timings, final metrics and the per-epoch series."""
    project = _project(project_dir)
    try:
        run = _registry(project).get_run(run_id)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print_json(_run_json(run, series=True))
        return
    console.print(f"[bold]run {run.id}[/] ({run.name})  status {run.status}")
    console.print(
        f"started {run.started_at:%Y-%m-%d %H:%M:%S}  finished "
        f"{f'{run.finished_at:%H:%M:%S}' if run.finished_at else '-'}  duration {_fmt(run.duration_s)} s"
    )
    console.print(f"seed {run.seed}  git {run.git_commit or '-'}  host {run.host}  flow run {run.flow_run_id or '-'}")
    if run.error:
        console.print(f"[red]error:[/] {run.error}")
    if run.data_version:
        console.print(
            f"data version #{run.data_version.id}: "
            + "  ".join(f"{k} {v[:10]}" for k, v in run.data_version.hashes.items())
        )
    console.print(yaml.safe_dump(run.config, sort_keys=False).rstrip())
    final = Table(title="final metrics")
    final.add_column("metric", **KEEP)
    final.add_column("value", justify="right")
    for key, value in sorted(run.final_metrics().items()):
        final.add_row(key, _fmt(value))
    print_table(final)
    series: dict[int, dict[str, float]] = {}
    for m in run.metrics:
        if m.step is not None:
            series.setdefault(m.step, {})[m.key] = m.value
    if series:
        keys = sorted({k for row in series.values() for k in row})
        table = Table(title="per epoch")
        for col in ("epoch", *keys):
            table.add_column(col, justify="right")
        for step in sorted(series):
            table.add_row(str(step), *(_fmt(series[step].get(k)) for k in keys))
        print_table(table)


@runs_app.command("compare")
def runs_compare(
    run_ids: Annotated[list[str], typer.Argument(help="two or more run ids (prefixes)")],
    project_dir: ProjectOpt = Path("."),
    all_config: Annotated[bool, typer.Option("--all", help="show equal config keys too")] = False,
) -> None:
    """Config differences and final metrics of runs side by side."""
    project = _project(project_dir)
    if len(run_ids) < 2:
        raise _fail("give two or more runs to compare", 2)
    registry = _registry(project)
    try:
        runs = [registry.get_run(r) for r in run_ids]
    except LookupError as exc:
        raise _fail(str(exc)) from None
    configs = [_flatten(r.config) for r in runs]
    table = Table(title="config" if all_config else "config differences")
    table.add_column("key")
    for r in runs:
        table.add_column(f"{r.id[:8]} {r.name}")
    for key in sorted(set().union(*configs)):
        values = [c.get(key) for c in configs]
        if all_config or len({json.dumps(v) for v in values}) > 1:
            table.add_row(key, *(_fmt(v) for v in values))
    finals = [r.final_metrics() for r in runs]
    table.add_section()
    for key in sorted(set().union(*finals)):
        values = [f.get(key) for f in finals]
        best = max((v for v in values if v is not None), default=None)
        table.add_row(
            f"[bold]{key}[/]", *(("[green]" if v == best and "loss" not in key else "") + _fmt(v) for v in values)
        )
    table.add_section()
    table.add_row("status", *(r.status for r in runs))
    table.add_row("duration s", *(_fmt(r.duration_s) for r in runs))
    table.add_row("data version", *(f"#{r.data_version.id}" if r.data_version else "-" for r in runs))
    console.print(table)


# ---------------------------------------------------------------- models


def _parse(ref: str, need_version: bool) -> tuple[str, int | None]:
    from mmops.registry.store import parse_ref

    try:
        return parse_ref(ref, need_version)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None


@models_app.command("list")
def models_list(
    name: Annotated[str | None, typer.Argument(help="only this model")] = None,
    project_dir: ProjectOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Registered model versions with their stage."""
    project = _project(project_dir)
    if as_json:
        print_json([_version_json(v) for v in _registry(project).model_versions(name)])
        return
    table = Table()
    for col in ("model", "stage", "run", "val acc", "test acc", "created", "bento"):
        table.add_column(col, **(KEEP if col in ("model", "stage", "run", "bento") else {}))
    colours = {"production": "green", "staging": "yellow", "archived": "dim"}
    for v in _registry(project).model_versions(name):
        stage = f"[{colours[v.stage]}]{v.stage}[/]" if v.stage in colours else v.stage
        table.add_row(
            v.ref,
            stage,
            v.run_id[:8],
            _fmt(v.metrics.get("val_accuracy")),
            _fmt(v.metrics.get("test_accuracy")),
            f"{v.created_at:%Y-%m-%d %H:%M}",
            v.bento_tag or "",
        )
    print_table(table)


def _print_events(events: list) -> None:
    table = Table(title="history")
    for col in ("when", "version", "action", "from", "to", "by", "why"):
        table.add_column(col, **(KEEP if col in ("version", "from", "to") else {}))
    for e in events:
        table.add_row(
            f"{e.at:%Y-%m-%d %H:%M:%S}",
            str(e.version or ""),
            e.action,
            e.from_stage or "",
            e.to_stage or "",
            e.actor,
            e.reason,
        )
    print_table(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION")],
    project_dir: ProjectOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """A model version (the latest without :VERSION): stage, metrics, tags, and its stage history."""
    project = _project(project_dir)
    name, version = _parse(ref, need_version=False)
    registry = _registry(project)
    try:
        mv = registry.get_version(name, version)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    production = registry.production(name)
    if as_json:
        events = [
            {
                "at": e.at,
                "version": e.version,
                "action": e.action,
                "from_stage": e.from_stage,
                "to_stage": e.to_stage,
                "actor": e.actor,
                "reason": e.reason,
                "details": e.details,
            }
            for e in registry.events(name, mv.version)
        ]
        print_json(_version_json(mv) | {"production": production.ref if production else None, "events": events})
        return
    console.print(
        f"[bold]{mv.ref}[/]  stage [bold]{mv.stage}[/] since {mv.stage_changed_at:%Y-%m-%d %H:%M}"
        f"   (production: {production.ref if production else 'none'})"
    )
    console.print(f"run {mv.run_id} ({mv.run.name})  model {mv.model_tag or '-'}  bento {mv.bento_tag or '-'}")
    console.print("  ".join(f"{k} {_fmt(v)}" for k, v in sorted(mv.metrics.items())))
    _print_events(registry.events(name, mv.version))


@models_app.command("promote")
def models_promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    to: Annotated[str, typer.Option("--to", help="production, staging or archived")] = "production",
    reason: Annotated[str, typer.Option(help="why, for the event log")] = "promoted by hand",
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Move a version to a stage; to production archives the current one in the same transaction."""
    from mmops.registry.store import STAGES

    project = _project(project_dir)
    name, version = _parse(ref, need_version=True)
    if to not in STAGES or to == "candidate":
        raise _fail(f"--to must be production, staging or archived, got '{to}'", 2)
    registry = _registry(project)
    before = registry.production(name)
    try:
        mv = registry.transition(name, version, to, reason, action="promote" if to == "production" else "transition")
    except LookupError as exc:
        raise _fail(str(exc)) from None
    replaced = f" (was {before.ref}, now archived)" if to == "production" and before and before.ref != mv.ref else ""
    console.print(f"{mv.ref} -> {to}{replaced}")


@models_app.command("rollback")
def models_rollback(
    name: Annotated[str, typer.Argument(help="model name")],
    reason: Annotated[str, typer.Option(help="why, for the event log")] = "",
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Put the previous production version back in production (the current one is archived)."""
    project = _project(project_dir)
    registry = _registry(project)
    before = registry.production(name)
    try:
        mv = registry.rollback(name, reason)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    console.print(f"rolled back {name}: {before.ref if before else '-'} -> {mv.ref} is production")


def lineage(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    project_dir: ProjectOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Where a model version came from: data version, run, config, commit, model and bento."""
    project = _project(project_dir)
    name, version = _parse(ref, need_version=True)
    try:
        mv = _registry(project).get_version(name, version)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    run = mv.run
    if as_json:
        print_json(
            _version_json(mv)
            | {
                "data_version": _data_version_json(mv.data_version),
                "run": _run_json(run, data_version=False) | {"config": run.config},
            }
        )
        return
    table = Table(title=f"lineage of {mv.ref}", show_header=False)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("stage", mv.stage)
    table.add_row("bento", mv.bento_tag or "-")
    table.add_row("model", mv.model_tag or "-")
    table.add_row("run", f"{run.id} ({run.name}, {run.status}, seed {run.seed}, {_fmt(run.duration_s)} s)")
    table.add_row("flow run", run.flow_run_id or "-")
    table.add_row("git commit", run.git_commit or "-")
    table.add_row("host", run.host)
    dv = mv.data_version
    table.add_row("data version", f"#{dv.id} ({dv.digest[:12]})" if dv else "-")
    for key, digest in dv.hashes.items() if dv else []:
        table.add_row(f"  {key}", digest)
    table.add_row("config", yaml.safe_dump(run.config, sort_keys=False).rstrip())
    print_table(table)


# ---------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(
    project_dir: ProjectOpt = Path("."), revision: Annotated[str, typer.Option(help="target revision")] = "head"
) -> None:
    """Apply the schema migrations (also done automatically on first use)."""
    from mmops.registry.migrations import current, head, upgrade
    from mmops.registry.store import make_engine

    project = _project(project_dir)
    engine = make_engine(project.db_url)
    before = current(engine)
    upgrade(engine, revision)
    console.print(
        f"{engine.url.render_as_string(hide_password=True)}: {before or 'empty'} -> {current(engine)} (head {head()})"
    )


@db_app.command("current")
def db_current(project_dir: ProjectOpt = Path(".")) -> None:
    """The schema revision of the registry database."""
    from mmops.registry.migrations import current, head
    from mmops.registry.store import make_engine

    project = _project(project_dir)
    engine = make_engine(project.db_url)
    console.print(f"{engine.url.render_as_string(hide_password=True)}: {current(engine) or 'empty'} (head {head()})")


# ---------------------------------------------------------------- schedules


@schedule_app.command("create")
def schedule_create(
    cron: Annotated[str, typer.Option(help='cron expression, e.g. "0 3 * * *" (03:00 every night)')],
    name: Annotated[str, typer.Option(help="deployment name")] = "nightly",
    timezone: Annotated[str | None, typer.Option(help="IANA timezone of the cron (default UTC)")] = None,
    bento: Annotated[bool, typer.Option(help="build a bento for each new model")] = True,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Register (or update) a Prefect deployment of `retrain` for this project on a cron schedule."""
    from mmops.registry import schedules

    project = _project(project_dir)
    try:
        s = schedules.create(project, name, cron, timezone, bento)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    console.print(
        f"schedule [bold]{s.name}[/]: retrain {s.project_dir} at '{', '.join(s.crons)}'"
        f" ({s.timezone or 'UTC'}); run `mmops worker` to execute it"
    )


@schedule_app.command("list")
def schedule_list(project_dir: ProjectOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Deployments of the retrain flow on the Prefect API."""
    import dataclasses

    from mmops.registry import schedules

    project = _project(project_dir)
    if as_json:
        print_json([dataclasses.asdict(s) for s in schedules.list_all(project)])
        return
    table = Table()
    for col in ("name", "cron", "timezone", "state", "bento", "project"):
        table.add_column(col, **(KEEP if col in ("name", "state") else {}))
    for s in schedules.list_all(project):
        table.add_row(
            s.name,
            ", ".join(s.crons) or "-",
            s.timezone or "UTC",
            "[yellow]paused[/]" if s.paused else "[green]active[/]",
            "yes" if s.build_bento else "no",
            s.project_dir or "-",
        )
    print_table(table)


def _schedule_action(name: str, project_dir: Path, action: str) -> None:
    from mmops.registry import schedules

    project = _project(project_dir)
    try:
        if action == "delete":
            schedules.delete(project, name)
        elif action == "run":
            console.print(f"flow run {schedules.trigger(project, name)} of {name} scheduled now")
            return
        else:
            schedules.set_paused(project, name, action == "pause")
    except LookupError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{name}: {action}d")


ScheduleName = Annotated[str, typer.Argument(help="schedule (deployment) name")]


def _schedule_command(action: str, doc: str) -> None:
    def command(name: ScheduleName, project_dir: ProjectOpt = Path(".")) -> None:
        _schedule_action(name, project_dir, action)

    command.__doc__ = doc
    schedule_app.command(action)(command)


for _action, _doc in (
    ("pause", "Stop scheduling runs (the deployment stays)."),
    ("resume", "Schedule runs again."),
    ("delete", "Remove the deployment and its schedule."),
    ("run", "Trigger a run of the deployment now; a running `mmops worker` executes it."),
):
    _schedule_command(_action, _doc)


def worker(
    project_dir: ProjectOpt = Path("."),
    port: Annotated[
        int, typer.Option(help="port of the local Prefect server started when PREFECT_API_URL is unset")
    ] = 4200,
    limit: Annotated[int, typer.Option(min=1, help="flow runs at once")] = 1,
) -> None:
    """Serve this project's schedules in-process until Ctrl-C or SIGTERM (no Docker, no work pool)."""
    from mmops.registry import schedules

    project = _project(project_dir)
    try:
        schedules.serve(project, port=port, limit=limit, announce=console.print)
    except (LookupError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    console.print("worker: stopped")
