"""The run and model registry, in SQL through SQLAlchemy 2.

SQLite under ``.mmops/`` by default (WAL and a busy timeout so parallel candidates can write at
once); any SQLAlchemy URL, e.g. PostgreSQL for a team, through ``MMOPS_DB_URL``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict] = {dict[str, Any]: JSON}


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: uuid.uuid4().hex)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="running")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seed: Mapped[int | None] = mapped_column(Integer)
    data_version: Mapped[dict[str, Any]] = mapped_column(default=dict)
    git_commit: Mapped[str | None] = mapped_column(String(64))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(200), default=socket.gethostname)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    duration_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    artifact: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[list[Metric]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    key: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer)
    run: Mapped[Run] = relationship(back_populates="metrics")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(20), default="candidate")
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    model_tag: Mapped[str | None] = mapped_column(String(200))
    bento_tag: Mapped[str | None] = mapped_column(String(200))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Registry:
    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            from pathlib import Path

            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def start_run(self, name: str, config: dict, seed: int | None, data_version: dict,
                  git_commit: str | None, flow_run_id: str | None = None) -> str:
        with self.session() as s:
            run = Run(name=name, config=config, seed=seed, data_version=data_version,
                      git_commit=git_commit, flow_run_id=flow_run_id)
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: str, status: str, duration_s: float | None,
                   artifact: str | None = None, error: str | None = None) -> None:
        with self.session() as s:
            run = s.get_one(Run, run_id)
            run.status, run.duration_s, run.artifact, run.error = status, duration_s, artifact, error

    def log_metrics(self, run_id: str, values: dict[str, float], step: int | None = None) -> None:
        with self.session() as s:
            s.add_all(Metric(run_id=run_id, key=k, value=float(v), step=step) for k, v in values.items())

    def add_model_version(self, name: str, run_id: str, metrics: dict, model_tag: str | None = None,
                          bento_tag: str | None = None, stage: str = "candidate") -> ModelVersion:
        with self.session() as s:
            latest = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
            mv = ModelVersion(name=name, version=(latest or 0) + 1, run_id=run_id, metrics=metrics,
                              model_tag=model_tag, bento_tag=bento_tag, stage=stage)
            s.add(mv)
            s.flush()
            return mv

    def set_tags(self, name: str, version: int, **fields: str) -> None:
        with self.session() as s:
            mv = s.scalars(select(ModelVersion).filter_by(name=name, version=version)).one()
            for key, value in fields.items():
                setattr(mv, key, value)

    def runs(self, limit: int = 50) -> list[Run]:
        with self.session() as s:
            return list(s.scalars(select(Run).order_by(Run.started_at.desc()).limit(limit)))

    def get_run(self, run_id: str) -> Run:
        with self.session() as s:
            run = s.scalars(select(Run).where(Run.id.startswith(run_id))).first()
            if run is None:
                raise LookupError(f"no run with id starting '{run_id}'; see `mmops runs list`")
            _ = run.metrics  # load while the session is open
            return run

    def model_versions(self, name: str | None = None) -> list[ModelVersion]:
        with self.session() as s:
            q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version.desc())
            if name:
                q = q.where(ModelVersion.name == name)
            return list(s.scalars(q))
