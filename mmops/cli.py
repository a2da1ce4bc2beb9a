"""``mmops``: one command line over the same functions the flow uses.

Heavy libraries (torch, Prefect, DVC, BentoML) are imported inside commands so that ``--help`` and
quick commands stay instant, and so the environment is configured before Prefect reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mmops.cli_registry import db_app, lineage, models_app, runs_app, schedule_app, worker
from mmops.config import ConfigError
from mmops.project import Project, configure_environment

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False, help=__doc__.splitlines()[0]
)
data_app = typer.Typer(no_args_is_help=True, help="Import, validate and featurize data (the DVC stages).")
plugins_app = typer.Typer(no_args_is_help=True, help="Encoders and fusions installed through entry points.")
app.add_typer(data_app, name="data")
app.add_typer(plugins_app, name="plugins")
app.add_typer(runs_app, name="runs", rich_help_panel="Registry and lifecycle")
app.add_typer(models_app, name="models", rich_help_panel="Registry and lifecycle")
app.command(rich_help_panel="Registry and lifecycle")(lineage)
app.add_typer(db_app, name="db", rich_help_panel="Registry and lifecycle")
app.add_typer(schedule_app, name="schedule", rich_help_panel="Registry and lifecycle")
app.command(rich_help_panel="Registry and lifecycle")(worker)

console = Console()
err = Console(stderr=True)

ProjectOpt = Annotated[
    Path, typer.Option("--project", "-p", envvar="MMOPS_PROJECT", help="project directory (holds params.yaml)")
]


def _project(path: Path) -> Project:
    project = Project.at(path)
    configure_environment(project)
    try:
        project.params  # noqa: B018 - fail early, with the offending key, on a malformed config
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    return project


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


# ---------------------------------------------------------------- data


@data_app.command("import")
def data_import(
    source: Annotated[str, typer.Argument(help="dataset to import: easy-vqa")],
    project_dir: ProjectOpt = Path("."),
    limit: Annotated[int | None, typer.Option(help="questions kept per split (default: params data.limit)")] = None,
) -> None:
    """Write the manifest (one row per example) and its files under data/raw/."""
    project = _project(project_dir)
    if source != "easy-vqa":
        raise _fail(f"unknown source '{source}'; available: easy-vqa")
    from mmops.data.easyvqa import import_easy_vqa

    manifest = import_easy_vqa(project.raw_dir, project.params.data.limit if limit is None else limit)
    console.print(f"wrote {manifest.relative_to(project.root)}")


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

    for name, info in featurize(project.prepared_dir, project.features_dir, project.params).items():
        console.print(f"{name}: {info['distinct']} distinct values -> {info['dim']}-d features ({info['encoder']}); "
                      f"cache {info['key']}: {info['computed']} computed, {info['reused']} reused")


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
    console.print(f"appended {out['rows']} rows {out['splits']} and {out['files']} files as "
                  f"{out['path'].relative_to(project.root)}; the next run re-prepares and re-featurizes")
    if out["rows_with_missing_files"]:
        err.print(f"[yellow]{out['rows_with_missing_files']} rows refer to files missing under {file.parent}[/]: "
                  "prepare will quarantine them")


# ---------------------------------------------------------------- pipeline


def print_leaderboard(results: list[dict], best: str | None = None) -> None:
    table = Table(title="Leaderboard (selected on val; test is reported, never used to select)")
    for col in ("candidate", "fusion", "val acc", "val F1", "test acc", "train time", "status"):
        table.add_column(col, justify="right" if "acc" in col or "F1" in col or "time" in col else "left")
    for r in results:
        ok = r.get("status") == "completed"
        f = r.get("final", {})
        table.add_row(
            ("* " if r["candidate"] == best else "") + r["candidate"], r.get("fusion") or "",
            f"{f['val_accuracy']:.4f}" if ok else "-", f"{f['val_macro_f1']:.4f}" if ok else "-",
            f"{f['test_accuracy']:.4f}" if ok else "-",
            f"{r['train_seconds']:.0f} s" if ok else "-",
            "ok" if ok else f"[red]failed[/]: {r.get('error', '')[:60]}",
        )
    console.print(table)


RunnerOpt = Annotated[str | None, typer.Option("--runner", help="threads | dask | ray (default: params runner.kind)")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", min=1, help="candidates trained at once")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="existing cluster, e.g. tcp://host:8786")]


def _runner(project: Project, kind: str | None, workers: int | None, address: str | None):
    from mmops.config import RunnerConfig

    update = {k: v for k, v in {"kind": kind, "max_workers": workers, "address": address}.items() if v is not None}
    try:
        return RunnerConfig.model_validate({**project.params.runner.model_dump(), **update})
    except ValueError as exc:
        raise _fail(f"bad runner options: {exc}", 2) from None


def _print_stages(stages: dict[str, str]) -> None:
    for stage, status in stages.items():
        console.print(f"  stage {stage:<10} {'[dim]skipped (unchanged)[/]' if status == 'skipped' else 'ran'}")


@app.command()
def run(
    project_dir: ProjectOpt = Path("."),
    bento: Annotated[bool, typer.Option(help="build a bento for the best model")] = True,
    force: Annotated[bool, typer.Option(help="retrain candidates even if nothing they depend on changed")] = False,
    runner: RunnerOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run the retrain flow: DVC data stages, train candidates, evaluate, register, package."""
    project = _project(project_dir)
    from mmops import pipeline

    started = time.perf_counter()
    if not force and (same := pipeline.up_to_date(project, bento)):
        _print_stages(same["stages"])
        print_leaderboard(same["results"], same["best"])
        console.print(f"nothing changed: {same['model_version']} ({same['bento_tag'] or same['model_tag']}) stands; "
                      f"--force retrains.  [{time.perf_counter() - started:.1f} s]")
        return
    from mmops_flows.retrain import retrain

    config = _runner(project, runner, workers, address)
    console.print(f"[bold]retrain[/] flow on {project.root} (registry: {project.db_url}, runner: {config.kind})")
    out = retrain(str(project.root), build_bento=bento, force=force, runner=config.model_dump())
    _print_stages(out["stages"])
    print_leaderboard(out["results"], out["best"])
    console.print(f"best candidate: [bold]{out['best']}[/]   model version: [bold]{out['model_version']}[/]")
    console.print(f"model: {out['model_tag']}   bento: {out['bento_tag']}")
    console.print(f"champion/challenger: {out['promotion']['summary']}", soft_wrap=True)
    console.print(f"wall time: {time.perf_counter() - started:.0f} s")
    if out["bento_tag"]:
        console.print(f"serve it:  [bold]mmops serve -p {project_dir}[/]  (or BENTOML_HOME={os.environ['BENTOML_HOME']}"
                      f" bentoml serve {out['bento_tag']})")


@app.command("sweep")
def sweep_cmd(
    project_dir: ProjectOpt = Path("."),
    force: Annotated[bool, typer.Option(help="retrain candidates even if unchanged")] = False,
    runner: RunnerOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
) -> None:
    """Train every candidate (listed and swept in params.yaml) as Prefect tasks and rank them on val."""
    project = _project(project_dir)
    from mmops_flows import sweep

    started = time.perf_counter()
    config = _runner(project, runner, workers, address)
    console.print(f"[bold]sweep[/] of {len(project.params.all_candidates())} candidates on {config.kind} "
                  f"({config.address or f'{config.max_workers} local workers'})")
    out = sweep.sweep.with_options(task_runner=sweep.task_runner(config))(str(project.root), force=force)
    _print_stages(out["stages"])
    print_leaderboard(out["results"], out["best"]["candidate"])
    console.print(f"wall time: {time.perf_counter() - started:.0f} s")


@app.command()
def train(
    project_dir: ProjectOpt = Path("."),
    candidate: Annotated[list[str] | None, typer.Option(help="train only these candidates")] = None,
) -> None:
    """Train candidates on the prepared data (no flow), record them, write metrics/."""
    project = _project(project_dir)
    from mmops import pipeline

    chosen = [c for c in project.params.candidates if not candidate or c.name in candidate]
    if not chosen:
        raise _fail(f"no candidate named {candidate}; params.yaml has {[c.name for c in project.params.candidates]}")
    results = [pipeline.train_one(project, c) for c in chosen]
    best = pipeline.select_best(results, project.params.select_metric)
    pipeline.write_metrics(project, results, best)
    print_leaderboard(results, best["candidate"])


def _best_result(project: Project) -> dict:
    board = project.metrics_dir / "best.json"
    if not board.is_file():
        raise _fail("no trained candidates yet: run `mmops train` or `mmops run` first")
    name = json.loads(board.read_text())["best"]
    # pipeline.train_one records the run id and final metrics in result.json itself.
    return {**json.loads((project.models_dir / name / "result.json").read_text()), "status": "completed"}


@app.command()
def evaluate(
    project_dir: ProjectOpt = Path("."),
    candidate: Annotated[str | None, typer.Option(help="candidate to evaluate (default: the best)")] = None,
) -> None:
    """Evaluate a trained candidate on val and test: accuracy, macro-F1, per answer type."""
    project = _project(project_dir)
    from mmops.model import MultimodalModel
    from mmops.train import Dataset, evaluate_split

    name = candidate or _best_result(project)["candidate"]
    model = MultimodalModel.load(project.models_dir / name)
    data = Dataset.load(project.prepared_dir, project.features_dir, project.params)
    table = Table(title=f"{name}")
    for col in ("split", "accuracy", "macro F1", "by answer type"):
        table.add_column(col)
    for split in ("val", "test"):
        m = evaluate_split(model, data, split, project.params.train.batch_size)
        by_type = "  ".join(f"{k} {v:.4f}" for k, v in m.get("by_type", {}).items())
        table.add_row(split, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", by_type)
    console.print(table)


@app.command()
def package(project_dir: ProjectOpt = Path(".")) -> None:
    """Register the best trained candidate as a model version and build its bento."""
    project = _project(project_dir)
    from mmops import pipeline

    out = pipeline.register_and_package(project, _best_result(project))
    console.print(f"model version {out['model_version']}  model {out['model_tag']}  bento {out['bento_tag']}")


def _latest(project: Project, field: str) -> str:
    from mmops.registry import Registry

    versions = [v for v in Registry(project.db_url).model_versions(project.params.registry.model_name)
                if getattr(v, field)]
    if not versions:
        raise _fail("no packaged model yet: run `mmops run` (or `mmops package`) first")
    return getattr(versions[0], field)


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
    console.print(f"serving {tag} on http://{host}:{port}" + (f" (GPU, autocast {autocast})" if gpu else ""))
    cmd = [sys.executable, "-m", "bentoml", "serve", tag, "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd, env=env))


@app.command()
def predict(
    image: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="image file")],
    question: Annotated[str, typer.Option(help="question about the image")],
    project_dir: ProjectOpt = Path("."),
    model: Annotated[str | None, typer.Option(help="BentoML model tag (default: the latest packaged)")] = None,
    top_k: Annotated[int, typer.Option(min=1)] = 3,
) -> None:
    """Answer a question about an image with the packaged model."""
    project = _project(project_dir)
    import bentoml

    from mmops.serving.predictor import InputError, Predictor

    tag = model or _latest(project, "model_tag")
    predictor = Predictor(Path(bentoml.models.get(tag).path))
    try:
        result = predictor.predict([{"image": image.read_bytes(), "question": question}], top_k=top_k)[0]
    except InputError as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"[bold]{result['answer']}[/]  ({tag})")
    for item in result["top_k"]:
        console.print(f"  {item['answer']:<12} {item['probability']:.4f}")


# ---------------------------------------------------------------- plugins and registry


@plugins_app.command("list")
def plugins_list() -> None:
    """Every installed encoder and fusion, with the package that provides it."""
    from mmops.plugin_registry import check_all, discover, get_encoder

    table = Table()
    for col in ("name", "kind", "modality", "package", "status"):
        table.add_column(col)
    for kind in ("encoder", "fusion"):
        status = check_all(kind)
        for name, info in sorted(discover(kind).items()):
            problem = status[name]
            modality = get_encoder(name).modality if kind == "encoder" and not problem else "-"
            table.add_row(name, kind, modality, info.origin, "ok" if not problem else f"[red]{problem}[/]")
    console.print(table)


@plugins_app.command("check")
def plugins_check(
    name: Annotated[str, typer.Argument(help="encoder or fusion name, as in `mmops plugins list`")],
    kind: Annotated[str | None, typer.Option(help="encoder or fusion, when a name is both")] = None,
    params: Annotated[str, typer.Option(help='constructor parameters as JSON, e.g. \'{"checkpoint": "dir"}\'')] = "{}",
) -> None:
    """Conformance run on random inputs: shapes, gradients, determinism, save/load, bad inputs."""
    from mmops.conformance import check_plugin

    if kind not in (None, "encoder", "fusion"):
        raise _fail(f"--kind must be 'encoder' or 'fusion', got '{kind}'", 2)
    try:
        parsed = json.loads(params)
    except json.JSONDecodeError as exc:
        raise _fail(f"--params is not valid JSON: {exc}", 2) from None
    if not isinstance(parsed, dict):
        raise _fail("--params must be a JSON object", 2)
    checks = check_plugin(name, kind, parsed)
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
