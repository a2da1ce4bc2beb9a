"""The run and model registry, in SQL through SQLAlchemy 2.

SQLite under ``.mmops/`` by default; any SQLAlchemy URL, e.g. PostgreSQL for a team, through
``MMOPS_DB_URL``. The schema is owned by the Alembic migrations in ``mmops/registry/migrations``, applied on
first use, so an older registry is upgraded in place instead of drifting from the code.

Concurrency is designed for, not hoped for:

- SQLite runs in WAL mode with a busy timeout, and every write transaction starts with
  ``BEGIN IMMEDIATE``: writers queue on the busy timeout up front instead of failing when a read lock
  cannot be upgraded. Reads use a deferred ``BEGIN`` on their own engine: in WAL mode they see a
  snapshot and never wait for, nor hold up, a writer.
- Stage changes lock the model's row in ``registered_models`` (``SELECT ... FOR UPDATE`` on
  PostgreSQL) and a partial unique index allows one production version per model, so a promotion is
  one transaction that can never leave two production versions, or none where there was one.
- The event log is append-only: triggers in the database reject UPDATE and DELETE.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload, sessionmaker

STAGES = ("candidate", "staging", "production", "archived")


def _now() -> datetime:
    return datetime.now(UTC)


def default_actor() -> str:
    """Who did it: the OS user and host, the best identity a CLI has without a login."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class NotComparable(RuntimeError):
    """A model cannot be evaluated on the current data (missing input, broken artifact...)."""


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict] = {dict[str, Any]: JSON}


class DataVersion(Base):
    """The exact data a run saw: the DVC hash of every stage output, deduplicated by digest."""

    __tablename__ = "data_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    hashes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: uuid.uuid4().hex)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="running")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seed: Mapped[int | None] = mapped_column(Integer)
    data_version_id: Mapped[int | None] = mapped_column(ForeignKey("data_versions.id"))
    git_commit: Mapped[str | None] = mapped_column(String(64))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(200), default=socket.gethostname)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    artifact: Mapped[str | None] = mapped_column(Text)
    data_version: Mapped[DataVersion | None] = relationship()
    metrics: Mapped[list[Metric]] = relationship(back_populates="run", order_by="Metric.id")

    def final_metrics(self) -> dict[str, float]:
        """Metrics logged without a step: the run's results, as opposed to its per-epoch series."""
        return {m.key: m.value for m in self.metrics if m.step is None}


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_key_step", "run_id", "key", "step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    key: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer)
    logged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    run: Mapped[Run] = relationship(back_populates="metrics")


class RegisteredModel(Base):
    """One row per model name: the lock that serializes stage changes and version numbering."""

    __tablename__ = "registered_models"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        # At most one production version per model, enforced by the database itself.
        Index(
            "uq_model_versions_one_production",
            "name",
            unique=True,
            sqlite_where=text("stage = 'production'"),
            postgresql_where=text("stage = 'production'"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(ForeignKey("registered_models.name"))
    version: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(20), default="candidate")
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    data_version_id: Mapped[int | None] = mapped_column(ForeignKey("data_versions.id"))
    model_tag: Mapped[str | None] = mapped_column(String(200))
    bento_tag: Mapped[str | None] = mapped_column(String(200))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    stage_changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    run: Mapped[Run] = relationship()
    data_version: Mapped[DataVersion | None] = relationship()

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class Event(Base):
    """Append-only: who or what changed which version's stage, and why (with the evidence in details)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    from_stage: Mapped[str | None] = mapped_column(String(20))
    to_stage: Mapped[str | None] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


def parse_ref(ref: str, need_version: bool = True) -> tuple[str, int | None]:
    """``NAME:VERSION`` (or ``NAME`` when the version is optional) -> (name, version)."""
    name, _, version = ref.rpartition(":") if ":" in ref else (ref, "", "")
    if not version:
        if need_version:
            raise ValueError(f"'{ref}': expected NAME:VERSION, e.g. easy-vqa:3")
        return name, None
    if not version.isdigit():
        raise ValueError(f"'{ref}': the version must be a number, e.g. {name}:3")
    return name, int(version)


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" hook issue BEGIN IMMEDIATE itself
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable in WAL mode up to the last checkpointed commit
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str, write: bool = True) -> Engine:
    """An engine; on SQLite, ``write`` makes each transaction take the write lock at BEGIN."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        begin = "BEGIN IMMEDIATE" if write else "BEGIN"
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    return engine


class Registry:
    def __init__(self, url: str, migrate: bool = True) -> None:
        from mmops.registry.migrations import upgrade

        self.url = url
        self.engine: Engine = make_engine(url)
        if migrate:
            upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._reads = (
            sessionmaker(make_engine(url, write=False), expire_on_commit=False)
            if self.engine.dialect.name == "sqlite"
            else self._sessions
        )

    @contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        with (self._sessions if write else self._reads).begin() as session:
            yield session

    # ------------------------------------------------------------ runs and metrics

    def data_version(self, hashes: dict[str, str]) -> int | None:
        """The id of this set of stage hashes, recorded on first sight."""
        if not hashes:
            return None
        digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
        with self.session() as s:
            found = s.scalar(select(DataVersion.id).where(DataVersion.digest == digest))
            if found is None:
                dv = DataVersion(digest=digest, hashes=hashes)
                s.add(dv)
                s.flush()
                found = dv.id
            return found

    def start_run(
        self,
        name: str,
        config: dict,
        seed: int | None,
        data_version: dict,
        git_commit: str | None,
        flow_run_id: str | None = None,
    ) -> str:
        dv_id = self.data_version(data_version)
        with self.session() as s:
            run = Run(
                name=name,
                config=config,
                seed=seed,
                data_version_id=dv_id,
                git_commit=git_commit,
                flow_run_id=flow_run_id,
            )
            s.add(run)
            s.flush()
            return run.id

    def finish_run(
        self, run_id: str, status: str, duration_s: float | None, artifact: str | None = None, error: str | None = None
    ) -> None:
        with self.session() as s:
            run = s.get_one(Run, run_id)
            run.status, run.duration_s, run.artifact, run.error = status, duration_s, artifact, error
            run.finished_at = _now()

    def mark_aborted(self, run_ids: Iterable[str], reason: str) -> list[str]:
        """Runs left ``running`` by a process that died (killed, power lost): ``aborted`` with the reason.
        Only runs still ``running`` change; returns their ids."""
        ids = list(run_ids)
        if not ids:
            return []
        with self.session() as s:
            runs = list(s.scalars(select(Run).where(Run.id.in_(ids), Run.status == "running")))
            for run in runs:
                run.status, run.error, run.finished_at = "aborted", reason, _now()
            return [run.id for run in runs]

    def log_metrics(self, run_id: str, values: dict[str, float], step: int | None = None) -> None:
        self.log_series(run_id, ((k, v, step) for k, v in values.items()))

    def log_series(self, run_id: str, points: Iterable[tuple[str, float, int | None]]) -> None:
        """Many points in one transaction and one multi-row INSERT: cheap enough to call per epoch."""
        now = _now()
        rows = [
            {"run_id": run_id, "key": k, "value": float(v), "step": step, "logged_at": now} for k, v, step in points
        ]
        if rows:
            with self.session() as s:
                s.execute(insert(Metric), rows)

    def runs(self, limit: int = 50) -> list[Run]:
        with self.session(write=False) as s:
            q = select(Run).options(selectinload(Run.metrics), selectinload(Run.data_version))
            return list(s.scalars(q.order_by(Run.started_at.desc()).limit(limit)))

    def get_run(self, run_id: str) -> Run:
        with self.session(write=False) as s:
            q = select(Run).options(selectinload(Run.metrics), selectinload(Run.data_version))
            found = list(s.scalars(q.where(Run.id.startswith(run_id)).limit(2)))
            if not found:
                raise LookupError(f"no run with id starting '{run_id}'; see `mmops runs list`")
            if len(found) > 1:
                raise LookupError(f"'{run_id}' matches more than one run; give more characters")
            return found[0]

    # ------------------------------------------------------------ model versions

    def add_model_version(
        self,
        name: str,
        run_id: str,
        metrics: dict,
        model_tag: str | None = None,
        bento_tag: str | None = None,
        stage: str = "candidate",
    ) -> ModelVersion:
        with self.session() as s:
            self._lock_model(s, name)
            latest = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
            run = s.get_one(Run, run_id)
            mv = ModelVersion(
                name=name,
                version=(latest or 0) + 1,
                run_id=run_id,
                metrics=metrics,
                data_version_id=run.data_version_id,
                model_tag=model_tag,
                bento_tag=bento_tag,
                stage=stage,
            )
            s.add(mv)
            s.flush()
            return mv

    def set_tags(self, name: str, version: int, **fields: str) -> None:
        with self.session() as s:
            mv = s.scalars(select(ModelVersion).filter_by(name=name, version=version)).one()
            for key, value in fields.items():
                setattr(mv, key, value)

    def model_versions(self, name: str | None = None) -> list[ModelVersion]:
        with self.session(write=False) as s:
            q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version.desc())
            if name:
                q = q.where(ModelVersion.name == name)
            return list(s.scalars(q))

    def get_version(self, name: str, version: int | None = None) -> ModelVersion:
        """One version with its run and data version loaded; the latest when ``version`` is None."""
        with self.session(write=False) as s:
            q = (
                select(ModelVersion)
                .where(ModelVersion.name == name)
                .options(
                    selectinload(ModelVersion.run).selectinload(Run.metrics), selectinload(ModelVersion.data_version)
                )
            )
            q = q.where(ModelVersion.version == version) if version else q.order_by(ModelVersion.version.desc())
            mv = s.scalars(q.limit(1)).first()
        if mv is None:
            known = [v.ref for v in self.model_versions(name)][:10] or ["none"]
            raise LookupError(f"no model version {name}:{version or 'latest'}; known: {', '.join(known)}")
        return mv

    def production(self, name: str) -> ModelVersion | None:
        with self.session(write=False) as s:
            return s.scalars(select(ModelVersion).filter_by(name=name, stage="production")).first()

    def events(self, name: str | None = None, version: int | None = None) -> list[Event]:
        with self.session(write=False) as s:
            q = select(Event).order_by(Event.id)
            if name:
                q = q.where(Event.model_name == name)
            if version is not None:
                q = q.where(Event.version == version)
            return list(s.scalars(q))

    # ------------------------------------------------------------ stage changes

    def _lock_model(self, s: Session, name: str) -> None:
        """Serialize writers of one model: create its row if new, then hold a row lock until commit.

        On SQLite ``BEGIN IMMEDIATE`` already made this transaction the only writer.
        """
        if s.get(RegisteredModel, name) is None:
            if s.bind.dialect.name == "postgresql":
                s.execute(
                    text(
                        "INSERT INTO registered_models (name, created_at) VALUES (:n, now()) "
                        "ON CONFLICT (name) DO NOTHING"
                    ),
                    {"n": name},
                )
            else:
                s.add(RegisteredModel(name=name))
                s.flush()
        s.execute(select(RegisteredModel).where(RegisteredModel.name == name).with_for_update())

    def transition(
        self,
        name: str,
        version: int,
        to: str,
        reason: str,
        actor: str | None = None,
        action: str | None = None,
        details: dict | None = None,
    ) -> ModelVersion:
        """Move one version to a stage, in one transaction with its event(s).

        Promoting to production archives the current production version in the same transaction, so
        readers see either the old champion or the new one, never both and never neither.
        """
        if to not in STAGES:
            raise ValueError(f"unknown stage '{to}'; stages: {', '.join(STAGES)}")
        with self.session() as s:
            self._lock_model(s, name)
            return self._move(s, name, version, to, reason, actor or default_actor(), action, details or {})

    def rollback(self, name: str, reason: str = "", actor: str | None = None) -> ModelVersion:
        """Make the previous production version production again (the one the current one replaced)."""
        with self.session() as s:
            self._lock_model(s, name)
            current = s.scalars(select(ModelVersion).filter_by(name=name, stage="production")).first()
            if current is None:
                raise LookupError(f"{name} has no production version to roll back")
            history = s.scalars(
                select(Event.version)
                .where(Event.model_name == name, Event.to_stage == "production")
                .order_by(Event.id.desc())
            ).all()
            previous = next((v for v in history if v != current.version), None)
            if previous is None:
                raise LookupError(f"{name}:{current.version} is the only version that was ever in production")
            return self._move(
                s,
                name,
                previous,
                "production",
                reason or f"rollback from {current.ref}",
                actor or default_actor(),
                "rollback",
                {"rolled_back": current.ref},
            )

    def _move(
        self, s: Session, name: str, version: int, to: str, reason: str, actor: str, action: str | None, details: dict
    ) -> ModelVersion:
        mv = s.scalars(select(ModelVersion).filter_by(name=name, version=version)).first()
        if mv is None:
            raise LookupError(f"no model version {name}:{version}")
        if mv.stage == to:
            return mv
        now = _now()
        if to == "production":
            current = s.scalars(select(ModelVersion).filter_by(name=name, stage="production")).first()
            if current is not None:
                current.stage, current.stage_changed_at = "archived", now
                s.flush()  # free the one-production slot before taking it
                s.add(
                    Event(
                        actor=actor,
                        action="archive",
                        model_name=name,
                        version=current.version,
                        from_stage="production",
                        to_stage="archived",
                        reason=f"replaced by {name}:{version}: {reason}",
                        details=details,
                    )
                )
        s.add(
            Event(
                actor=actor,
                action=action or ("promote" if to == "production" else "transition"),
                model_name=name,
                version=version,
                from_stage=mv.stage,
                to_stage=to,
                reason=reason,
                details=details,
            )
        )
        mv.stage, mv.stage_changed_at = to, now
        s.flush()
        return mv
