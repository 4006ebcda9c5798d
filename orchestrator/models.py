"""SQLAlchemy 2 models: the SQL tables are the source of truth for jobs, branches and chord joins."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .errors import InvalidArgument

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The one clock every timestamp column is written from: aware, UTC."""
    return datetime.now(UTC)


def cutoff(age: timedelta) -> datetime:
    """When rows older than `age` end: retention ages must be positive (zero or less would reach into the
    future and prune what is still running)."""
    if age <= timedelta(0):
        raise InvalidArgument(f"a retention age must be positive, got {age}")
    return utcnow() - age


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone=True timestamp that always reads back aware: SQLite returns naive datetimes even for
    such columns, and everything written here is UTC (`utcnow`)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class JobState(enum.StrEnum):
    PENDING = "pending"  # recorded, messages not yet published
    RUNNING = "running"  # published; branches are running or queued
    AGGREGATING = "aggregating"  # the fan-in has claimed the job
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.PARTIAL, JobState.FAILED, JobState.CANCELLED})


class BranchState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SHORT_CIRCUITED = "short_circuited"
    CANCELLED = "cancelled"


#: What a redrive (`Orchestrator.retry`) runs again by default: the branches that ended for a reason worth
#: another try.
RETRY_STATES = (BranchState.FAILED.value, BranchState.TIMED_OUT.value, BranchState.SHORT_CIRCUITED.value)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, Any: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    fan_in: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    min_success: Mapped[int | None] = mapped_column(Integer)
    fan_in_timeout: Mapped[float | None] = mapped_column()
    branch_total: Mapped[int] = mapped_column(Integer)
    branch_done: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    # The fan-in's run: which worker process holds the job while it aggregates, its last heartbeat
    # (the database's clock), and how many fan-in runs were lost with their worker.
    runner: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lost_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # 1 at submit, + 1 for each redrive (`Orchestrator.retry`); earlier runs are in job_history.
    run: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    branches: Mapped[list[Branch]] = relationship(
        back_populates="job", order_by="Branch.index", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("ix_jobs_state_created_at", "state", "created_at"),
        # The rescuer's scan: only unfinished jobs, a handful of rows however large the table grows.
        Index(
            "ix_jobs_unfinished_heartbeat_at",
            "heartbeat_at",
            postgresql_where=text("state IN ('running', 'aggregating')"),
            sqlite_where=text("state IN ('running', 'aggregating')"),
        ),
    )


class Branch(Base):
    __tablename__ = "branches"

    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(64))
    args: Mapped[Any] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=BranchState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    # Which worker process runs the branch (None while queued, or once it was taken from a lost one),
    # its last heartbeat (the database's clock), and how many runs were lost with their worker.
    runner: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lost_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The job run the branch last ran in; its outcomes in earlier runs are in branch_history.
    run: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    job: Mapped[Job] = relationship(back_populates="branches")

    __table_args__ = (
        # The rescuer's scan of running branches by heartbeat: running rows only.
        Index(
            "ix_branches_running_heartbeat_at",
            "heartbeat_at",
            postgresql_where=text("state = 'running'"),
            sqlite_where=text("state = 'running'"),
        ),
    )


class JobHistory(Base):
    """How a job's earlier runs ended, kept when it is run again (`Orchestrator.retry`)."""

    __tablename__ = "job_history"

    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    run: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class BranchHistory(Base):
    """A branch's outcome in an earlier run of its job, kept when the branch is run again."""

    __tablename__ = "branch_history"

    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class Admission(Base):
    """Admitted, unfinished work, where every client sees it: one row a bound (`ORCH_MAX_ACTIVE_BRANCHES`),
    raised in the transaction that records jobs and lowered in the one that ends them."""

    __tablename__ = "admission"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    active: Mapped[int] = mapped_column(Integer, default=0)


class ResultRecord(Base):
    """Celery task results, stored by `orchestrator.backend.SQLBackend` as a key/value table."""

    __tablename__ = "celery_results"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ChordCounter(Base):
    """One row per chord: the join is an atomic increment of `done`, never a poll."""

    __tablename__ = "chord_counters"

    group_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int | None] = mapped_column(Integer)
    # The part that reached the total claims the publish in the same transaction as its increment.
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    fired: Mapped[bool] = mapped_column(Boolean, default=False)
    # The body's signature, so a body whose publisher died can be published by another worker.
    body: Mapped[Any | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    __table_args__ = (
        # The recovery sweep's scan: unfired joins only (fired ones stay until pruned).
        Index(
            "ix_chord_counters_unfired_claimed_at",
            "claimed_at",
            postgresql_where=text("NOT fired"),
            sqlite_where=text("fired = 0"),
        ),
    )


class ChordPart(Base):
    """A header task counted once: a redelivered task finds its row and does not count again."""

    __tablename__ = "chord_parts"

    group_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)


class Breaker(Base):
    """One circuit breaker shared by every process on every host: each transition is a conditional UPDATE."""

    __tablename__ = "breakers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=BreakerState.CLOSED)
    failure_count: Mapped[int] = mapped_column(Integer, default=0)
    failure_threshold: Mapped[int] = mapped_column(Integer)
    reset_timeout: Mapped[float] = mapped_column()
    probe_lease: Mapped[float] = mapped_column()
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    probe_token: Mapped[str | None] = mapped_column(String(64))
    probe_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
