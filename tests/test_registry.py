"""The registry on SQLite and on PostgreSQL: migrations, concurrent writers, atomic promotion, CLI."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path

import pytest
from alembic import command
from pg import pg_schema_url
from registry_workers import POINTS, promote_randomly, write_metrics
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from mmops.cli.main import app
from mmops.config import PromotionConfig
from mmops.registry import migrations
from mmops.registry.lifecycle import decide
from mmops.registry.store import Event, Metric, ModelVersion, Registry, make_engine

REPO = Path(__file__).resolve().parent.parent
WRITERS = 8


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        with pg_schema_url() as url:
            yield url


def _seed(registry: Registry, n_versions: int = 3, name: str = "m") -> list[str]:
    runs = []
    for i in range(n_versions):
        run = registry.start_run(
            f"cand{i}",
            {"train": {"lr": 0.001 * (i + 1), "epochs": 3}, "seed": 1},
            1,
            {"prepare:data/prepared": f"hash{i}"},
            "abc123",
            flow_run_id=f"fr{i}",
        )
        registry.log_metrics(run, {"val_accuracy": 0.5 + i / 10}, step=1)
        registry.log_metrics(run, {"val_accuracy": 0.6 + i / 10, "test_accuracy": 0.55 + i / 10})
        registry.finish_run(run, "completed", 1.5)
        registry.add_model_version(
            name, run, {"val_accuracy": 0.6 + i / 10}, model_tag=f"{name}:t{i}", bento_tag=f"mmops:b{i}"
        )
        runs.append(run)
    return runs


def test_migrations_apply_on_first_use_and_are_idempotent(db_url):
    engine = make_engine(db_url)
    assert migrations.current(engine) is None
    registry = Registry(db_url)
    assert migrations.current(engine) == migrations.head() is not None
    with registry.session() as s:  # the ORM and the migrated schema agree
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 0
    with engine.connect() as conn, conn.begin():  # down and up again: the downgrade path works too
        command.downgrade(migrations.config(conn), "base")
    assert migrations.current(engine) is None
    migrations._current.clear()
    Registry(db_url)
    assert migrations.current(engine) == migrations.head()


def test_a_registry_created_before_migrations_is_stamped_and_upgraded(db_url):
    """Issue 17: tables of the first released schema but no alembic_version; 0001 failed on CREATE TABLE."""
    engine = make_engine(db_url)
    with engine.connect() as conn, conn.begin():  # exactly the first revision's tables, and nothing recording it
        command.upgrade(migrations.config(conn), "0001")
        conn.execute(text("DROP TABLE alembic_version"))
    assert migrations.current(engine) is None
    old = Registry(db_url, migrate=False)
    runs = _seed(old, 2)
    migrations._current.clear()
    registry = Registry(db_url)  # the first use after upgrading mmops
    assert migrations.current(engine) == migrations.head()
    assert [v.run_id for v in registry.model_versions("m")] == runs[::-1]
    registry.transition("m", 2, "production", "works after the upgrade")
    assert registry.production("m").version == 2
    # the triggers came with the tables
    with pytest.raises(DBAPIError, match="append-only"), registry.session() as s:
        s.execute(text("DELETE FROM events"))


def test_an_untracked_registry_that_matches_no_revision_is_refused_with_what_is_missing(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with make_engine(url).connect() as conn, conn.begin():  # the pre-migration prototype's runs table
        conn.execute(text("CREATE TABLE runs (id VARCHAR(36) PRIMARY KEY, name VARCHAR(200), data_version JSON)"))
    migrations._current.clear()
    with pytest.raises(migrations.UntrackedSchemaError, match=r"runs lacks columns .*data_version_id") as info:
        Registry(url)
    assert "table events is missing" in str(info.value)
    assert migrations.current(make_engine(url)) is None  # nothing half-done


def test_parallel_writers_lose_and_corrupt_nothing(db_url):
    registry = Registry(db_url)
    runs = [registry.start_run(f"w{i}", {}, i, {}, None) for i in range(WRITERS)]
    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    procs = [ctx.Process(target=write_metrics, args=(db_url, run, i)) for i, run in enumerate(runs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    elapsed = time.perf_counter() - started
    with registry.session() as s:
        assert s.scalar(select(func.count()).select_from(Metric)) == WRITERS * POINTS
        for i, run in enumerate(runs):
            rows = s.execute(select(Metric.key, Metric.step, Metric.value).where(Metric.run_id == run)).all()
            assert len(rows) == POINTS and len({(k, st) for k, st, _ in rows}) == POINTS
            assert all(v == (i + st / 1000 if k == "loss" else st / 1000) for k, st, v in rows)
    assert elapsed < 90, f"{WRITERS} writers took {elapsed:.0f} s"


def test_promotions_never_leave_zero_or_two_production_versions(db_url):
    registry = Registry(db_url)
    _seed(registry, 4)
    with pytest.raises(LookupError, match="no production version"):
        registry.rollback("m")
    registry.transition("m", 1, "production", "first")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=promote_randomly, args=(db_url, i)) for i in range(4)]
    for p in procs:
        p.start()
    counts = set()
    while any(p.is_alive() for p in procs):  # a reader watching every committed state
        with registry.session(write=False) as s:
            counts.add(
                s.scalar(select(func.count()).where(ModelVersion.name == "m", ModelVersion.stage == "production"))
            )
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert counts == {1}
    # The database itself refuses a second production version, whatever the code path.
    with pytest.raises(DBAPIError), registry.session() as s:
        s.execute(text("UPDATE model_versions SET stage = 'production' WHERE name = 'm'"))
    # Every change is in the log: each promotion of a different version archived the previous one.
    events = registry.events("m")
    promotes = [e for e in events if e.to_stage == "production"]
    archives = [e for e in events if e.action == "archive"]
    assert len(archives) == len(promotes) - 1


def test_rollback_returns_to_the_previous_production_version(db_url):
    registry = Registry(db_url)
    _seed(registry, 3)
    registry.transition("m", 1, "production", "first")
    registry.transition("m", 3, "production", "better")
    registry.transition("m", 2, "staging", "not better")
    assert registry.rollback("m", "v3 misbehaves").version == 1
    stages = {v.version: v.stage for v in registry.model_versions("m")}
    assert stages == {1: "production", 2: "staging", 3: "archived"}
    last = registry.events("m")[-1]
    assert (last.action, last.version, last.reason, last.details) == (
        "rollback",
        1,
        "v3 misbehaves",
        {"rolled_back": "m:3"},
    )


def test_event_log_is_append_only(db_url):
    registry = Registry(db_url)
    _seed(registry, 1)
    registry.transition("m", 1, "production", "first")
    for statement in ("UPDATE events SET reason = 'rewritten'", "DELETE FROM events"):
        with pytest.raises(DBAPIError, match="append-only"), registry.session() as s:
            s.execute(text(statement))
    assert [e.reason for e in registry.events("m")] == ["first"]
    with registry.session() as s:
        assert s.scalar(select(func.count()).select_from(Event)) == 1


def test_data_versions_are_deduplicated_and_linked(db_url):
    registry = Registry(db_url)
    a = registry.start_run("a", {}, 1, {"prepare:data/prepared": "h1"}, None)
    b = registry.start_run("b", {}, 1, {"prepare:data/prepared": "h1"}, None)
    c = registry.start_run("c", {}, 1, {"prepare:data/prepared": "h2"}, None)
    ids = [registry.get_run(r).data_version.id for r in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]
    mv = registry.add_model_version("m", c, {})
    assert registry.get_version("m", mv.version).data_version.hashes == {"prepare:data/prepared": "h2"}


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "why"),
    [
        ({"accuracy": 0.9, "macro_f1": 0.8}, None, True, "first model"),
        ({"accuracy": 0.4, "macro_f1": 0.8}, None, False, "below the minimum"),
        ({"accuracy": 0.9, "macro_f1": 0.8}, {"accuracy": 0.85, "macro_f1": 0.8}, True, "beats the champion"),
        ({"accuracy": 0.851, "macro_f1": 0.8}, {"accuracy": 0.85, "macro_f1": 0.8}, False, "margin"),
        ({"accuracy": 0.4, "macro_f1": 0.8}, {"accuracy": 0.3, "macro_f1": 0.8}, False, "below the minimum"),
    ],
)
def test_promotion_rule(challenger, champion, promote, why):
    decision, reason = decide(challenger, champion, PromotionConfig(margin=0.002, min_accuracy=0.5))
    assert decision is promote and why in reason


def test_cli_runs_models_lineage_and_db(db_url, tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path)
    registry = Registry(db_url)
    runs = _seed(registry, 3, name="easy-vqa")
    cli = CliRunner()
    env = {"MMOPS_DB_URL": db_url, "MMOPS_PROJECT": str(tmp_path), "COLUMNS": "200"}

    def ok(*args: str) -> str:
        result = cli.invoke(app, list(args), env=env)
        assert result.exit_code == 0, (args, result.output)
        return result.output

    assert "cand0" in ok("runs", "list") and "0.7500" in ok("runs", "list")
    out = ok("runs", "show", runs[1][:8])
    assert "per epoch" in out and "abc123" in out and "hash1" in out
    out = ok("runs", "compare", runs[0][:8], runs[2][:8])
    assert "train.lr" in out and "train.epochs" not in out and "test_accuracy" in out
    assert "train.epochs" in ok("runs", "compare", runs[0], runs[2], "--all")

    assert "promoted" not in ok("models", "promote", "easy-vqa:1", "--to", "production")
    out = ok("models", "promote", "easy-vqa:3", "--to", "production", "--reason", "best so far")
    assert "was easy-vqa:1, now archived" in out
    out = ok("models", "list")
    assert "production" in out and "archived" in out and "candidate" in out
    out = ok("models", "show", "easy-vqa:3")
    assert "best so far" in out and "history" in out
    assert "easy-vqa:3" in ok("models", "show", "easy-vqa")  # latest version
    assert "-> easy-vqa:1 is production" in ok("models", "rollback", "easy-vqa")
    assert registry.production("easy-vqa").version == 1

    out = ok("lineage", "easy-vqa:2")
    for expected in ("mmops:b1", "easy-vqa:t1", runs[1], "abc123", "prepare:data/prepared", "hash1", "lr: 0.002"):
        assert expected in out, expected
    assert migrations.head() in ok("db", "upgrade") and migrations.head() in ok("db", "current")

    bad = cli.invoke(app, ["models", "promote", "easy-vqa", "--to", "production"], env=env)
    assert bad.exit_code == 2 and "NAME:VERSION" in bad.output
    missing = cli.invoke(app, ["lineage", "easy-vqa:9"], env=env)
    assert missing.exit_code == 1 and "no model version easy-vqa:9" in missing.output
