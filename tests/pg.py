"""Per-test PostgreSQL schemas for the registry tests (PostgreSQL at 127.0.0.1:5432, database `test`).

Each test gets a fresh schema, selected through the connection's ``search_path``, and drops it after:
tests never see each other's tables, and parallel CI jobs don't collide.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text

BASE = os.environ.get("MMOPS_TEST_PG", "postgresql+psycopg://{user}@127.0.0.1:5432/test")


def _admin_url() -> str | None:
    for user in ("postgres", "root"):
        url = BASE.format(user=user)
        try:
            with create_engine(url).connect() as conn:
                conn.execute(text("select 1"))
            return url
        except Exception:
            continue
    return None


ADMIN = _admin_url()


@contextmanager
def pg_schema_url() -> Iterator[str]:
    if ADMIN is None:
        pytest.skip(f"PostgreSQL not reachable at {BASE.format(user='postgres|root')}")
    schema = f"mmops_test_{uuid.uuid4().hex[:10]}"
    engine = create_engine(ADMIN)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{ADMIN}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
