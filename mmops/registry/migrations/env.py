"""Alembic environment: runs on the connection mmops hands over, or on ``MMOPS_DB_URL`` from the CLI."""

from __future__ import annotations

import os

from alembic import context

from mmops.registry.store import Base, make_engine

connection = context.config.attributes.get("connection")
if connection is not None:
    # mmops.registry.migrations.upgrade already opened the transaction and took the lock.
    context.configure(connection=connection, target_metadata=Base.metadata, transactional_ddl=True)
    context.run_migrations()
else:
    url = os.environ.get("MMOPS_DB_URL") or context.config.get_main_option("sqlalchemy.url")
    with make_engine(url).connect() as conn, conn.begin():
        context.configure(connection=conn, target_metadata=Base.metadata, transactional_ddl=True)
        context.run_migrations()
