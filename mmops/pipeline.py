"""The steps of a run as plain functions: the Prefect flow and the CLI are thin layers over these.

Nothing here imports Prefect, so every step can be called, tested and debugged on its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mmops.config import CandidateConfig
from mmops.project import Project, atomic_write, check_stages, remove_stale_temp_files, run_lock
from mmops.registry.store import Registry

DATA_STAGES = ("import", "prepare", "featurize")
# Who hears about every epoch trained in this process (`mmops run` draws progress); None costs nothing.
_progress: Callable[..., None] | None = None


@contextlib.contextmanager
def progress_to(listener: Callable[..., None]) -> Iterator[Callable[..., None]]:
    """Send ``listener(event, candidate, **fields)`` for every candidate trained in this process (threads too):
    ``start`` (epochs), ``epoch`` (record: epoch, train_loss, val_*, seconds) and ``end``
    (status, reused, error). Candidates on a Dask cluster train in other processes and send nothing."""
    global _progress
    previous, _progress = _progress, listener
    try:
        yield listener
    finally:
        _progress = previous


def _notify(event: str, name: str, **fields: Any) -> None:
    if (listener := _progress) is not None:
        try:
            listener(event, name, **fields)
        except Exception:  # a broken display must never fail a training run
            logging.getLogger(__name__).warning("progress display failed on %s of %s", event, name, exc_info=True)


def _dvc_env() -> None:
    # DVC runs stage commands through a shell: make this interpreter's `mmops` the one it finds.
    bindir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def run_stages(project: Project, stages: tuple[str, ...] = DATA_STAGES) -> dict[str, str]:
    """``dvc repro`` of the data stages; reports each as ``ran`` or ``skipped`` (unchanged)."""
    from dvc.repo import Repo

    from mmops.data.featurize import lacks_sequences

    check_stages(project)
    _dvc_env()
    # prepare depends on data/appended; DVC refuses a missing dependency, so an empty one must exist.
    project.appended_dir.mkdir(parents=True, exist_ok=True)
    # DVC prints its own progress; don't let it reach the root handler a second time (Prefect's).
    logging.getLogger("dvc").propagate = False
    _quiet_known_notices(project)
    outcome = {}
    with Repo(str(project.root)) as repo:
        # "To track the changes with git, run: git add dvc.lock ..." after every stage of every run is
        # noise here: dvc.lock is versioned by the user's own commits, and the registry records it.
        repo.scm_context.quiet = True
        for stage in stages:
            changed = bool(repo.status(targets=[stage]))
            # Features without the token sequences a candidate's fusion now attends over: run it again.
            force = stage == "featurize" and not changed and lacks_sequences(project.features_dir, project.params)
            changed = changed or force
            # run_cache=False: an unchanged stage is skipped, a changed one really runs (never restored
            # silently from a cache that may hold another machine's outputs).
            repo.reproduce(targets=stage, single_item=True, run_cache=False, force=force)
            outcome[stage] = "ran" if changed else "skipped"
    return outcome


def _mark_running(project: Project, run_id: str) -> Path:
    """A file per registry run in progress: a run that finds one left behind knows its process died."""
    folder = project.state_dir / "running"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    return atomic_write(folder / f"{run_id}.json", json.dumps(info))


@contextlib.contextmanager
def run_guard(project: Project, wait: bool = False) -> Iterator[None]:
    """Hold the project's run lock; the outermost holder first cleans up after a run that was killed:
    its registry runs still ``running`` become ``aborted`` with the reason, its temporary files go."""
    with run_lock(project, wait=wait) as outermost:
        if outermost:
            recover_interrupted(project)
        yield


def recover_interrupted(project: Project) -> list[str]:
    """Call holding the run lock: every marker left in ``.mmops/running`` belongs to a dead process."""
    folder = project.state_dir / "running"
    markers = sorted(folder.glob("*.json")) if folder.is_dir() else []
    orphans: dict[str, dict] = {}
    for marker in markers:
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {"run_id": marker.stem}
        if info.get("host") == socket.gethostname() and info.get("pid") != os.getpid() and _alive(info.get("pid")):
            continue  # a live process on this host still owns it (a run outside the lock)
        orphans[info.get("run_id", marker.stem)] = info
    aborted = []
    if orphans:
        registry = Registry(project.db_url)
        for run_id, info in orphans.items():
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
            aborted += registry.mark_aborted(
                [run_id],
                f"aborted: the process running it (pid {info.get('pid', '?')} "
                f"on {info.get('host', '?')}, started {when}) ended without "
                "finishing it (killed?); found by the next run",
            )
        for marker in markers:
            if marker.stem in orphans:
                marker.unlink(missing_ok=True)
    remove_stale_temp_files(
        project.models_dir, project.metrics_dir, project.root / "data" / "feature-cache", project.state_dir / "running"
    )
    return aborted


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _DropEmptyAppended(logging.Filter):
    """DVC warns "'data/appended' is empty." on every run until the first ``mmops data append``; mmops
    creates that folder empty on purpose (a missing dependency would fail the stage)."""

    def __init__(self, appended: Path) -> None:
        super().__init__()
        self.appended = appended

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "'%s' is empty." or not record.args:
            return True
        arg = record.args[0] if isinstance(record.args, tuple) else record.args
        return Path(str(arg)).name != self.appended.name


def _drop_cuda_fallback(record: logging.LogRecord) -> bool:
    """BentoML warns on every build that ``docker.cuda_version`` makes it use its v1 image format: that
    fallback is what keeps the CUDA image for ``bentoml containerize``, so the warning says nothing new."""
    return not str(record.msg).startswith("docker.cuda_version is not supported by bento v2")


def _quiet_known_notices(project: Project) -> None:
    """Drop the library notices that repeated on every run and need no action; once per process."""
    dvc = logging.getLogger("dvc.output")
    if not any(isinstance(f, _DropEmptyAppended) for f in dvc.filters):
        dvc.addFilter(_DropEmptyAppended(project.appended_dir))
    build = logging.getLogger("bentoml.build")
    if _drop_cuda_fallback not in build.filters:
        build.addFilter(_drop_cuda_fallback)


def data_version(project: Project) -> dict[str, str]:
    """The DVC hashes of every stage output, from ``dvc.lock``: what exactly the model was trained on."""
    lock = project.root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        f"{stage}:{out['path']}": out.get("md5", "") for stage, body in stages.items() for out in body.get("outs", [])
    }


TRANSIENT = (ConnectionError, TimeoutError, BrokenPipeError)


def candidate_code(project: Project, candidate: CandidateConfig) -> dict[str, str]:
    """``{"<package> <version>": hash of its installed code}`` for mmops and every distribution that
    provides one of the candidate's plugins (its encoders, its fusion, the target's task).

    Versions alone miss an edited fusion or training loop (an editable install keeps its version), so
    reuse keys on the code itself."""
    from mmops.core.provenance import code_versions

    params = project.params
    plugins = [("encoder", i.encoder) for i in params.inputs.values()]
    plugins += [("fusion", candidate.fusion), ("task", params.target.type)]
    return code_versions(plugins)


def fingerprint(project: Project, candidate: CandidateConfig) -> str:
    """What a candidate's result depends on: its config, the inputs, the target, the seed, the data,
    the code of mmops and of every plugin package it uses."""
    import mmops

    params = project.params
    data = {k: v for k, v in data_version(project).items() if k.startswith(("prepare:", "featurize:"))}
    payload = {
        "candidate": candidate.model_dump(),
        "train": params.train_for(candidate).model_dump(exclude={"threads"}),
        "inputs": {k: v.model_dump() for k, v in params.inputs.items()},
        "seed": params.seed,
        "target": params.target.model_dump(),
        "data": data,
        "mmops": mmops.__version__,
        "code": candidate_code(project, candidate),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reusable_result(project: Project, candidate: CandidateConfig) -> dict | None:
    """The last completed result of this candidate, if nothing it depends on changed since."""
    path = project.models_dir / candidate.name / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable: retrain rather than trust it
        return None
    if result.get("fingerprint") != fingerprint(project, candidate) or "run_id" not in result:
        return None
    return result


def resolve_artifact(project: Project, ref: str) -> Path:
    """An ``init_from`` artifact folder from a path, or from a registered model version ``NAME:VERSION``.

    Resolved here, above the model, and handed down: model code never reaches into the registry.
    """
    if Path(ref).is_dir():
        return Path(ref)
    name, _, version = ref.partition(":")
    if not version.isdigit():
        raise ValueError(f"init_from '{ref}': give an artifact folder or a registered model version NAME:VERSION")
    tag = Registry(project.db_url).get_version(name, int(version)).model_tag
    if not tag:
        raise ValueError(f"init_from '{ref}': that model version was never saved to the model store")
    import bentoml

    return Path(bentoml.models.get(tag).path)


def train_one(
    project: Project, candidate: CandidateConfig, flow_run_id: str | None = None, threads: int = 0, force: bool = False
) -> dict:
    """Train, evaluate and record one candidate; a failure is recorded, returned, never raised.

    A candidate whose fingerprint is unchanged since its last completed run is not retrained: its
    run is reused (``force`` retrains anyway). Transient errors (a lost connection) are re-raised
    after recording, so the orchestrator can retry them.
    """
    if not force and (previous := reusable_result(project, candidate)):
        _notify("end", candidate.name, status="completed", reused=True)
        return {**previous, "status": "completed", "reused": True}
    if threads:
        import torch

        torch.set_num_threads(threads)
    params = project.params
    registry = Registry(project.db_url)
    run_id = registry.start_run(
        name=candidate.name,
        config={
            "candidate": candidate.model_dump(),
            "train": params.train_for(candidate).model_dump(),
            "inputs": {k: v.model_dump() for k, v in params.inputs.items()},
            "data": params.data.model_dump(),
            "code": candidate_code(project, candidate),
            "runtime": runtime(params.train_for(candidate)),
        },
        seed=params.seed,
        data_version=data_version(project),
        git_commit=project.git_commit(),
        flow_run_id=flow_run_id,
    )
    marker = _mark_running(project, run_id)
    try:
        return _train_recorded(project, candidate, registry, run_id)
    except BaseException as exc:  # Ctrl-C, or an error while recording: the run did not finish
        with contextlib.suppress(Exception):
            registry.mark_aborted([run_id], f"aborted: interrupted by {type(exc).__name__}")
        raise
    finally:
        marker.unlink(missing_ok=True)


def runtime(train: Any) -> dict[str, Any]:
    """Where and how the run trains, as its registry run records it: the device resolved on this machine
    (``MMOPS_DEVICE`` or ``train.device``), the precision, the data-parallel processes. A device this
    machine lacks is recorded as asked; training then fails with the reason."""
    from mmops.core.devices import DeviceError, describe, resolve_device

    try:
        device = describe(resolve_device(train.device))
    except DeviceError:
        device = f"{train.device} (unavailable)"
    return {"device": device, "precision": train.precision, "processes": train.distributed.processes}


def _train_recorded(project: Project, candidate: CandidateConfig, registry: Registry, run_id: str) -> dict:
    from mmops.core.model import MEMBERS_DIR
    from mmops.training.loop import Dataset, train_candidate

    params = project.params
    started = time.perf_counter()

    def on_epoch(_: str, record: dict) -> None:
        registry.log_metrics(
            run_id, {k: v for k, v in record.items() if k == "train_loss" or k.startswith("val_")}, step=record["epoch"]
        )
        _notify("epoch", candidate.name, record=record)

    train = params.train_for(candidate)
    out_dir = project.models_dir / candidate.name
    _notify("start", candidate.name, epochs=train.epochs)
    try:
        _forget_ensemble(out_dir)  # a retrain replaces the artifact: an earlier run's members must not linger
        resolve = functools.partial(resolve_artifact, project)
        data = None
        if (processes := train.distributed.processes) > 1:
            from mmops.training.distributed import train_parallel

            result = train_parallel(
                params,
                candidate,
                project.prepared_dir,
                project.features_dir,
                out_dir,
                processes,
                on_epoch,
                resolve,
            )
        else:
            data = Dataset.load(project.prepared_dir, project.features_dir, params, use_cache=train.feature_cache)
            result = train_candidate(params, candidate, data, out_dir, resolve=resolve, on_epoch=on_epoch)

        def train_seed(seeded: Any, folder: Path) -> dict:
            if processes > 1:  # each seed data-parallel too
                return train_parallel(
                    seeded, candidate, project.prepared_dir, project.features_dir, folder, processes, None, resolve
                )
            return train_candidate(seeded, candidate, data, folder, resolve=resolve)

        more = []
        for k in range(1, train.seeds):  # the other seeds: their figures, and with ensemble their models
            seeded = params.model_copy(update={"seed": params.seed + k})
            if train.ensemble:
                more.append(train_seed(seeded, out_dir / MEMBERS_DIR / str(seeded.seed)))
                continue
            with tempfile.TemporaryDirectory(dir=project.state_dir) as tmp:
                more.append(train_seed(seeded, Path(tmp)))
        over_seeds = seed_summary([result, *more])  # each seed's own model's figures
        if train.ensemble:
            result = _evaluate_ensemble(project, candidate, result, more, data)
    except Exception as exc:  # one bad candidate must not sink the sweep
        registry.finish_run(
            run_id, "failed", time.perf_counter() - started, error="".join(traceback.format_exception_only(exc)).strip()
        )
        _notify("end", candidate.name, status="failed", error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, TRANSIENT):
            raise
        return {
            "candidate": candidate.name,
            "fusion": candidate.fusion,
            "status": "failed",
            "inputs": candidate.input_names(list(params.inputs)),
            "error": f"{type(exc).__name__}: {exc}",
            "run_id": run_id,
        }
    final, final_std, seeds = over_seeds
    if train.ensemble:  # the served model's own figures rank it; its members' mean ± std stay beside them
        ensemble = {"members": len(seeds), "mean": final, "std": final_std}
        final = flat_metrics(result["metrics"])
        registry.log_metrics(
            run_id,
            {
                **final,
                **{f"members_{k}": v for k, v in ensemble["mean"].items()},
                **{f"members_{k}_std": v for k, v in ensemble["std"].items()},
            },
        )
    else:
        registry.log_metrics(run_id, {**final, **{f"{k}_std": v for k, v in final_std.items()}})
    registry.finish_run(run_id, "completed", time.perf_counter() - started, artifact=result["model_dir"])
    done = {
        **result,
        "run_id": run_id,
        "final": final,
        "fingerprint": fingerprint(project, candidate),
        **({"seeds": seeds} if more else {}),
        **({"ensemble": ensemble} if train.ensemble else {"final_std": final_std} if more else {}),
    }
    # result.json is what makes a trained candidate reusable: written whole or not at all.
    atomic_write(Path(result["model_dir"]) / "result.json", json.dumps(done, indent=2))
    _notify("end", candidate.name, status="completed")
    return {**done, "status": "completed", "reused": False}


def _forget_ensemble(model_dir: Path) -> None:
    """Remove an earlier run's ensemble record and members from a candidate's folder."""
    from mmops.core.model import ENSEMBLE_FILE, MEMBERS_DIR

    (model_dir / ENSEMBLE_FILE).unlink(missing_ok=True)
    shutil.rmtree(model_dir / MEMBERS_DIR, ignore_errors=True)


def _evaluate_ensemble(project: Project, candidate: CandidateConfig, first: dict, more: list[dict], data: Any) -> dict:
    """Record the candidate's folder as the ensemble of its seeds' models (``train.ensemble``) and evaluate
    that ensemble, which is what is served: its val/test metrics and test predictions replace the first
    seed's in the result and in the folder (that seed's own figures stay in the per-seed rows)."""
    from mmops.core.devices import resolve_device
    from mmops.core.model import load_model, write_ensemble
    from mmops.training.loop import Dataset, evaluate_and_record

    params, out_dir = project.params, Path(first["model_dir"])
    train = params.train_for(candidate)
    write_ensemble(out_dir, [(r["seed"], Path(r["model_dir"])) for r in (first, *more)])
    if data is None:  # data-parallel training loaded its data in each rank
        data = Dataset.load(project.prepared_dir, project.features_dir, params, use_cache=train.feature_cache)
    model = load_model(out_dir).to(resolve_device(train.device))
    metrics = evaluate_and_record(model, data, out_dir, train.batch_size)
    return {**first, "metrics": metrics}


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``{"val": {"accuracy": x}}`` to ``{"val_accuracy": x}``: every scalar val/test metric."""
    return {
        f"{split}_{key}": value for split, m in metrics.items() for key, value in m.items() if isinstance(value, float)
    }


def seed_summary(results: list[dict]) -> tuple[dict[str, float], dict[str, float], list[dict]]:
    """Mean and sample standard deviation over seeds of every scalar val/test metric, and each seed's own.

    One seed's result ranks luck (10 points between two seeds of one candidate were measured on a
    speaker-disjoint task); with ``train.seeds`` the mean is what selection and the registry see (with
    ``train.ensemble``, the ensemble's own figures instead: this mean is its members')."""
    per_seed = [flat_metrics(r["metrics"]) for r in results]
    keys = [k for k in per_seed[0] if all(k in s for s in per_seed)]
    final = {k: float(np.mean([s[k] for s in per_seed])) for k in keys}
    std = {k: float(np.std([s[k] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0 for k in keys}
    # Per-seed rows only where there are several seeds: one run's figures are already ``final``.
    seeds = (
        [{"seed": r["seed"], "best_epoch": r["best_epoch"], **s} for r, s in zip(results, per_seed, strict=True)]
        if len(results) > 1
        else []
    )
    return final, std, seeds


def select_best(results: list[dict], metric: str, sign: float) -> dict:
    """The best completed candidate by a validation metric (``sign`` -1: lower is better). Test metrics
    are never consulted."""
    if not metric.startswith("val_"):
        raise ValueError(f"selection must use a validation metric, got '{metric}'")
    done = [r for r in results if r.get("status") == "completed"]
    if not done:
        errors = "; ".join(f"{r['candidate']}: {r.get('error')}" for r in results)
        raise RuntimeError(f"every candidate failed: {errors}")
    # Ties on val are common (two fusions reach the same accuracy on a small split): they go to the smaller
    # model, then to the first name, never to wall time, which varies run to run.
    return min(done, key=lambda r: (-sign * r["final"][metric], model_size(r), r["candidate"]))


TIE_BREAK = "ties on val go to fewer parameters (the weights the artifact stores), then to the candidate name"


def model_size(result: dict) -> float:
    """Parameters a trained candidate's artifact stores (``model.safetensors``, of every member of an
    ensemble), read from the files' headers alone; infinite when there is no artifact to read."""
    folder = Path(result.get("model_dir") or "")
    if not result.get("model_dir") or not (folder / "model.safetensors").is_file():
        return math.inf
    # mmops.core.model.ENSEMBLE_FILE, named here: importing that module loads torch, which selection avoids.
    record_file = folder / "ensemble.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    total = 0
    for member in record.get("members") or [{"path": "."}]:
        with (folder / member["path"] / "model.safetensors").open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def write_metrics(project: Project, results: list[dict], best: dict) -> None:
    """DVC metrics (``metrics/*.json``) and plots (confusion matrix, learning curves)."""
    out = project.metrics_dir
    (out / "history").mkdir(parents=True, exist_ok=True)
    done = [r for r in results if r.get("status") == "completed"]
    keys = [f"{split}_{m}" for split in ("val", "test") for m in project.params.task_metrics]
    leaderboard = [
        {
            "candidate": r["candidate"],
            "fusion": r.get("fusion"),
            "inputs": r.get("inputs"),
            "status": r["status"],
            **({k: r["final"].get(k) for k in keys} if r["status"] == "completed" else {"error": r.get("error")}),
            **({f"{k}_std": r["final_std"].get(k) for k in keys} if r.get("final_std") else {}),
            **({"seeds": len(r["seeds"])} if r.get("seeds") else {}),
            # train.ensemble: the figures above are the ensemble's own; its members' mean ± std beside them
            **(
                {
                    "ensemble": r["ensemble"]["members"],
                    **{f"members_{k}": r["ensemble"]["mean"].get(k) for k in keys},
                    **{f"members_{k}_std": r["ensemble"]["std"].get(k) for k in keys},
                }
                if r.get("ensemble")
                else {}
            ),
            "train_seconds": r.get("train_seconds"),
            "run_id": r.get("run_id"),
            **({"params": int(n) if (n := model_size(r)) != math.inf else None} if r["status"] == "completed" else {}),
        }
        for r in results
    ]
    atomic_write(out / "leaderboard.json", json.dumps(leaderboard, indent=2))
    params = project.params
    modalities = modality_table(
        results, params.select_metric, params.metric_sign(params.select_metric), list(params.inputs)
    )
    if modalities:
        atomic_write(out / "modalities.json", json.dumps(modalities, indent=2))
    summary = {
        "best": best["candidate"],
        "selected_by": project.params.select_metric,
        "ties": TIE_BREAK,
        "val": _scalars(best["metrics"]["val"]),
        "test": _scalars(best["metrics"]["test"]),
    }
    if best.get("ensemble"):  # val/test above are the ensemble's own (what is served); seeds: its members'
        members = best["ensemble"]
        summary["ensemble"] = {"members": members["members"], "seeds": [s["seed"] for s in best["seeds"]]}
        summary["seeds"] = {"n": members["members"], "mean": members["mean"], "std": members["std"]}
    elif best.get("seeds"):  # the artifact is the first seed's model; selection used the mean over seeds
        summary["seeds"] = {"n": len(best["seeds"]), "mean": best["final"], "std": best["final_std"]}
    atomic_write(out / "best.json", json.dumps(summary, indent=2))
    # DVC plots: the confusion matrix (classification), calibration bins, and learning curves.
    labels = json.loads((project.prepared_dir / "labels.json").read_text())
    test = best["metrics"]["test"]
    pairs = [
        {"actual": labels[i], "predicted": labels[j]}
        for i, row in enumerate(test.get("confusion", []))
        for j, n in enumerate(row)
        for _ in range(n)
    ]
    atomic_write(out / "confusion.json", json.dumps(pairs))
    atomic_write(out / "calibration.json", json.dumps(test.get("calibration", [])))
    metric = project.params.select_metric
    for r in done:
        lines = [f"epoch,train_loss,{metric}"] + [
            f"{h['epoch']},{h['train_loss']:.6f},{h[metric]:.6f}" for h in r["history"]
        ]
        atomic_write(out / "history" / f"{r['candidate']}.csv", "\n".join(lines) + "\n")


def modality_table(results: list[dict], select_metric: str, sign: float, all_inputs: list[str]) -> list[dict]:
    """Per set of inputs, its best completed candidate on val, with its test figure: does fusion beat
    the best single modality, and what does leaving each input out cost? Empty when every candidate
    reads the same inputs (nothing to compare)."""
    done = [r for r in results if r.get("status") == "completed"]
    sets = {tuple(r.get("inputs") or all_inputs) for r in done}
    if len(sets) < 2:
        return []
    test_metric = "test_" + select_metric.removeprefix("val_")
    rows = []
    for inputs in sorted(sets, key=lambda s: (len(s), s)):
        group = [r for r in done if tuple(r.get("inputs") or all_inputs) == inputs]
        best = max(group, key=lambda r: sign * r["final"][select_metric])
        rows.append(
            {
                "inputs": list(inputs),
                "candidate": best["candidate"],
                "fusion": best.get("fusion"),
                select_metric: best["final"][select_metric],
                test_metric: best["final"].get(test_metric),
            }
        )
    return rows


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("confusion", "per_class", "calibration")}


def register_and_package(project: Project, best: dict, build: bool = True) -> dict[str, Any]:
    """Record a model version for the best run, save it to the BentoML store, build the bento."""
    from mmops.serving.package import build_bento, save_to_store

    name = project.params.registry.model_name
    registry = Registry(project.db_url)
    _quiet_known_notices(project)
    if existing := registered_version(registry, name, best["run_id"], build):
        return existing  # an unchanged best candidate is not registered (or built) twice
    # A version of this run whose model or bento was never recorded (a run killed while packaging,
    # or one without a bento): finish that version rather than register the same run twice.
    unfinished = next((v for v in registry.model_versions(name) if v.run_id == best["run_id"]), None)
    version = unfinished or registry.add_model_version(name, best["run_id"], metrics=best["final"])
    if project.params.task_combines_inputs:  # a two-tower model ships its gallery's vector index
        from mmops.serving.retrieval import build_gallery

        index = project.params.index
        build_gallery(
            Path(best["model_dir"]), project.prepared_dir, project.raw_dir, index.splits, index.input, index.exact_below
        )
    model_tag = save_to_store(
        Path(best["model_dir"]),
        name,
        labels={"registry_version": version.ref, "candidate": best["candidate"]},
        metadata={"run_id": best["run_id"], **best["final"]},
    )
    own = project.root / "bentofile.yaml"  # a project made by `mmops init` has its own
    bento_tag = build_bento(model_tag, own if own.is_file() else None) if build else None
    registry.set_tags(name, version.version, model_tag=model_tag, bento_tag=bento_tag or "")
    return {"model_version": version.ref, "model_tag": model_tag, "bento_tag": bento_tag}


def registered_version(registry: Registry, name: str, run_id: str, need_bento: bool) -> dict[str, Any] | None:
    for v in registry.model_versions(name):
        if v.run_id == run_id and v.model_tag and (v.bento_tag or not need_bento):
            return {"model_version": v.ref, "model_tag": v.model_tag, "bento_tag": v.bento_tag or None}
    return None


def up_to_date(project: Project, bento: bool) -> dict[str, Any] | None:
    """The last outcome, if a run now would change nothing: data stages clean, every candidate's
    fingerprint unchanged, and its best already registered. None when there is work to do.

    This is checked before Prefect or torch start, so a no-op run costs seconds, not minutes.
    """
    from dvc.repo import Repo

    params = project.params
    results = []
    for candidate in params.all_candidates():
        previous = reusable_result(project, candidate)
        if previous is None:
            return None
        results.append({**previous, "status": "completed", "reused": True})
    project.appended_dir.mkdir(parents=True, exist_ok=True)
    with Repo(str(project.root)) as repo:
        if repo.status(targets=list(DATA_STAGES)):
            return None
    best = select_best(results, params.select_metric, params.metric_sign(params.select_metric))
    shipped = registered_version(Registry(project.db_url), params.registry.model_name, best["run_id"], bento)
    if shipped is None:
        return None
    return {"stages": dict.fromkeys(DATA_STAGES, "skipped"), "results": results, "best": best["candidate"], **shipped}


def write_run_report(project: Project, run: str | None = None, out: Path | None = None) -> Path:
    """The HTML report of a candidate's run (by run id prefix or candidate name; default the best)."""
    from mmops.report import write_report

    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(project.models_dir.glob("*/result.json"))}
    if not results:
        raise FileNotFoundError("no trained candidates yet: run `mmops run` first")
    if run is None:
        best = project.metrics_dir / "best.json"
        run = json.loads(best.read_text())["best"] if best.is_file() else next(iter(results))
    chosen = [n for n, r in results.items() if n == run or str(r.get("run_id", "")).startswith(run)]
    if not chosen:
        raise LookupError(f"no candidate or run '{run}' in {project.models_dir}; have {sorted(results)}")
    name = chosen[0]
    board = project.metrics_dir / "leaderboard.json"
    candidates = json.loads(board.read_text()) if board.is_file() else None
    out = out or project.root / "reports" / f"{name}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_report(
        project.models_dir / name,
        project.prepared_dir,
        out,
        candidates,
        title=f"{project.params.registry.model_name}: {name}",
        select_metric=project.params.select_metric,
    )
