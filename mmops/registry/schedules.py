"""Scheduled retraining: Prefect deployments of the ``retrain`` flow, served in-process.

No Docker, no cloud, no work pool: ``mmops schedule create`` registers a deployment with a cron
schedule, ``mmops worker`` serves this project's deployments (``prefect.serve``): it polls the API
and runs each flow run in a subprocess. The API is ``PREFECT_API_URL`` when set (any Prefect
server); otherwise the worker starts a local ``prefect server`` on the project's own database
(``.mmops/prefect``) and records its address, so the other commands talk to the same server. With
neither, commands fall back to Prefect's temporary server on that same database, which stores
schedules but runs none (it has no scheduler).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmops.project import Project

FLOW_NAME = "retrain"


@dataclass
class Schedule:
    name: str
    id: str
    crons: list[str]
    timezone: str | None
    paused: bool
    project_dir: str | None
    build_bento: bool


def _url_file(project: Project) -> Path:
    return project.state_dir / "prefect-api-url"


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def api(project: Project) -> Iterator[None]:
    """Point Prefect at this project's API for the duration: PREFECT_API_URL, else a running worker's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    recorded = _url_file(project).read_text().strip() if _url_file(project).is_file() else ""
    if recorded and _healthy(recorded):
        with temporary_settings({PREFECT_API_URL: recorded}):
            yield
    else:
        yield


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _read(client: Any, project: Project | None = None) -> list[Any]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))
    if project is not None:
        deployments = [d for d in deployments if d.parameters.get("project_dir") == str(project.root)]
    return deployments


def _find(client: Any, name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
    except ObjectNotFound:
        raise LookupError(f"no schedule named '{name}'; see `mmops schedule list`") from None


def _as_schedule(d: Any) -> Schedule:
    crons = [s.schedule.cron for s in d.schedules if getattr(s.schedule, "cron", None)]
    tz = next((s.schedule.timezone for s in d.schedules if getattr(s.schedule, "cron", None)), None)
    return Schedule(
        name=d.name,
        id=str(d.id),
        crons=crons,
        timezone=tz,
        paused=bool(d.paused),
        project_dir=d.parameters.get("project_dir"),
        build_bento=d.parameters.get("build_bento", True),
    )


def _deployment(name: str, crons: list[str], timezone: str | None, parameters: dict, paused: bool = False):
    from mmops_flows.retrain import retrain
    from prefect.schedules import Cron

    return retrain.to_deployment(
        name=name,
        schedules=[Cron(c, timezone=timezone) for c in crons],
        parameters=parameters,
        paused=paused,
        description="mmops scheduled retraining (champion/challenger decides promotion)",
        tags=["mmops"],
    )


def create(project: Project, name: str, cron: str, timezone: str | None = None, build_bento: bool = True) -> Schedule:
    from prefect.schedules import Cron

    try:
        Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise ValueError(f"invalid cron '{cron}' or timezone '{timezone}': {exc}") from None
    with api(project), _client() as client:
        existing = [d for d in _read(client) if d.name == name]
        if existing and existing[0].parameters.get("project_dir") != str(project.root):
            raise ValueError(
                f"schedule '{name}' belongs to {existing[0].parameters.get('project_dir')}; choose another --name"
            )
        _deployment(name, [cron], timezone, {"project_dir": str(project.root), "build_bento": build_bento}).apply()
        return _as_schedule(_find(client, name))


def list_all(project: Project) -> list[Schedule]:
    with api(project), _client() as client:
        return [_as_schedule(d) for d in _read(client)]


def set_paused(project: Project, name: str, paused: bool) -> None:
    """Pausing also deletes the runs already scheduled ahead: a paused schedule fires nothing more."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with api(project), _client() as client:
        d = _find(client, name)
        (client.pause_deployment if paused else client.resume_deployment)(d.id)
        if paused:
            pending = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
                ),
            )
            for run in pending:
                client.delete_flow_run(run.id)


def delete(project: Project, name: str) -> None:
    with api(project), _client() as client:
        client.delete_deployment(_find(client, name).id)


def trigger(project: Project, name: str) -> str:
    """Start a run of the deployment now (the worker picks it up); returns the flow run id."""
    from prefect.deployments import run_deployment

    with api(project):
        return str(run_deployment(f"{FLOW_NAME}/{name}", timeout=0).id)


def _start_server(project: Project, port: int) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}/api"
    log = (project.state_dir / "prefect-server.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not start on port {port}; see {log.name}")
        time.sleep(0.5)
    return proc, url


def _stop_on_sigterm(*_: Any) -> None:
    raise KeyboardInterrupt  # until Prefect's runner installs its own handler: stop the way Ctrl-C does


def serve(project: Project, port: int = 4200, limit: int = 1, announce: Any = print) -> None:
    """Serve this project's deployments until interrupted (starting a local server if there is none).

    SIGTERM stops it as Ctrl-C does, at any point: in-flight flow runs are cancelled (the next run marks
    their registry runs aborted), the server this worker started is stopped, and it returns normally.
    """
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    server, url = None, os.environ.get("PREFECT_API_URL")
    try:
        if not url:
            server, url = _start_server(project, port)
            _url_file(project).write_text(url)
            os.environ["PREFECT_API_URL"] = url  # the flow-run subprocesses inherit it
        _serve(project, url, limit, announce)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            _url_file(project).unlink(missing_ok=True)
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _serve(project: Project, url: str, limit: int, announce: Any) -> None:
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), _client() as client:
        mine = _read(client, project)
        if not mine:
            raise LookupError("no schedules for this project: create one with `mmops schedule create`")
        deployments = [
            _deployment(d.name, s.crons, s.timezone, d.parameters, d.paused) for d in mine for s in [_as_schedule(d)]
        ]
        announce(f"worker: serving {', '.join(d.name for d in mine)} from {url}")
        # Keep the schedules active when the worker stops: pausing them is `mmops schedule pause`.
        prefect_serve(*deployments, pause_on_shutdown=False, limit=limit, print_starting_message=False)
