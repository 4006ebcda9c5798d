"""Every SQL statement about jobs and branches.

Each state move is one conditional UPDATE (`... WHERE state = <expected>`), so two workers racing to
make the same move agree on one winner: a branch outcome is written once, a job is finalized once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Engine, bindparam, delete, func, insert, or_, select, update

from .database import get_engine
from .errors import JobNotFound
from .models import FINAL_JOB_STATES, Branch, BranchState, Job, JobState
from .views import BranchOutcome, BranchView, JobView


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes even for timezone=True columns; everything we write is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class NewBranch:
    task: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    celery_task_id: str | None = None  # chosen at submit, so a branch can be revoked before it starts


@dataclass(frozen=True)
class FanInClaim:
    fan_in: str
    min_success: int | None
    fan_in_timeout: float | None


@dataclass(frozen=True)
class StoppedBranch:
    """A branch the deadline or a cancel stopped: what is needed to revoke its message."""

    index: int
    queue: str
    celery_task_id: str | None
    was_running: bool


def parse_job_id(job_id: str | uuid.UUID) -> uuid.UUID:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id))
    except ValueError:
        raise JobNotFound(f"no job {job_id!r}: not a job id") from None


class Store:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    @property
    def engine(self) -> Engine:
        return get_engine(self.database_url)

    # --- submit ------------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        name: str | None,
        fan_in: str,
        branches: Sequence[NewBranch],
        idempotency_key: str | None = None,
        deadline_at: datetime | None = None,
        min_success: int | None = None,
        fan_in_timeout: float | None = None,
    ) -> tuple[uuid.UUID, bool]:
        """Insert the job and all its branches in one transaction; returns (id, created)."""
        job_id = uuid.uuid4()
        now = utcnow()
        with self.engine.begin() as conn:
            if idempotency_key is not None:
                existing = conn.execute(
                    select(Job.id).where(Job.idempotency_key == idempotency_key)
                ).scalar_one_or_none()
                if existing is not None:
                    return existing, False
            conn.execute(
                insert(Job).values(
                    id=job_id,
                    name=name,
                    state=JobState.PENDING,
                    fan_in=fan_in,
                    idempotency_key=idempotency_key,
                    deadline_at=deadline_at,
                    min_success=min_success,
                    fan_in_timeout=fan_in_timeout,
                    branch_total=len(branches),
                    branch_done=0,
                    created_at=now,
                )
            )
            conn.execute(
                insert(Branch),
                [
                    {
                        "job_id": job_id,
                        "index": i,
                        "task": b.task,
                        "queue": b.queue,
                        "args": {"args": b.args, "kwargs": b.kwargs},
                        "state": BranchState.PENDING,
                        "attempts": 0,
                        "celery_task_id": b.celery_task_id,
                        "late": False,
                    }
                    for i, b in enumerate(branches)
                ],
            )
        return job_id, True

    def mark_published(self, job_id: uuid.UUID) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.PENDING)
                .values(state=JobState.RUNNING, started_at=utcnow())
            )

    def mark_failed_to_publish(self, job_id: uuid.UUID, error: str) -> None:
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.PENDING)
                .values(state=JobState.FAILED, error=error, finished_at=now)
            )
            self._stop_unfinished(conn, job_id, BranchState.CANCELLED, error, now)

    # --- branches ----------------------------------------------------------------------------------

    def start_branch(self, job_id: uuid.UUID, index: int) -> int | None:
        """Claim a branch for this attempt; None when its outcome is already recorded (a redelivery)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(Branch)
                .where(
                    Branch.job_id == job_id,
                    Branch.index == index,
                    Branch.state.in_((BranchState.PENDING, BranchState.RUNNING)),
                )
                .values(state=BranchState.RUNNING, attempts=Branch.attempts + 1, started_at=utcnow())
                .returning(Branch.attempts)
            ).scalar_one_or_none()

    def start_branches(self, job_id: uuid.UUID, indexes: Sequence[int]) -> dict[int, int]:
        """start_branch for a chunk, in one statement: {index: attempt} of those not already final."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(Branch)
                .where(
                    Branch.job_id == job_id,
                    Branch.index.in_(list(indexes)),
                    Branch.state.in_((BranchState.PENDING, BranchState.RUNNING)),
                )
                .values(state=BranchState.RUNNING, attempts=Branch.attempts + 1, started_at=utcnow())
                .returning(Branch.index, Branch.attempts)
            ).all()
        return {index: attempts for index, attempts in rows}

    def finish_branches(
        self, job_id: uuid.UUID, outcomes: Sequence[tuple[int, int, BranchState, Any, str | None]]
    ) -> None:
        """finish_branch for a chunk: (index, attempts, state, result, error) rows, in one transaction;
        branch_done is recounted from the rows, since any of them may have lost to the deadline."""
        now = utcnow()
        rows = [
            {"b_index": i, "b_attempts": a, "b_state": s.value, "b_result": r, "b_error": e}
            for i, a, s, r, e in outcomes
        ]
        key = (Branch.job_id == job_id, Branch.index == bindparam("b_index"))
        with self.engine.begin() as conn:
            conn.execute(
                update(Branch)
                .where(*key, Branch.state == BranchState.RUNNING)
                .values(
                    state=bindparam("b_state"),
                    attempts=bindparam("b_attempts"),
                    result=bindparam("b_result", type_=JSON),
                    error=bindparam("b_error"),
                    finished_at=now,
                ),
                rows,
            )
            conn.execute(
                update(Branch)
                # or_ rather than in_: an expanding IN cannot be used in an executemany.
                .where(
                    *key,
                    or_(Branch.state == BranchState.TIMED_OUT, Branch.state == BranchState.CANCELLED),
                    Branch.late.is_(False),
                )
                .values(late=True, result=bindparam("b_result", type_=JSON)),
                [{"b_index": r["b_index"], "b_result": r["b_result"]} for r in rows],
            )
            final = select(func.count()).where(
                Branch.job_id == job_id, Branch.state.not_in((BranchState.PENDING, BranchState.RUNNING))
            )
            conn.execute(update(Job).where(Job.id == job_id).values(branch_done=final.scalar_subquery()))

    def finish_branch(
        self, job_id: uuid.UUID, index: int, state: BranchState, result: Any, error: str | None
    ) -> bool:
        """Record the outcome once; a loser that arrives after a final move is kept as a late result."""
        now = utcnow()
        with self.engine.begin() as conn:
            won = conn.execute(
                update(Branch)
                .where(Branch.job_id == job_id, Branch.index == index, Branch.state == BranchState.RUNNING)
                .values(state=state, result=result, error=error, finished_at=now)
            ).rowcount
            if won:
                conn.execute(update(Job).where(Job.id == job_id).values(branch_done=Job.branch_done + 1))
                return True
            conn.execute(
                update(Branch)
                .where(
                    Branch.job_id == job_id,
                    Branch.index == index,
                    Branch.state.in_((BranchState.TIMED_OUT, BranchState.CANCELLED)),
                    Branch.late.is_(False),
                )
                .values(late=True, result=result, error=error if error else Branch.error)
            )
            return False

    # --- fan-in ------------------------------------------------------------------------------------

    def claim_fan_in(self, job_id: uuid.UUID, *, redelivered: bool = False) -> FanInClaim | None:
        """running -> aggregating; a redelivered fan-in may resume a job left aggregating by a dead worker."""
        states = [JobState.RUNNING, JobState.AGGREGATING] if redelivered else [JobState.RUNNING]
        with self.engine.begin() as conn:
            row = conn.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_(states))
                .values(state=JobState.AGGREGATING, branch_done=Job.branch_total)
                .returning(Job.fan_in, Job.min_success, Job.fan_in_timeout)
            ).one_or_none()
            if row is None:
                return None
            # The chord body runs once every branch task has ended; one that ended without recording an
            # outcome (its task failed on an infrastructure error) is failed here, so no branch of an
            # aggregated job is left pending or running.
            error = "the branch's task ended without recording an outcome"
            self._stop_unfinished(conn, job_id, BranchState.FAILED, error, utcnow())
        return FanInClaim(row.fan_in, row.min_success, row.fan_in_timeout)

    def _stop_unfinished(
        self, conn: Any, job_id: uuid.UUID, state: BranchState, error: str, now: datetime
    ) -> list[StoppedBranch]:
        stopped = conn.execute(
            update(Branch)
            .where(Branch.job_id == job_id, Branch.state.in_((BranchState.PENDING, BranchState.RUNNING)))
            .values(state=state, error=error, finished_at=now)
            .returning(Branch.index, Branch.queue, Branch.celery_task_id, Branch.started_at)
        ).all()
        return [StoppedBranch(r.index, r.queue, r.celery_task_id, r.started_at is not None) for r in stopped]

    def expire(self, job_id: uuid.UUID) -> tuple[FanInClaim, list[StoppedBranch]] | None:
        """At the deadline: running -> aggregating, and every unfinished branch -> timed_out, atomically."""
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING)
                .values(state=JobState.AGGREGATING, branch_done=Job.branch_total)
                .returning(Job.fan_in, Job.min_success, Job.fan_in_timeout)
            ).one_or_none()
            if row is None:
                return None
            stopped = self._stop_unfinished(
                conn,
                job_id,
                BranchState.TIMED_OUT,
                "the job's deadline passed before the branch finished",
                now,
            )
        return FanInClaim(row.fan_in, row.min_success, row.fan_in_timeout), stopped

    def cancel(self, job_id: uuid.UUID) -> list[StoppedBranch] | None:
        """pending | running -> cancelled, with every unfinished branch; None if the job was already final."""
        now = utcnow()
        with self.engine.begin() as conn:
            won = conn.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_((JobState.PENDING, JobState.RUNNING)))
                .values(
                    state=JobState.CANCELLED, finished_at=now, error="cancelled", branch_done=Job.branch_total
                )
            ).rowcount
            if not won:
                return None
            return self._stop_unfinished(conn, job_id, BranchState.CANCELLED, "the job was cancelled", now)

    def outcomes(self, job_id: uuid.UUID) -> list[BranchOutcome]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Branch.__table__).where(Branch.job_id == job_id).order_by(Branch.index)
            ).all()
        views = [_branch_view(r) for r in rows]
        return [BranchOutcome(v.index, v.task, v.state, v.result, v.error, v.duration) for v in views]

    def finalize(self, job_id: uuid.UUID, state: JobState, result: Any, error: str | None) -> bool:
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.AGGREGATING)
                    .values(state=state, result=result, error=error, finished_at=utcnow())
                ).rowcount
            )

    # --- reads -------------------------------------------------------------------------------------

    def get(self, job_id: str | uuid.UUID, *, with_branches: bool = True) -> JobView:
        jid = parse_job_id(job_id)
        with self.engine.connect() as conn:
            job = conn.execute(select(Job.__table__).where(Job.id == jid)).one_or_none()
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            branches: list[Any] = []
            if with_branches:
                branches = list(
                    conn.execute(
                        select(Branch.__table__).where(Branch.job_id == jid).order_by(Branch.index)
                    ).all()
                )
        return _job_view(job, branches)

    def state(self, job_id: str | uuid.UUID) -> str:
        jid = parse_job_id(job_id)
        with self.engine.connect() as conn:
            state = conn.execute(select(Job.state).where(Job.id == jid)).scalar_one_or_none()
        if state is None:
            raise JobNotFound(f"no job {job_id}")
        return state

    def list(self, state: str | None = None, limit: int = 50) -> list[JobView]:
        query = select(Job.__table__).order_by(Job.created_at.desc()).limit(limit)
        if state is not None:
            query = query.where(Job.state == state)
        with self.engine.connect() as conn:
            return [_job_view(row, []) for row in conn.execute(query).all()]

    def prune(self, older_than: timedelta) -> int:
        """Delete final jobs (and their branches) that finished before now - older_than."""
        cutoff = utcnow() - older_than
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    delete(Job).where(Job.finished_at < cutoff, Job.state.in_(FINAL_JOB_STATES))
                ).rowcount
            )


def _branch_view(row: Any) -> BranchView:
    return BranchView(
        index=row.index,
        task=row.task,
        queue=row.queue,
        args=row.args,
        state=row.state,
        attempts=row.attempts,
        celery_task_id=row.celery_task_id,
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        result=row.result,
        error=row.error,
        late=row.late,
    )


def _job_view(row: Any, branches: Sequence[Any]) -> JobView:
    created = _aware(row.created_at)
    assert created is not None
    return JobView(
        id=str(row.id),
        name=row.name,
        state=row.state,
        fan_in=row.fan_in,
        branch_total=row.branch_total,
        branch_done=row.branch_done,
        created_at=created,
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        deadline_at=_aware(row.deadline_at),
        result=row.result,
        error=row.error,
        branches=tuple(_branch_view(b) for b in branches),
    )
