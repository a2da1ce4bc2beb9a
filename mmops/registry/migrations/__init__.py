"""Alembic migrations of the registry schema, shipped inside the package and applied on first use.

``upgrade(engine)`` is what ``Registry`` calls: a cheap revision check, and the real upgrade only when
the database is behind. Concurrent first uses (parallel training tasks, several hosts on one
PostgreSQL) are safe: the upgrade runs in one transaction behind a lock (``BEGIN IMMEDIATE`` on
SQLite, an advisory lock on PostgreSQL) and re-reads the revision once it holds it.

A registry created before its schema was tracked (the tables of the first revision, no
``alembic_version``) is recognised by its tables and columns, stamped at that revision and upgraded
from there; tables that match no revision stop with a message saying what is missing, never half-way.

New revisions: ``alembic -c mmops/registry/migrations/alembic.ini revision -m "..."`` from the source tree.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent
PG_LOCK_KEY = 0x6D6D6F7073  # "mmops": one advisory lock id for every registry migration

_current: set[str] = set()  # URLs already at head in this process

# The tables and columns revision 0001 creates: what a registry made before its schema was tracked has.
SCHEMA_0001 = {
    "data_versions": {"id", "digest", "hashes", "created_at"},
    "runs": {
        "id",
        "name",
        "status",
        "config",
        "seed",
        "data_version_id",
        "git_commit",
        "flow_run_id",
        "host",
        "started_at",
        "finished_at",
        "duration_s",
        "error",
        "artifact",
    },
    "metrics": {"id", "run_id", "key", "value", "step", "logged_at"},
    "registered_models": {"name", "created_at"},
    "model_versions": {
        "id",
        "name",
        "version",
        "stage",
        "run_id",
        "data_version_id",
        "model_tag",
        "bento_tag",
        "metrics",
        "created_at",
        "stage_changed_at",
    },
    "events": {"id", "at", "actor", "action", "model_name", "version", "from_stage", "to_stage", "reason", "details"},
}


class UntrackedSchemaError(RuntimeError):
    """Registry tables exist without a recorded revision and do not match the first one."""


def config(connection: Connection | None = None) -> Config:
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str | None:
    return ScriptDirectory.from_config(config()).get_current_head()


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def adopt_untracked(conn: Connection) -> str | None:
    """Stamp a registry whose tables predate the migrations at revision 0001; returns the revision
    stamped, None when there was nothing to adopt (an empty database, or one already tracked).

    Without this, upgrading such a registry fails on 0001's ``CREATE TABLE`` of a table that exists.
    """
    if MigrationContext.configure(conn).get_current_revision() is not None:
        return None
    inspector = inspect(conn)
    tables = set(inspector.get_table_names())
    ours = tables & set(SCHEMA_0001)
    if not ours:
        return None
    gaps = [f"table {name} is missing" for name in sorted(set(SCHEMA_0001) - tables)]
    for name in sorted(ours):
        columns = {c["name"] for c in inspector.get_columns(name)}
        if missing := sorted(SCHEMA_0001[name] - columns):
            gaps.append(f"{name} lacks columns {', '.join(missing)}")
    if gaps:
        url = conn.engine.url.render_as_string(hide_password=True)
        raise UntrackedSchemaError(
            f"{url}: the registry has tables but no schema revision (alembic_version), and they do not match "
            f"the first revision: {'; '.join(gaps)}. Back the database up and point MMOPS_DB_URL at a new one, "
            "or add the missing pieces by hand and run `mmops db upgrade`."
        )
    command.stamp(config(conn), "0001")
    return "0001"


def upgrade(engine: Engine, revision: str = "head") -> None:
    key = engine.url.render_as_string(hide_password=False)
    if revision == "head" and key in _current:
        return
    if revision != "head" or current(engine) != head():
        with engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
            adopt_untracked(conn)
            command.upgrade(config(conn), revision)
    if revision == "head":
        _current.add(key)
