"""Small things a new user hit (issue 17 items 12 and 22): each one as the user met it."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, project_env
from typer.testing import CliRunner

from mmops.cli.main import app

runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project with a small easy-VQA manifest under data/raw, its tools' state kept inside it."""
    from mmops.data.easyvqa import import_easy_vqa

    root = tmp_path / "proj"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(limit=20, image_size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    import_easy_vqa(root / "data" / "raw", limit=20)
    (root / ".mmops").mkdir()
    for key in ("PREFECT_HOME", "BENTOML_HOME", "DVC_SITE_CACHE_DIR"):
        monkeypatch.setenv(key, str(root / ".mmops" / key.lower()))
    monkeypatch.delenv("MMOPS_PROJECT", raising=False)
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    return root


def test_project_option_before_the_command(project, tmp_path, monkeypatch):
    """README: every command takes --project; before the command's name it applies to that command."""
    monkeypatch.chdir(tmp_path)  # not the project: the option alone must find it
    result = runner.invoke(app, ["--project", str(project), "data", "validate"])
    assert result.exit_code == 0, result.output
    assert "40 rows" in result.output and (project / "data" / "quarantine.csv").is_file()
    assert "MMOPS_PROJECT" not in os.environ  # set for that one invocation only
    # The command's own --project still wins over the root one.
    result = runner.invoke(app, ["-p", str(tmp_path / "nowhere"), "data", "validate", "-p", str(project)])
    assert result.exit_code == 0, result.output


def test_quarantine_file_is_ignored_by_git(tmp_path):
    from mmops.scaffold import init_project

    root = init_project(tmp_path / "new", "classification")
    for repo in (root, REPO):
        check = subprocess.run(["git", "check-ignore", "-q", "data/quarantine.csv"], cwd=repo)
        assert check.returncode == 0, f"{repo}: data/quarantine.csv is not ignored by git"


def test_run_in_a_folder_without_dvc_says_how_to_make_it_a_project(project):
    for command in ("run", "sweep"):
        result = runner.invoke(app, [command, "-p", str(project)])
        assert result.exit_code == 2, result.output
        assert "has no .dvc and no dvc.yaml" in result.output and "mmops init" in result.output
        assert "Traceback" not in result.output
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    result = runner.invoke(app, ["run", "-p", str(project)])
    assert result.exit_code == 2 and "has no .dvc:" in result.output, result.output


def test_run_prints_the_registry_url_without_its_password(project, monkeypatch):
    import mmops_flows.retrain

    # mmops run refuses a folder without DVC (the test above); retrain is stubbed, so their names suffice
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (project / ".dvc").mkdir()

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the banner")

    monkeypatch.setattr(mmops_flows.retrain, "retrain", stop)
    monkeypatch.setenv("MMOPS_DB_URL", "postgresql+psycopg://mmops:s3cret-pw@127.0.0.1:9/registry")
    result = runner.invoke(app, ["run", "-p", str(project)])
    assert isinstance(result.exception, RuntimeError), result.output
    assert "s3cret-pw" not in result.output
    assert "postgresql+psycopg://mmops:***@127.0.0.1:9/registry" in result.output


def test_serve_on_a_port_in_use_says_so(project):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", "-p", str(project), "--bento", "mmops:any", "--port", str(port)])
    assert result.exit_code == 2
    assert "already in use" in result.output and f"127.0.0.1:{port}" in result.output and "--port" in result.output
    assert "Traceback" not in result.output


def test_data_stages_do_not_repeat_dvc_notices(project):
    """DVC's "To track the changes with git" after every stage, and "'data/appended' is empty" on every
    run, told the user nothing they could act on. (A subprocess: DVC binds its log handler to the
    streams of the first process that uses it.)"""
    shutil.copy(REPO / "dvc.yaml", project)
    shutil.rmtree(project / "data")  # the import stage writes data/raw itself
    env = project_env(project)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True, env=env)
    subprocess.run([BIN / "dvc", "init", "-q"], cwd=project, check=True, env=env)
    code = (
        "from mmops import pipeline; from mmops.project import Project, configure_environment\n"
        "p = Project.at('.'); configure_environment(p)\n"
        "print(pipeline.run_stages(p, ('import', 'prepare')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "{'import': 'ran', 'prepare': 'ran'}" in out
    assert "Running stage 'prepare'" in out  # DVC's own progress still shows
    assert "To track the changes with git" not in out
    assert "is empty" not in out


def test_bento_build_does_not_warn_about_cuda_version_each_time(caplog):
    from _bentoml_sdk.images import populate_image_from_build_config
    from bentoml._internal.bento.build_config import BentoBuildConfig

    from mmops import pipeline
    from mmops.project import Project

    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert bentofile["docker"]["cuda_version"]  # kept: it is what gives `bentoml containerize` a CUDA image
    config = BentoBuildConfig(service="mmops.serving.service:MultimodalService", docker=bentofile["docker"])
    build = logging.getLogger("bentoml.build")
    saved = build.filters[:]
    try:
        build.filters.clear()
        with caplog.at_level(logging.WARNING, logger="bentoml.build"):
            populate_image_from_build_config(None, config, str(REPO))
        assert "docker.cuda_version" in caplog.text  # BentoML says it ...
        caplog.clear()
        pipeline._quiet_known_notices(Project.at(REPO))
        with caplog.at_level(logging.WARNING, logger="bentoml.build"):
            populate_image_from_build_config(None, config, str(REPO))
        assert "docker.cuda_version" not in caplog.text  # ... and mmops no longer repeats it
    finally:
        build.filters[:] = saved


def test_dependency_floors_exclude_versions_with_known_vulnerabilities():
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    deps = {
        r.name: r.specifier
        for r in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    }
    for name, vulnerable in (("bentoml", "1.4.7"), ("pyarrow", "14.0.0")):
        assert vulnerable not in deps[name], f"{name} {deps[name]} still allows {vulnerable}"
        assert version(name) in deps[name]  # and what is installed here satisfies it


def test_the_service_logs_a_refused_request_in_one_line_without_traceback(caplog):
    """BentoML's own handler logs each 4xx at ERROR with a full traceback; a 5xx keeps its traceback."""
    from types import SimpleNamespace

    from bentoml._internal.server.http_app import log_exception
    from bentoml.exceptions import InvalidArgument

    import mmops.serving.service  # noqa: F401 - installs the filter, as the served bento does

    request = SimpleNamespace(url=SimpleNamespace(path="/predict"), method="POST")
    with caplog.at_level(logging.INFO, logger="bentoml._internal.server.http_app"):
        try:
            raise InvalidArgument("question: empty")
        except InvalidArgument:
            log_exception(request)
        [refused] = caplog.records
        assert refused.levelno == logging.INFO and not refused.exc_info
        assert refused.getMessage() == "refused /predict [POST]: question: empty"
        assert "Traceback" not in caplog.text
        caplog.clear()
        try:
            raise RuntimeError("a real server error")
        except RuntimeError:
            log_exception(request)
        [failed] = caplog.records
        assert failed.levelno == logging.ERROR and "Traceback" in caplog.text
