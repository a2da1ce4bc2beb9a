"""Alembic migrations of the registry schema, shipped inside the package and applied on first use.

``upgrade(engine)`` is what ``Registry`` calls: a cheap revision check, and the real upgrade only when
the database is behind. Concurrent first uses (parallel training tasks, several hosts on one
PostgreSQL) are safe: the upgrade runs in one transaction behind a lock (``BEGIN IMMEDIATE`` on
SQLite, an advisory lock on PostgreSQL) and re-reads the revision once it holds it.

New revisions: ``alembic -c mmops/registry/migrations/alembic.ini revision -m "..."`` from the source tree.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent
PG_LOCK_KEY = 0x6D6D6F7073  # "mmops": one advisory lock id for every registry migration

_current: set[str] = set()  # URLs already at head in this process


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


def upgrade(engine: Engine, revision: str = "head") -> None:
    key = engine.url.render_as_string(hide_password=False)
    if revision == "head" and key in _current:
        return
    if revision != "head" or current(engine) != head():
        with engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
            command.upgrade(config(conn), revision)
    if revision == "head":
        _current.add(key)
