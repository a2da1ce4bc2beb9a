"""``mmops``: one command line over the same functions the flow uses.

Heavy libraries (torch, Prefect, DVC, BentoML) are imported inside commands so that ``--help`` and
quick commands stay instant, and so the environment is configured before Prefect reads it.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmops.cli.adapt import adapt
from mmops.cli.common import (
    KEEP,
    JsonOpt,
    ProjectOpt,
    best_candidate,
    console,
    err,
    fail,
    load_project,
    print_json,
    print_table,
)
from mmops.cli.progress import epoch_progress
from mmops.cli.registry import db_app, lineage, models_app, runs_app, schedule_app, worker
from mmops.cli.retrieval import embed, search, zero_shot
from mmops.project import NotAProjectError, Project, check_stages

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False, help=__doc__.splitlines()[0]
)
data_app = typer.Typer(no_args_is_help=True, help="Import, validate and featurize data (the DVC stages).")
plugins_app = typer.Typer(no_args_is_help=True, help="Encoders, fusions and tasks installed through entry points.")
app.add_typer(data_app, name="data")
app.add_typer(plugins_app, name="plugins")
app.add_typer(runs_app, name="runs", rich_help_panel="Registry and lifecycle")
app.add_typer(models_app, name="models", rich_help_panel="Registry and lifecycle")
app.command(rich_help_panel="Registry and lifecycle")(lineage)
app.add_typer(db_app, name="db", rich_help_panel="Registry and lifecycle")
app.add_typer(schedule_app, name="schedule", rich_help_panel="Registry and lifecycle")
app.command(rich_help_panel="Registry and lifecycle")(worker)

_project, _fail = load_project, fail


@app.callback()
def _root(
    ctx: typer.Context,
    project_dir: Annotated[
        Path | None,
        typer.Option(
            "--project",
            "-p",
            envvar="MMOPS_PROJECT",
            show_envvar=False,
            help="project directory for any command, before the command's name (a command's own --project wins)",
        ),
    ] = None,
) -> None:
    # Every command reads MMOPS_PROJECT as its --project default: set it for this invocation only.
    if project_dir is None:
        return
    before = os.environ.get("MMOPS_PROJECT")
    os.environ["MMOPS_PROJECT"] = str(project_dir)

    def restore() -> None:
        if before is None:
            os.environ.pop("MMOPS_PROJECT", None)
        else:
            os.environ["MMOPS_PROJECT"] = before

    ctx.call_on_close(restore)


def masked_url(url: str) -> str:
    """A database URL fit to print: the password as ``***``, as ``mmops db`` shows it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparsable database URL>"


# ---------------------------------------------------------------- projects


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="the new project's folder")],
    template: Annotated[
        str, typer.Option(help="vqa | classification | regression | retrieval | sentiment")
    ] = "classification",
) -> None:
    """Scaffold a project: params.yaml, dvc.yaml, bentofile.yaml, git + DVC, and a README of next steps."""
    from mmops.scaffold import init_project

    try:
        root = init_project(directory, template)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"created a {template} project in {root}; read {root / 'README.md'} for the next steps:")
    console.print(f"  cd {directory}\n  mmops data import\n  mmops data validate\n  mmops run")


# ---------------------------------------------------------------- data


@data_app.command("import")
def data_import(
    source: Annotated[
        str | None,
        typer.Argument(
            help="easy-vqa | manifest | vqa-v2 | coco-captions | imagefolder | mmsa (default: params data.source)"
        ),
    ] = None,
    from_: Annotated[
        Path | None, typer.Option("--from", "--path", help="the source's files (default: params data.path)")
    ] = None,
    project_dir: ProjectOpt = Path("."),
    limit: Annotated[int | None, typer.Option(help="rows kept per split (default: params data.limit)")] = None,
    as_: Annotated[
        str | None,
        typer.Option(
            "--as",
            help="easy-vqa, imagefolder: 'captions' writes one row per "
            "image-caption pair (contrastive retrieval, captioning); imagefolder "
            "reads captions from <stem>.txt sidecars",
        ),
    ] = None,
    zero_shot_pairs: Annotated[
        str | None,
        typer.Option(
            "--zero-shot-pairs",
            help="easy-vqa --as captions: 'default' puts every image of four colour-shape "
            "pairs in test (CLIP's zero-shot split); 'none' holds none out (default: params "
            "data.zero_shot_pairs)",
        ),
    ] = None,
) -> None:
    """Write the manifest (one row per example) and its files under data/raw/."""
    from mmops.config import SOURCES

    project = _project(project_dir)
    params = project.params
    source = source or params.data.source
    limit = params.data.limit if limit is None else limit
    if source not in SOURCES:
        raise _fail(f"unknown source '{source}'; available: {', '.join(SOURCES)}", 2)
    path = from_ or (project.root / params.data.path if params.data.path else None)
    if as_ is None and source == "easy-vqa" and params.target.type == "contrastive":
        as_ = "captions"  # image-text pairs are what a contrastive target trains on
    pairs = ("easy-vqa", "imagefolder")  # sources with an image-caption pairs layout (--as captions)
    if as_ is None and source in pairs and params.target.type in ("captioning", "contrastive"):
        as_ = "captions"  # such a target reads them as image-caption pairs (what dvc.yaml's import runs)
    if as_ not in (None, "captions") or (as_ and source not in pairs):
        raise _fail(f"--as {as_}: only 'easy-vqa --as captions' and 'imagefolder --as captions' exist", 2)
    if source == "fashion-mnist":  # Debian's dataset-fashion-mnist, or --from a folder of its idx files
        from mmops.data.fashion_mnist import import_fashion_mnist

        try:
            manifest = import_fashion_mnist(from_, project.raw_dir, limit)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc), 2) from None
        console.print(f"wrote {manifest.relative_to(project.root)}")
        return
    if source == "easy-vqa":
        from mmops.data.easyvqa import ZERO_SHOT_PAIRS, import_easy_vqa, import_easy_vqa_captions

        pairs_choice = zero_shot_pairs or params.data.zero_shot_pairs
        if pairs_choice not in ZERO_SHOT_PAIRS:
            raise _fail(f"--zero-shot-pairs {pairs_choice}: choose one of {', '.join(ZERO_SHOT_PAIRS)}", 2)
        if as_ == "captions":
            manifest = import_easy_vqa_captions(project.raw_dir, limit, holdout=ZERO_SHOT_PAIRS[pairs_choice])
        else:
            manifest = import_easy_vqa(project.raw_dir, limit)
    elif path is None:
        raise _fail(f"{source}: where are the files? Pass --from PATH or set data.path in params.yaml", 2)
    else:
        from mmops.data.importers import IMPORTERS, import_manifest

        try:
            if source == "manifest":
                from mmops.data.prepare import FILE_KINDS

                files = [c for n, i in params.inputs.items() if i.kind in FILE_KINDS for c in params.columns(n)]
                manifest = import_manifest(path, project.raw_dir, files, limit)
            elif as_ == "captions":  # imagefolder: captions in <stem>.txt sidecars, one a line
                from mmops.data.importers import import_caption_folder

                manifest = import_caption_folder(path, project.raw_dir, limit)
            else:
                manifest = IMPORTERS[source](path, project.raw_dir, limit)
        except ValueError as exc:
            raise _fail(str(exc), 2) from None
    console.print(f"wrote {manifest.relative_to(project.root)}")


def _check_plugins(project: Project) -> None:
    """Unknown plugin names and parameters in params.yaml fail here, by key, before any data is touched."""
    from mmops.config import ConfigError
    from mmops.core.params import check_plugin_params

    try:
        check_plugin_params(project.params, str(project.params_file))
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


@data_app.command("validate")
def data_validate(
    project_dir: ProjectOpt = Path("."),
    strict: Annotated[bool, typer.Option(help="exit 1 when any row is bad (for CI)")] = False,
) -> None:
    """Check every row against params.yaml before training; bad rows go to data/quarantine.csv by line."""
    import shutil
    import tempfile

    import pandas as pd

    project = _project(project_dir)
    _check_plugins(project)
    from mmops.data.prepare import prepare

    with tempfile.TemporaryDirectory(dir=project.state_dir) as tmp:
        try:
            summary = prepare(project.raw_dir, Path(tmp), project.params)
        except (FileNotFoundError, ValueError) as exc:
            raise _fail(str(exc), 2) from None
        quarantine = project.root / "data" / "quarantine.csv"
        shutil.copyfile(Path(tmp) / "quarantine.csv", quarantine)
        problems = pd.read_csv(quarantine, dtype=str, keep_default_na=False)
    console.print(
        f"{summary['rows']} rows: {summary['kept']} usable {summary['splits']}, "
        f"{summary['quarantined']} bad; task {summary['task']}, {summary['labels']} labels"
    )
    if summary.get("rare_labels"):
        err.print(f"[yellow]labels with a single row[/] (a typo?): {', '.join(summary['rare_labels'])}")
    if groups := summary.get("groups"):
        console.print(f"groups of {groups['column']} per split: {groups['per_split']}")
        if groups["in_two_splits"]:
            err.print(
                f"[yellow]{groups['column']} in two splits[/] (test sees known users): "
                f"{', '.join(groups['in_two_splits'][:20])}"
            )
    if problems.empty:
        console.print("[green]every row is usable[/]")
        return
    table = Table(title=f"Bad rows (all of them in {quarantine.relative_to(project.root)})")
    for col in ("source", "line", "field", "reason"):
        table.add_column(col)
    for row in problems.head(20).itertuples(index=False):
        table.add_row(row.source, row.line, row.field, row.reason)
    console.print(table)
    if len(problems) > 20:
        console.print(f"... and {len(problems) - 20} more")
    if strict:
        raise typer.Exit(1)


@data_app.command("prepare")
def data_prepare(project_dir: ProjectOpt = Path(".")) -> None:
    """Validate rows (bad ones quarantined by line), split train/val/test, store inputs compactly."""
    project = _project(project_dir)
    from mmops.data.prepare import prepare

    try:
        summary = prepare(project.raw_dir, project.prepared_dir, project.params)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"prepared {summary['kept']} of {summary['rows']} rows {summary['splits']}")
    if summary["quarantined"]:
        err.print(f"[yellow]{summary['quarantined']} rows quarantined[/]: see data/prepared/quarantine.csv")


@data_app.command("featurize")
def data_featurize(project_dir: ProjectOpt = Path(".")) -> None:
    """Run each frozen encoder once per distinct input and store the features."""
    project = _project(project_dir)
    from mmops.data.featurize import featurize
    from mmops.pipeline import resolve_artifact

    resolve = functools.partial(resolve_artifact, project)
    for name, info in featurize(project.prepared_dir, project.features_dir, project.params, resolve=resolve).items():
        console.print(
            f"{name}: {info['distinct']} distinct values -> {info['dim']}-d features ({info['encoder']}); "
            f"cache {info['key']}: {info['computed']} computed, {info['reused']} reused"
        )


@data_app.command("append")
def data_append(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="manifest CSV of new labelled rows")],
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Add labelled rows (a manifest; file paths relative to it) as a new batch under data/appended/."""
    project = _project(project_dir)
    from mmops.data.append import append_manifest

    try:
        out = append_manifest(file, project.appended_dir, project.params)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    console.print(
        f"appended {out['rows']} rows {out['splits']} and {out['files']} files as "
        f"{out['path'].relative_to(project.root)}; the next run re-prepares and re-featurizes"
    )
    if out["rows_with_missing_files"]:
        err.print(
            f"[yellow]{out['rows_with_missing_files']} rows refer to files missing under {file.parent}[/]: "
            "prepare will quarantine them"
        )


# ---------------------------------------------------------------- pipeline


LEADERBOARD_METRICS = 4  # val metrics shown as columns; every metric is in metrics/leaderboard.json


def print_leaderboard(results: list[dict], best: str | None = None, select_metric: str = "val_accuracy") -> None:

    from mmops.core.tasks import task_class

    task = next((r["task"] for r in results if r.get("task")), "classification")
    metric = select_metric.removeprefix("val_")
    # A task may report a dozen metrics (retrieval: recalls and ranks both ways); a table of all of them
    # wraps into an unreadable block. The selection metric comes first, the next few follow.
    val = [select_metric] + [f"val_{m}" for m in task_class(task).metrics if f"val_{m}" != select_metric]
    columns = [*val[:LEADERBOARD_METRICS], f"test_{metric}"]
    hidden = len(val[LEADERBOARD_METRICS:])
    table = Table(
        title=f"Leaderboard (selected on {select_metric}; test is reported, never used to select; "
        "ties go to fewer parameters, then name)",
        caption=f"{hidden} more val metrics per candidate in metrics/leaderboard.json" if hidden else None,
    )
    ablation = len({tuple(r.get("inputs") or ()) for r in results}) > 1
    table.add_column("candidate")
    table.add_column("fusion")
    if ablation:
        table.add_column("inputs")
    for col in [*columns, "train time"]:
        table.add_column(col.replace("_", " "), justify="right")
    table.add_column("status")
    for r in results:
        ok = r.get("status") == "completed"
        f, sd = r.get("final", {}), r.get("final_std") or {}  # train.seeds > 1: mean ± std over seeds
        # train.ensemble: the ensemble's own figure, then its members' mean ± std
        ens = r.get("ensemble") or {}
        members = {
            c: f" (members {ens['mean'][c]:.4f} ± {ens['std'][c]:.4f})" for c in columns if c in ens.get("std", {})
        }
        table.add_row(
            ("* " if r["candidate"] == best else "")
            + r["candidate"]
            + (f" (ensemble of {ens['members']})" if ens else ""),
            r.get("fusion") or "-",
            *(["+".join(r.get("inputs") or [])] if ablation else []),
            *[
                f"{f[c]:.4f}" + (f" ± {sd[c]:.4f}" if c in sd else "") + members.get(c, "") if ok and c in f else "-"
                for c in columns
            ],
            f"{r['train_seconds']:.0f} s" if ok else "-",
            "ok" if ok else f"[red]failed[/]: {r.get('error', '')[:60]}",
        )
    console.print(table)
    if ablation:
        from mmops.pipeline import modality_table

        sign = task_class(task).sign(select_metric)
        print_modalities(modality_table(results, select_metric, sign, []), select_metric)


RunnerOpt = Annotated[str | None, typer.Option("--runner", help="threads | dask (default: params runner.kind)")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", min=1, help="candidates trained at once")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="existing cluster, e.g. tcp://host:8786")]


def _runner(project: Project, kind: str | None, workers: int | None, address: str | None):
    from mmops.config import RunnerConfig

    update = {k: v for k, v in {"kind": kind, "max_workers": workers, "address": address}.items() if v is not None}
    try:
        return RunnerConfig.model_validate({**project.params.runner.model_dump(), **update})
    except ValueError as exc:
        raise _fail(f"bad runner options: {exc}", 2) from None


def _hold_run_lock(ctx: typer.Context, project: Project) -> None:
    """Hold the project's run lock until the command ends: a second run in the same project stops here
    with a clear message; the first one to get the lock after a killed run cleans up after it."""
    from mmops.pipeline import run_guard
    from mmops.project import ProjectBusyError

    try:
        ctx.with_resource(run_guard(project))
    except ProjectBusyError as exc:
        raise _fail(str(exc)) from None


def _print_stages(stages: dict[str, str]) -> None:
    for stage, status in stages.items():
        console.print(f"  stage {stage:<10} {'[dim]skipped (unchanged)[/]' if status == 'skipped' else 'ran'}")


@app.command()
def run(
    ctx: typer.Context,
    project_dir: ProjectOpt = Path("."),
    bento: Annotated[bool, typer.Option(help="build a bento for the best model")] = True,
    force: Annotated[bool, typer.Option(help="retrain candidates even if nothing they depend on changed")] = False,
    runner: RunnerOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run the retrain flow: DVC data stages, train candidates, evaluate, register, package."""
    project = _project(project_dir)
    _hold_run_lock(ctx, project)
    from mmops import pipeline

    started = time.perf_counter()
    # Checked after the no-op test (plugins import torch: seconds): a config that trained unchanged has
    # nothing new to check, and any change makes up_to_date None before a stage runs.
    if not force and (same := pipeline.up_to_date(project, bento)):
        _print_stages(same["stages"])
        print_leaderboard(same["results"], same["best"], project.params.select_metric)
        console.print(
            f"nothing changed: {same['model_version']} ({same['bento_tag'] or same['model_tag']}) stands; "
            f"--force retrains.  [{time.perf_counter() - started:.1f} s]"
        )
        return
    _check_plugins(project)
    _require_stages(project)  # after the config's own errors, which name the key to fix
    from mmops_flows.retrain import retrain

    config = _runner(project, runner, workers, address)
    console.print(
        f"[bold]retrain[/] flow on {project.root} (registry: {masked_url(project.db_url)}, runner: {config.kind})"
    )
    with epoch_progress(console, project.params.select_metric):
        out = retrain(str(project.root), build_bento=bento, force=force, runner=config.model_dump())
    _print_stages(out["stages"])
    print_leaderboard(out["results"], out["best"], project.params.select_metric)
    console.print(f"best candidate: [bold]{out['best']}[/]   model version: [bold]{out['model_version']}[/]")
    console.print(f"model: {out['model_tag']}   bento: {out['bento_tag']}")
    console.print(f"champion/challenger: {out['promotion']['summary']}", soft_wrap=True)
    console.print(f"report: {out['report']}")
    console.print(f"wall time: {time.perf_counter() - started:.0f} s")
    if out["bento_tag"]:
        console.print(
            f"serve it:  [bold]mmops serve -p {project_dir}[/]  (or BENTOML_HOME={os.environ['BENTOML_HOME']}"
            f" bentoml serve {out['bento_tag']})"
        )


def _require_stages(project: Project) -> None:
    """The flows start with the DVC data stages: a folder DVC cannot run them in fails before the flow
    starts (Prefect would log the failed task's traceback first), saying the fix."""
    try:
        check_stages(project)
    except NotAProjectError as exc:
        raise _fail(str(exc), 2) from None


@app.command("sweep")
def sweep_cmd(
    ctx: typer.Context,
    project_dir: ProjectOpt = Path("."),
    force: Annotated[bool, typer.Option(help="retrain candidates even if unchanged")] = False,
    runner: RunnerOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
) -> None:
    """Train every candidate (listed and swept in params.yaml) as Prefect tasks and rank them on val."""
    project = _project(project_dir)
    _hold_run_lock(ctx, project)
    _check_plugins(project)
    _require_stages(project)
    from mmops_flows import sweep

    started = time.perf_counter()
    config = _runner(project, runner, workers, address)
    console.print(
        f"[bold]sweep[/] of {len(project.params.all_candidates())} candidates on {config.kind} "
        f"({config.address or f'{config.max_workers} local workers'})"
    )
    with epoch_progress(console, project.params.select_metric):
        out = sweep.run_sweep(project, config, force=force)
    _print_stages(out["stages"])
    print_leaderboard(out["results"], out["best"]["candidate"], project.params.select_metric)
    console.print(f"wall time: {time.perf_counter() - started:.0f} s")


def print_modalities(rows: list[dict], select_metric: str) -> None:
    """The ablation's answer in one table: each set of inputs, best on val, with its test figure."""
    if not rows:
        return
    test_metric = "test_" + select_metric.removeprefix("val_")
    table = Table(title="Modalities (best candidate per set of inputs, selected on val)")
    for col in ("inputs", "candidate", select_metric, test_metric):
        table.add_column(col.replace("_", " "), justify="right" if "_" in col else "left")
    for r in rows:
        table.add_row(
            " + ".join(r["inputs"]),
            r["candidate"],
            f"{r[select_metric]:.4f}",
            "-" if r.get(test_metric) is None else f"{r[test_metric]:.4f}",
        )
    console.print(table)


@app.command()
def ablate(
    project_dir: ProjectOpt = Path("."),
    candidate: Annotated[
        str | None, typer.Option(help="the full model to ablate (default: the first candidate)")
    ] = None,
) -> None:
    """Train a candidate on every single input and every leave-one-out subset next to the full model."""
    project = _project(project_dir)
    from mmops import pipeline

    params = project.params
    base = params.candidate(candidate) if candidate else params.all_candidates()[0]
    chosen = [base, *params.ablation_candidates(base)]
    with epoch_progress(console, params.select_metric):
        results = [pipeline.train_one(project, c) for c in chosen]
    best = pipeline.select_best(results, params.select_metric, params.metric_sign(params.select_metric))
    pipeline.write_metrics(project, results, best)
    print_leaderboard(results, best["candidate"], params.select_metric)


@app.command()
def train(
    ctx: typer.Context,
    project_dir: ProjectOpt = Path("."),
    candidate: Annotated[list[str] | None, typer.Option(help="train only these candidates")] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            max=256,
            help="data-parallel processes per candidate (default: train.distributed.processes)",
        ),
    ] = None,
) -> None:
    """Train candidates on the prepared data (no flow), record them, write metrics/."""
    project = _project(project_dir)
    _hold_run_lock(ctx, project)
    from mmops import pipeline

    chosen = [c for c in project.params.candidates if not candidate or c.name in candidate]
    if not chosen:
        raise _fail(f"no candidate named {candidate}; params.yaml has {[c.name for c in project.params.candidates]}")
    if nproc is not None:
        chosen = [
            c.model_copy(
                update={
                    "train": {
                        **c.train,
                        "distributed": {**project.params.train_for(c).distributed.model_dump(), "processes": nproc},
                    }
                }
            )
            for c in chosen
        ]
    with epoch_progress(console, project.params.select_metric):
        results = [pipeline.train_one(project, c) for c in chosen]
    best = pipeline.select_best(
        results, project.params.select_metric, project.params.metric_sign(project.params.select_metric)
    )
    pipeline.write_metrics(project, results, best)
    print_leaderboard(results, best["candidate"], project.params.select_metric)


def _best_result(project: Project) -> dict:
    name = best_candidate(project)
    # pipeline.train_one records the run id and final metrics in result.json itself.
    return {**json.loads((project.models_dir / name / "result.json").read_text()), "status": "completed"}


@app.command()
def evaluate(
    project_dir: ProjectOpt = Path("."),
    candidate: Annotated[str | None, typer.Option(help="candidate to evaluate (default: the best)")] = None,
) -> None:
    """Evaluate a trained candidate on val and test with its task's metrics."""
    project = _project(project_dir)
    from mmops.core.model import load_model
    from mmops.training.loop import Dataset, evaluate_split

    name = candidate or _best_result(project)["candidate"]
    model = load_model(project.models_dir / name)
    data = Dataset.load(project.prepared_dir, project.features_dir, project.params)
    members = getattr(model, "members", None)  # train.ensemble: the averaged models are what is evaluated
    table = Table(title=f"{name} ({model.task_name}" + (f", ensemble of {len(members)})" if members else ")"))
    table.add_column("split")
    rows = {split: evaluate_split(model, data, split, project.params.train.batch_size)[0] for split in ("val", "test")}
    keys = [k for k, v in rows["val"].items() if isinstance(v, float)]
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("by answer type")
    for split, m in rows.items():
        by_type = "  ".join(f"{k} {v:.4f}" for k, v in m.get("by_type", {}).items())
        table.add_row(split, *[f"{m[k]:.4f}" for k in keys], by_type)
    console.print(table)


@app.command()
def report(
    run: Annotated[
        str | None,
        typer.Argument(help="a run id (or its first characters) or a candidate name; default: the best candidate"),
    ] = None,
    project_dir: ProjectOpt = Path("."),
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default: reports/<candidate>.html)")] = None,
) -> None:
    """Write a self-contained HTML report of a run: data, learning curves, errors, calibration, candidates."""
    project = _project(project_dir)
    from mmops.pipeline import write_run_report

    try:
        path = write_run_report(project, run, out)
    except (FileNotFoundError, LookupError) as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"report: {path}")


@app.command()
def package(project_dir: ProjectOpt = Path(".")) -> None:
    """Register the best trained candidate as a model version and build its bento."""
    project = _project(project_dir)
    from mmops import pipeline

    out = pipeline.register_and_package(project, _best_result(project))
    console.print(f"model version {out['model_version']}  model {out['model_tag']}  bento {out['bento_tag']}")


def _latest(project: Project, field: str) -> str:
    from mmops.registry.store import Registry

    versions = [
        v for v in Registry(project.db_url).model_versions(project.params.registry.model_name) if getattr(v, field)
    ]
    if not versions:
        raise _fail("no packaged model yet: run `mmops run` (or `mmops package`) first")
    return getattr(versions[0], field)


def _port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, no such address), or None: checked before
    ``bentoml serve`` starts, which would otherwise die with a raw OSError traceback."""
    import socket

    try:
        with socket.create_server((host, port)):
            return None
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return "the port is already in use" if exc.errno == errno.EADDRINUSE else "permission denied"
        return exc.strerror or str(exc)


@app.command()
def serve(
    project_dir: ProjectOpt = Path("."),
    port: Annotated[int, typer.Option(help="HTTP port")] = 3000,
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    bento: Annotated[str | None, typer.Option(help="bento tag (default: the latest packaged)")] = None,
    gpu: Annotated[bool, typer.Option(help="declare one GPU for the model (needs CUDA; see docs/serving.md)")] = False,
    autocast: Annotated[str, typer.Option(help="mixed precision on the GPU: off, fp16 or bf16")] = "off",
) -> None:
    """Serve the packaged bento over HTTP (`bentoml serve`)."""
    project = _project(project_dir)
    tag = bento or _latest(project, "bento_tag")
    env = dict(os.environ)
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise _fail("--gpu: this torch build sees no CUDA device (install a CUDA build of torch on a GPU host)")
        env.update({"MMOPS_GPU": "1", "MMOPS_DEVICE": "cuda", "MMOPS_AUTOCAST": autocast})
    if problem := _port_taken(host, port):
        raise _fail(f"cannot serve on {host}:{port}: {problem}. Stop whatever holds it or pass --port N", 2)
    console.print(f"serving {tag} on http://{host}:{port}" + (f" (GPU, autocast {autocast})" if gpu else ""))
    cmd = [sys.executable, "-m", "bentoml", "serve", tag, "--host", host, "--port", str(port)]
    raise typer.Exit(run_process_group(cmd, env))


def run_process_group(cmd: list[str], env: dict[str, str] | None = None, grace: float = 30.0) -> int:
    """Run ``cmd`` in a process group of its own and return its exit code; SIGTERM and SIGINT sent to
    this process go to the whole group, which is waited for (SIGKILL after ``grace`` seconds).

    `bentoml serve` starts worker processes of its own: stopping only this process, or only its
    child, left them running and holding the port.
    """
    import contextlib
    import signal

    proc = subprocess.Popen(cmd, env=env, process_group=0)
    received: list[int] = []

    def signal_group(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        signal_group(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = None
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                signal_group(signal.SIGKILL)
        deadline = time.monotonic() + grace
        while True:  # the group outlives its leader while any worker is left
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                signal_group(signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


@app.command()
def predict(
    image: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="image file")] = None,
    question: Annotated[str | None, typer.Option(help="question about the image")] = None,
    field: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="NAME=VALUE for any input; VALUE @path reads a file (image, audio)"),
    ] = None,
    project_dir: ProjectOpt = Path("."),
    model: Annotated[str | None, typer.Option(help="BentoML model tag (default: the latest packaged)")] = None,
    top_k: Annotated[int, typer.Option(min=1)] = 3,
) -> None:
    """Answer one example with the packaged model (e.g. --image x.png --question "what shape?")."""
    project = _project(project_dir)
    import bentoml

    from mmops.serving.predictor import InputError, Predictor

    record: dict[str, object] = {}
    if image is not None:
        record["image"] = image.read_bytes()
    if question is not None:
        record["question"] = question
    for item in field or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise _fail(f"--input {item!r}: write NAME=VALUE", 2)
        if value.startswith("@"):
            try:
                record[name] = Path(value[1:]).read_bytes()
            except OSError as exc:
                raise _fail(f"--input {name}: cannot read {value[1:]}: {exc.strerror}", 2) from None
        else:
            record[name] = value
    tag = model or _latest(project, "model_tag")
    predictor = Predictor(Path(bentoml.models.get(tag).path))
    try:
        result = predictor.predict([record], top_k=top_k)[0]
    except InputError as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"[bold]{result['answer']}[/]  ({tag})")
    for item in result["top_k"]:
        console.print(f"  {item['answer']:<12} {item['probability']:.4f}")


@app.command()
def caption(
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="image files")],
    project_dir: ProjectOpt = Path("."),
    model: Annotated[str | None, typer.Option(help="BentoML model tag (default: the latest packaged)")] = None,
    num_beams: Annotated[int | None, typer.Option(min=1, help="beam size, 1 = greedy (default: the model's)")] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="tokens at most (default: the model's)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Caption images with the packaged captioning model (the same decoding as evaluation and /caption)."""
    project = _project(project_dir)
    import bentoml

    from mmops.serving.predictor import InputError, Predictor

    tag = model or _latest(project, "model_tag")
    predictor = Predictor(Path(bentoml.models.get(tag).path))
    if predictor.model.task_name != "captioning":
        raise _fail(f"{tag} is a {predictor.model.task_name} model, not a captioning one", 2)
    if len(predictor.inputs) != 1:
        raise _fail(f"{tag} takes {sorted(predictor.inputs)}: `mmops predict` answers models of several inputs", 2)
    (field,) = predictor.inputs
    options = {k: v for k, v in (("num_beams", num_beams), ("max_length", max_length)) if v is not None}
    results = []
    try:
        for start in range(0, len(images), predictor.limits.batch_size):
            chunk = images[start : start + predictor.limits.batch_size]
            answers = predictor.predict([{field: p} for p in chunk], options=options)
            results += [
                {"image": str(p), "caption": a["caption"], "score": a["score"]}
                for p, a in zip(chunk, answers, strict=True)
            ]
    except (InputError, ValueError) as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        print_json(results)
        return
    for row in results:
        console.print(f"{row['image']}: [bold]{row['caption']}[/]  ({row['score']:.3f})")


# ---------------------------------------------------------------- plugins and registry


# After the commands that make and serve the models they use, in --help too.
app.command()(adapt)
for _command in (search, embed, zero_shot):  # a contrastive model's towers and gallery index
    app.command(_command.__name__.replace("_", "-"))(_command)


@plugins_app.command("list")
def plugins_list(as_json: JsonOpt = False) -> None:
    """Every installed encoder, fusion and task, with the package that provides it."""
    from mmops.core.plugin_registry import check_all, discover, get_encoder

    rows = []
    for kind in ("encoder", "fusion", "task"):
        status = check_all(kind)
        for name, info in sorted(discover(kind).items()):
            problem = status[name]
            modality = get_encoder(name).modality if kind == "encoder" and not problem else None
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "modality": modality,
                    "package": info.package,
                    "version": info.version,
                    "target": info.target,
                    "error": problem,
                }
            )
    if as_json:
        print_json(rows)
        return
    table = Table()
    for col in ("name", "kind", "modality", "package", "status"):
        table.add_column(col, **(KEEP if col in ("name", "kind", "package") else {}))
    for r in rows:
        table.add_row(
            r["name"],
            r["kind"],
            r["modality"] or "-",
            f"{r['package']} {r['version']}",
            "ok" if not r["error"] else f"[red]{r['error']}[/]",
        )
    print_table(table)


@plugins_app.command("check")
def plugins_check(
    name: Annotated[str, typer.Argument(help="encoder, fusion or task name, as in `mmops plugins list`")],
    kind: Annotated[str | None, typer.Option(help="encoder, fusion or task, when a name is more than one")] = None,
    params: Annotated[str, typer.Option(help='constructor parameters as JSON, e.g. \'{"checkpoint": "dir"}\'')] = "{}",
    learn: Annotated[bool, typer.Option(help="fusions: also check it learns a XOR of two inputs (seconds)")] = True,
) -> None:
    """Conformance run on random inputs: shapes, gradients, determinism, save/load, bad inputs; a fusion
    must also learn a XOR of two inputs."""
    from mmops.core.conformance import check_plugin

    if kind not in (None, "encoder", "fusion", "task"):
        raise _fail(f"--kind must be encoder, fusion or task, got '{kind}'", 2)
    try:
        parsed = json.loads(params)
    except json.JSONDecodeError as exc:
        raise _fail(f"--params is not valid JSON: {exc}", 2) from None
    if not isinstance(parsed, dict):
        raise _fail("--params must be a JSON object", 2)
    checks = check_plugin(name, kind, parsed, learn=learn)
    for c in checks:
        mark = "[green]PASS[/]" if c.passed else "[red]FAIL[/]"
        console.print(f"{mark} {c.name}" + (f"  [dim]{c.detail}[/]" if c.detail else ""), highlight=False)
    failed = sum(not c.passed for c in checks)
    console.print(f"{name}: {len(checks) - failed} passed, {failed} failed")
    if failed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
