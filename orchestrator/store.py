"""Every SQL statement about jobs and branches.

Each state move is one conditional UPDATE (`... WHERE state = <expected>`), so two workers racing to
make the same move agree on one winner: a branch outcome is written once, a job is finalized once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Integer,
    Table,
    Text,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from . import notifications
from .database import dialect, get_engine
from .errors import JobNotFound
from .models import FINAL_JOB_STATES, Branch, BranchState, Job, JobState, UTCDateTime, cutoff, utcnow
from .views import BranchOutcome, JobView, branch_view, job_view

T = TypeVar("T")
#: Work a caller adds to a store transaction (the result backend counts a chord part in it).
AlsoInTransaction = Callable[[Connection], T]
#: Work a caller adds to the transaction that inserts jobs, given the jobs inserted (the chord joins).
AlsoWithJobs = Callable[[Connection, Sequence["NewJob"]], None]

JOBS = cast(Table, Job.__table__)
BRANCHES = cast(Table, Branch.__table__)
_ACTIVE = (BranchState.PENDING, BranchState.RUNNING)
_STOPPED = (BranchState.TIMED_OUT, BranchState.CANCELLED)
_NOW = bindparam("now", type_=UTCDateTime())
_JOB = bindparam("job", type_=Job.__table__.c.id.type)
_IDX = bindparam("idx", type_=Integer)
_RESULT = bindparam("b_result", type_=JSON)
_ERROR = bindparam("b_error", type_=Text)

# The hot path's statements are built once: constructing a statement costs about as much CPU as
# executing it, and branch tasks run these thousands of times a second across a worker.
_TASK_ID = bindparam("b_tid", type_=Branch.__table__.c.celery_task_id.type)
_TASK = bindparam("b_task", type_=Branch.__table__.c.task.type)
# A message may only move the branches it was sent for: the branch's recorded Celery task id and task
# name, not just (job, index), so a stray or forged message for another job's branch moves nothing.
_SENT_FOR = (Branch.celery_task_id == _TASK_ID, Branch.task == _TASK)
_START = (
    update(Branch)
    .where(Branch.job_id == _JOB, Branch.index == _IDX, Branch.state.in_(_ACTIVE), *_SENT_FOR)
    .values(state=BranchState.RUNNING, attempts=Branch.attempts + 1, started_at=_NOW)
    .returning(Branch.attempts)
)
_START_MANY = (
    update(Branch)
    .where(
        Branch.job_id == _JOB,
        Branch.index.in_(bindparam("idxs", expanding=True)),
        Branch.state.in_(_ACTIVE),
        *_SENT_FOR,
    )
    .values(state=BranchState.RUNNING, attempts=Branch.attempts + 1, started_at=_NOW)
    .returning(Branch.index, Branch.attempts)
)
_FINISH = (
    update(Branch)
    .where(Branch.job_id == _JOB, Branch.index == _IDX, Branch.state == BranchState.RUNNING, *_SENT_FOR)
    .values(state=bindparam("b_state"), result=_RESULT, error=_ERROR, finished_at=_NOW)
)
_FINISH_MANY = (
    update(Branch)
    .where(Branch.job_id == _JOB, Branch.index == _IDX, Branch.state == BranchState.RUNNING, *_SENT_FOR)
    .values(
        state=bindparam("b_state"),
        attempts=bindparam("b_attempts"),
        result=_RESULT,
        error=_ERROR,
        finished_at=_NOW,
    )
)
_LATE = (
    update(Branch)
    # or_ rather than in_: an expanding IN cannot be used in an executemany.
    .where(
        Branch.job_id == _JOB,
        Branch.index == _IDX,
        or_(Branch.state == _STOPPED[0], Branch.state == _STOPPED[1]),
        Branch.late.is_(False),
        *_SENT_FOR,
    )
    .values(late=True, result=_RESULT, error=func.coalesce(_ERROR, Branch.error))
)
_ADD_DONE = (
    update(Job).where(Job.id == _JOB).values(branch_done=Job.branch_done + bindparam("n", type_=Integer))
)
_RECOUNT_DONE = (
    update(Job)
    .where(Job.id == _JOB)
    .values(
        branch_done=select(func.count())
        .where(Branch.job_id == _JOB, Branch.state.not_in(_ACTIVE))
        .scalar_subquery()
    )
)
_BRANCHES = select(Branch.__table__).where(Branch.job_id == _JOB).order_by(Branch.index)
_JOB_ROW = select(Job.__table__).where(Job.id == _JOB)
_JOB_STATE = select(Job.state).where(Job.id == _JOB)


def _claim(states: Sequence[JobState]) -> Any:
    return (
        update(Job)
        .where(Job.id == _JOB, Job.state.in_(states))
        .values(state=JobState.AGGREGATING, branch_done=Job.branch_total)
        .returning(Job.fan_in, Job.min_success, Job.fan_in_timeout)
    )


_CLAIM = _claim((JobState.PENDING, JobState.RUNNING))
_CLAIM_AGAIN = _claim((JobState.PENDING, JobState.RUNNING, JobState.AGGREGATING))
_FINALIZE = (
    update(Job)
    .where(Job.id == _JOB, Job.state == JobState.AGGREGATING)
    .values(
        state=bindparam("j_state"),
        result=bindparam("j_result", type_=JSON),
        error=bindparam("j_error", type_=Text),
        finished_at=_NOW,
    )
)


@dataclass(frozen=True)
class NewBranch:
    task: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    celery_task_id: str | None = None  # chosen at submit, so a branch can be revoked before it starts


@dataclass(frozen=True)
class NewJob:
    """A validated job as the store records it; its id is chosen before the insert, so the messages
    and the chord join can name it in the same transaction."""

    id: uuid.UUID
    name: str | None
    fan_in: str
    branches: Sequence[NewBranch]
    idempotency_key: str | None = None
    deadline_at: datetime | None = None
    min_success: int | None = None
    fan_in_timeout: float | None = None


@dataclass(frozen=True)
class SentAs:
    """The Celery message a branch task runs for: its task id and task name. Only the message a branch
    was published as may start or finish it."""

    task_id: str
    task: str


@dataclass(frozen=True)
class Finished:
    """One branch's outcome, as a branch task records it."""

    index: int
    attempts: int
    state: BranchState
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class FanInClaim:
    """The job a fan-in (or the deadline) won, with the outcomes read in the same transaction."""

    fan_in: str
    min_success: int | None
    fan_in_timeout: float | None
    outcomes: tuple[BranchOutcome, ...] = ()


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
    #: Waits that may hold a pooled connection to LISTEN at once (a connection each, for the wait).
    LISTENERS = 8

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._listeners = threading.BoundedSemaphore(self.LISTENERS)

    @property
    def engine(self) -> Engine:
        return get_engine(self.database_url)

    # --- submit ------------------------------------------------------------------------------------

    def create_jobs(
        self, jobs: Sequence[NewJob], also: AlsoWithJobs | None = None, *, running: bool = False
    ) -> list[tuple[uuid.UUID, datetime | None]]:
        """Insert jobs and all their branches in one transaction, with `also` (the chord joins) in it too;
        returns (id, created_at) per job, in order, and created_at None where the idempotency key named an
        existing job (whose id is returned instead, and which is not inserted again). `also` is given the
        connection and the jobs inserted. `running`: record them running (started now) rather than
        pending, for a caller that publishes right after the commit and fails them if it cannot."""
        keys = [j.idempotency_key for j in jobs if j.idempotency_key is not None]
        for attempt in range(2):
            existing = self._jobs_with_keys(keys)
            fresh = []
            for j in jobs:  # one key twice in one call: the first job is the one
                if j.idempotency_key not in existing:
                    fresh.append(j)
                    if j.idempotency_key is not None:
                        existing[j.idempotency_key] = j.id
            now = utcnow()
            try:
                if fresh:
                    self._insert(fresh, now, also, running)
                break
            except IntegrityError:
                # Submits with one key raced past the check above: the unique key let one insert win. Read
                # the keys again; a second race on the same keys is not a race but a bug.
                if attempt or not keys:
                    raise
        inserted = {j.id for j in fresh}
        return [(j.id, now) if j.id in inserted else (existing[j.idempotency_key], None) for j in jobs]

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
    ) -> tuple[uuid.UUID, datetime | None]:
        """create_jobs for one job given by its fields (a new id): (id, created_at), created_at None when
        the idempotency key named an existing job."""
        job = NewJob(
            uuid.uuid4(), name, fan_in, branches, idempotency_key, deadline_at, min_success, fan_in_timeout
        )
        ((job_id, created_at),) = self.create_jobs([job])
        return job_id, created_at

    def _jobs_with_keys(self, keys: Sequence[str]) -> dict[str | None, uuid.UUID]:
        if not keys:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Job.idempotency_key, Job.id).where(Job.idempotency_key.in_(keys))
            ).all()
        return {key: job_id for key, job_id in rows}

    def _insert(
        self, jobs: Sequence[NewJob], now: datetime, also: AlsoWithJobs | None, running: bool
    ) -> None:
        rows = dialect(self.engine)
        with self.engine.begin() as conn:
            rows.insert_rows(
                conn,
                JOBS,
                [
                    {
                        "id": j.id,
                        "name": j.name,
                        "state": JobState.RUNNING if running else JobState.PENDING,
                        "started_at": now if running else None,
                        "fan_in": j.fan_in,
                        "idempotency_key": j.idempotency_key,
                        "deadline_at": j.deadline_at,
                        "min_success": j.min_success,
                        "fan_in_timeout": j.fan_in_timeout,
                        "branch_total": len(j.branches),
                        "branch_done": 0,
                        "created_at": now,
                    }
                    for j in jobs
                ],
            )
            rows.insert_rows(
                conn,
                BRANCHES,
                [
                    {
                        "job_id": j.id,
                        "index": i,
                        "task": b.task,
                        "queue": b.queue,
                        "args": {"args": b.args, "kwargs": b.kwargs},
                        "state": BranchState.PENDING,
                        "attempts": 0,
                        "celery_task_id": b.celery_task_id,
                        "late": False,
                    }
                    for j in jobs
                    for i, b in enumerate(j.branches)
                ],
            )
            if also is not None:
                also(conn, jobs)

    def mark_failed_to_publish(self, job_ids: Sequence[uuid.UUID], error: str) -> None:
        """pending | running -> failed, with every branch cancelled, for jobs whose messages could not be
        sent (whatever part of them went out finds its branch cancelled and runs nothing)."""
        now = utcnow()
        with self.engine.begin() as conn:
            for job_id in job_ids:  # the job row first, then its branches: the one lock order
                failed = conn.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state.in_((JobState.PENDING, JobState.RUNNING)))
                    .values(state=JobState.FAILED, error=error, finished_at=now)
                ).rowcount
                if failed:
                    self._stop_unfinished(conn, job_id, BranchState.CANCELLED, error, now)
                    notifications.announce(conn, job_id, JobState.FAILED)

    # --- branches ----------------------------------------------------------------------------------

    def start_branch(self, job_id: uuid.UUID, index: int, sent: SentAs) -> int | None:
        """Claim a branch for this attempt; None when its outcome is already recorded (a redelivery) or
        when `sent` is not the message the branch was published as (a stray or forged message)."""
        params = {"job": job_id, "idx": index, "now": utcnow(), "b_tid": sent.task_id, "b_task": sent.task}
        with self.engine.begin() as conn:
            attempt: int | None = conn.execute(_START, params).scalar_one_or_none()
        return attempt

    def start_branches(self, job_id: uuid.UUID, indexes: Sequence[int], sent: SentAs) -> dict[int, int]:
        """start_branch for a batch, in one statement: {index: attempt} of those not already final."""
        params = {
            "job": job_id,
            "idxs": list(indexes),
            "now": utcnow(),
            "b_tid": sent.task_id,
            "b_task": sent.task,
        }
        with self.engine.begin() as conn:
            rows = conn.execute(_START_MANY, params).all()
        return {index: attempts for index, attempts in rows}

    def finish_branches(
        self,
        job_id: uuid.UUID,
        sent: SentAs,
        outcomes: Sequence[Finished],
        also: AlsoInTransaction[T] | None = None,
    ) -> T | None:
        """Record a batch's outcomes once, in one transaction; a loser that arrives after a final move (the
        deadline, a cancel) is kept as a late result. `also` runs in the same transaction (the chord count
        of the batch's message); its value is returned.

        Lock order, as everywhere: the job row first, then its branch rows (expire, cancel and the fan-in
        claim do the same), so a finish racing the deadline waits instead of deadlocking. The job's
        counter is bumped first, optimistically, which takes that lock without an extra round trip; when
        some outcome lost, branch_done is recounted from the rows.
        """
        now = utcnow()
        rows = [
            {
                "job": job_id,
                "idx": o.index,
                "b_attempts": o.attempts,
                "b_state": o.state.value,
                "b_result": o.result,
                "b_error": o.error,
                "now": now,
                "b_tid": sent.task_id,
                "b_task": sent.task,
            }
            for o in sorted(outcomes, key=lambda o: o.index)  # one row order too, for two deliveries
        ]
        with self.engine.begin() as conn:
            conn.execute(_ADD_DONE, {"job": job_id, "n": len(rows)})
            won = conn.execute(_FINISH_MANY, rows).rowcount
            if not (conn.dialect.supports_sane_multi_rowcount and won == len(rows)):
                conn.execute(_LATE, rows)
                conn.execute(_RECOUNT_DONE, {"job": job_id})
            return also(conn) if also is not None else None

    def finish_branch(
        self,
        job_id: uuid.UUID,
        sent: SentAs,
        outcome: Finished,
        also: AlsoInTransaction[T] | None = None,
    ) -> tuple[bool, T | None]:
        """finish_branches for one branch (keeping the attempt count its start recorded). Returns (won,
        what `also` returned)."""
        params = {
            "job": job_id,
            "idx": outcome.index,
            "b_state": outcome.state.value,
            "b_result": outcome.result,
            "b_error": outcome.error,
            "now": utcnow(),
            "b_tid": sent.task_id,
            "b_task": sent.task,
        }
        with self.engine.begin() as conn:
            conn.execute(_ADD_DONE, {"job": job_id, "n": 1})  # the job row first: see finish_branches
            won = bool(conn.execute(_FINISH, params).rowcount)
            if not won:
                conn.execute(_LATE, params)
                conn.execute(_RECOUNT_DONE, {"job": job_id})
            return won, also(conn) if also is not None else None

    # --- fan-in ------------------------------------------------------------------------------------

    def claim_fan_in(self, job_id: uuid.UUID, *, redelivered: bool = False) -> FanInClaim | None:
        """running -> aggregating, with the outcomes to aggregate. A job still `pending` is claimable too:
        its chord ran, so it was published, whether or not the client has marked it yet. A redelivered
        fan-in may resume a job left aggregating by a dead worker."""
        claim = _CLAIM_AGAIN if redelivered else _CLAIM
        with self.engine.begin() as conn:
            row = conn.execute(claim, {"job": job_id}).one_or_none()
            if row is None:
                return None
            outcomes = self._outcomes(conn, job_id)
            if any(o.state in _ACTIVE for o in outcomes):
                # The chord body runs once every branch task has ended; one that ended without recording
                # an outcome (its task failed on an infrastructure error) is failed here, so no branch of
                # an aggregated job is left pending or running.
                error = "the branch's task ended without recording an outcome"
                self._stop_unfinished(conn, job_id, BranchState.FAILED, error, utcnow())
                outcomes = self._outcomes(conn, job_id)
            return FanInClaim(row.fan_in, row.min_success, row.fan_in_timeout, outcomes)

    def _stop_unfinished(
        self, conn: Any, job_id: uuid.UUID, state: BranchState, error: str, now: datetime
    ) -> list[StoppedBranch]:
        stopped = conn.execute(
            update(Branch)
            .where(Branch.job_id == job_id, Branch.state.in_(_ACTIVE))
            .values(state=state, error=error, finished_at=now)
            .returning(Branch.index, Branch.queue, Branch.celery_task_id, Branch.started_at)
        ).all()
        return [StoppedBranch(r.index, r.queue, r.celery_task_id, r.started_at is not None) for r in stopped]

    def expire(self, job_id: uuid.UUID) -> tuple[FanInClaim, list[StoppedBranch]] | None:
        """At the deadline: running -> aggregating, and every unfinished branch -> timed_out, atomically."""
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(_CLAIM, {"job": job_id}).one_or_none()
            if row is None:
                return None
            stopped = self._stop_unfinished(
                conn,
                job_id,
                BranchState.TIMED_OUT,
                "the job's deadline passed before the branch finished",
                now,
            )
            outcomes = self._outcomes(conn, job_id)
            return FanInClaim(row.fan_in, row.min_success, row.fan_in_timeout, outcomes), stopped

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
            notifications.announce(conn, job_id, JobState.CANCELLED)
            return self._stop_unfinished(conn, job_id, BranchState.CANCELLED, "the job was cancelled", now)

    @staticmethod
    def _outcomes(conn: Connection, job_id: uuid.UUID) -> tuple[BranchOutcome, ...]:
        views = [branch_view(r) for r in conn.execute(_BRANCHES, {"job": job_id}).all()]
        return tuple(BranchOutcome(v.index, v.task, v.state, v.result, v.error, v.duration) for v in views)

    def finalize(self, job_id: uuid.UUID, state: JobState, result: Any, error: str | None) -> bool:
        params = {
            "job": job_id,
            "j_state": state.value,
            "j_result": result,
            "j_error": error,
            "now": utcnow(),
        }
        with self.engine.begin() as conn:
            won = bool(conn.execute(_FINALIZE, params).rowcount)
            if won:
                notifications.announce(conn, job_id, state)
            return won

    # --- waiting for a final state -------------------------------------------------------------------

    @property
    def notifies(self) -> bool:
        """True when final moves are announced (PostgreSQL NOTIFY), so waiting needs no polling."""
        return dialect(self.engine).notifies

    def final_notifications(
        self, job_id: uuid.UUID
    ) -> AbstractContextManager[Callable[[float], bool] | None]:
        """LISTEN for the job's final move; yields wait(seconds) -> announced, or None when the database
        cannot announce, or when LISTENERS waits already hold a connection each (the rest poll)."""
        if not self.notifies or not self._listeners.acquire(blocking=False):
            return nullcontext()
        return notifications.listen(self.engine, job_id, release=self._listeners.release)

    # --- reads -------------------------------------------------------------------------------------

    def get(self, job_id: str | uuid.UUID, *, with_branches: bool = True) -> JobView:
        jid = parse_job_id(job_id)
        with self.engine.connect() as conn:
            job = conn.execute(_JOB_ROW, {"job": jid}).one_or_none()
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            branches = list(conn.execute(_BRANCHES, {"job": jid}).all()) if with_branches else []
        return job_view(job, branches)

    def state(self, job_id: str | uuid.UUID) -> str:
        jid = parse_job_id(job_id)
        with self.engine.connect() as conn:
            state: str | None = conn.execute(_JOB_STATE, {"job": jid}).scalar_one_or_none()
        if state is None:
            raise JobNotFound(f"no job {job_id}")
        return state

    def list(self, state: str | None = None, limit: int = 50) -> list[JobView]:
        query = select(Job.__table__).order_by(Job.created_at.desc()).limit(limit)
        if state is not None:
            query = query.where(Job.state == state)
        with self.engine.connect() as conn:
            return [job_view(row, []) for row in conn.execute(query).all()]

    def prune(self, older_than: timedelta) -> int:
        """Delete final jobs (and their branches) that finished before now - older_than. Unfinished jobs
        are never pruned, however old."""
        before = cutoff(older_than)
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    delete(Job).where(Job.finished_at < before, Job.state.in_(FINAL_JOB_STATES))
                ).rowcount
            )
