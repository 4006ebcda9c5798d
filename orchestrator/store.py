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
    Float,
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from . import admission, notifications
from .clock import db_now
from .database import dialect, get_engine
from .errors import JobNotFound
from .models import (
    FINAL_JOB_STATES,
    Branch,
    BranchState,
    Job,
    JobState,
    UTCDateTime,
    cutoff,
    utcnow,
)
from .runners import Runner, this_process
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
_RUNNER = bindparam("b_runner", type_=Branch.__table__.c.runner.type)
#: Seconds without a heartbeat after which a run is presumed lost (ORCH_STALL_TIMEOUT).
_STALL = bindparam("stall", type_=Float)
_STALE = db_now(_STALL)
# A branch a message may start: queued, or running for a runner that is lost (its heartbeat is older than
# the stall timeout, or its worker process marked it lost). A duplicate delivery of a message whose
# branch runs on a live worker starts nothing.
_TAKEABLE = or_(
    Branch.state == BranchState.PENDING,
    and_(
        Branch.state == BranchState.RUNNING,
        or_(Branch.runner.is_(None), Branch.heartbeat_at.is_(None), Branch.heartbeat_at < _STALE),
    ),
)
_TAKE_FROM = and_(Branch.state == BranchState.RUNNING, Branch.runner == bindparam("lost_runner"))
_STARTED = {
    "state": BranchState.RUNNING,
    "attempts": Branch.attempts + 1,
    "started_at": _NOW,
    "runner": _RUNNER,
    "heartbeat_at": db_now(),
    # The old state (SET sees the row as it was): starting a running branch takes over a lost run.
    "lost_runs": Branch.lost_runs + case((Branch.state == BranchState.RUNNING, 1), else_=0),
}
_STARTED_ROW = (Branch.index, Branch.attempts, Branch.lost_runs, Branch.error)


def _start(*where: Any) -> Any:
    return (
        update(Branch)
        .where(Branch.job_id == _JOB, Branch.index.in_(bindparam("idxs", expanding=True)), *_SENT_FOR, *where)
        .values(**_STARTED)
        .returning(*_STARTED_ROW)
    )


_START = (
    update(Branch)
    .where(Branch.job_id == _JOB, Branch.index == _IDX, _TAKEABLE, *_SENT_FOR)
    .values(**_STARTED)
    .returning(*_STARTED_ROW)
)
_START_MANY = _start(_TAKEABLE)
# A retried message takes its branches back from its own earlier run, which ended with an error before
# recording them; that run was not lost with its process, so lost_runs stays.
_START_RETRIED = (
    update(Branch)
    .where(
        Branch.job_id == _JOB,
        Branch.index.in_(bindparam("idxs", expanding=True)),
        Branch.state.in_(_ACTIVE),
        *_SENT_FOR,
    )
    .values(**{**_STARTED, "lost_runs": Branch.lost_runs})
    .returning(*_STARTED_ROW)
)
_START_LOST = _start(_TAKE_FROM)
_BUSY = select(Branch.runner).where(
    Branch.job_id == _JOB,
    Branch.index.in_(bindparam("idxs", expanding=True)),
    Branch.state == BranchState.RUNNING,
    Branch.runner.is_not(None),
    *_SENT_FOR,
)
# Only the run that holds the branch records its outcome: a worker that was paused while its branch was
# taken over finds another runner on the row and writes nothing.
_HOLDS = Branch.runner.is_not_distinct_from(_RUNNER)
_FINISH = (
    update(Branch)
    .where(
        Branch.job_id == _JOB, Branch.index == _IDX, Branch.state == BranchState.RUNNING, _HOLDS, *_SENT_FOR
    )
    .values(state=bindparam("b_state"), result=_RESULT, error=_ERROR, finished_at=_NOW)
)
_FINISH_MANY = (
    update(Branch)
    .where(
        Branch.job_id == _JOB, Branch.index == _IDX, Branch.state == BranchState.RUNNING, _HOLDS, *_SENT_FOR
    )
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
_STILL_ACTIVE = select(func.count()).where(
    Branch.job_id == _JOB, Branch.index.in_(bindparam("idxs", expanding=True)), Branch.state.in_(_ACTIVE)
)
# A cpu branch's retry goes back through the broker: the branch is queued again, so the retry's delivery
# starts it like any queued branch.
_REQUEUE = (
    update(Branch)
    .where(
        Branch.job_id == _JOB, Branch.index == _IDX, Branch.state == BranchState.RUNNING, _HOLDS, *_SENT_FOR
    )
    .values(state=BranchState.PENDING, runner=None)
)
_BRANCHES = select(Branch.__table__).where(Branch.job_id == _JOB).order_by(Branch.index)
_JOB_ROW = select(Job.__table__).where(Job.id == _JOB)
_JOB_STATE = select(Job.state).where(Job.id == _JOB)


def _claim(*where: Any, lost: bool = True) -> Any:
    return (
        update(Job)
        .where(Job.id == _JOB, *where)
        .values(
            state=JobState.AGGREGATING,
            branch_done=Job.branch_total,
            runner=_RUNNER,
            heartbeat_at=db_now(),
            # From aggregating (the old state): the fan-in takes over a run lost with its worker.
            lost_runs=Job.lost_runs + case((Job.state == JobState.AGGREGATING, 1), else_=0)
            if lost
            else Job.lost_runs,
        )
        .returning(Job.fan_in, Job.min_success, Job.fan_in_timeout, Job.lost_runs, Job.error)
    )


_UNCLAIMED = Job.state.in_((JobState.PENDING, JobState.RUNNING))
_CLAIM = _claim(_UNCLAIMED)
# A fan-in may also take a job whose aggregation was lost: marked so by its worker's pool, or silent for
# longer than the stall timeout. A duplicate delivery while a live worker aggregates takes nothing.
_CLAIM_OR_TAKE = _claim(
    or_(
        _UNCLAIMED,
        and_(
            Job.state == JobState.AGGREGATING,
            or_(Job.runner.is_(None), Job.heartbeat_at.is_(None), Job.heartbeat_at < _STALE),
        ),
    )
)
_CLAIM_LOST = _claim(Job.state == JobState.AGGREGATING, Job.runner == bindparam("lost_runner"))
# A fan-in retried after a database error takes back the claim its earlier run committed; that run ended
# with the error, it was not lost with its process.
_CLAIM_OWN = _claim(Job.state == JobState.AGGREGATING, Job.runner == _RUNNER, lost=False)
_AGGREGATED_BY = select(Job.runner).where(Job.id == _JOB, Job.state == JobState.AGGREGATING)
_FINALIZE = (
    update(Job)
    # Only the fan-in that holds the job: one paused past the stall timeout lost it and records nothing.
    .where(Job.id == _JOB, Job.state == JobState.AGGREGATING, Job.runner.is_not_distinct_from(_RUNNER))
    .values(
        state=bindparam("j_state"),
        result=bindparam("j_result", type_=JSON),
        error=bindparam("j_error", type_=Text),
        finished_at=_NOW,
    )
    .returning(Job.branch_total)
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
    priority: int = 0


@dataclass(frozen=True)
class SentAs:
    """The Celery message a branch task runs for: its task id and task name, and the worker process that
    runs it (`runners.Runner`, as text). Only the message a branch was published as may start it, and
    only the runner that started it may finish it."""

    task_id: str
    task: str
    runner: str | None = None
    #: Celery's retry of this message (request.retries > 0): the message's earlier run ended with an
    #: error before recording its outcome (a database outage), so the branches it left running are its
    #: own to take back at once, not a lost run.
    retried: bool = False


@dataclass(frozen=True)
class Finished:
    """One branch's outcome, as a branch task records it."""

    index: int
    attempts: int
    state: BranchState
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Started:
    """What a message found of its branches: those it runs now (index -> attempt number), and those to
    record failed without running them again, their worker having died too often (`poisoned`)."""

    attempts: dict[int, int]
    poisoned: tuple[Finished, ...] = ()


@dataclass(frozen=True)
class FanInClaim:
    """The job a fan-in (or the deadline) won, with the outcomes read in the same transaction. `lost`:
    why the job must end failed without aggregating (its fan-in's worker died too often)."""

    fan_in: str
    min_success: int | None
    fan_in_timeout: float | None
    outcomes: tuple[BranchOutcome, ...] = ()
    lost: str | None = None


@dataclass(frozen=True)
class StoppedBranch:
    """A branch the deadline or a cancel stopped: what is needed to revoke its message."""

    index: int
    queue: str
    celery_task_id: str | None
    was_running: bool


#: Longest error text stored (characters): a branch may raise with a message of any size, and every
#: reader of the job (the fan-in, `get`, the web view) would carry it.
ERROR_MAX = 4096


def clip(error: str | None) -> str | None:
    """An error text cut to ERROR_MAX characters, saying how much was cut."""
    if error is None or len(error) <= ERROR_MAX:
        return error
    return f"{error[:ERROR_MAX]}... [{len(error) - ERROR_MAX} more characters cut]"


def parse_job_id(job_id: str | uuid.UUID) -> uuid.UUID:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id))
    except ValueError:
        raise JobNotFound(f"no job {job_id!r}: not a job id") from None


def died_too_often(what: str, lost_runs: int, reason: str | None, max_deliveries: int) -> str:
    """The error of work whose worker died more often than ORCH_MAX_DELIVERIES allows."""
    last = f" (last: {reason})" if reason else ""
    return (
        f"{what}'s worker died while running it {lost_runs} times{last}; not run again "
        f"(ORCH_MAX_DELIVERIES={max_deliveries})"
    )


class Store:
    #: Waits that may hold a pooled connection to LISTEN at once (a connection each, for the wait).
    LISTENERS = 8

    def __init__(self, database_url: str, *, stall_timeout: float = 30.0, max_deliveries: int = 3) -> None:
        self.database_url = database_url
        self.stall_timeout = stall_timeout
        self.max_deliveries = max_deliveries
        self._listeners = threading.BoundedSemaphore(self.LISTENERS)

    @property
    def engine(self) -> Engine:
        return get_engine(self.database_url)

    # --- submit ------------------------------------------------------------------------------------

    def create_jobs(
        self,
        jobs: Sequence[NewJob],
        also: AlsoWithJobs | None = None,
        *,
        running: bool = False,
        limit: int = 0,
    ) -> list[tuple[uuid.UUID, datetime | None]]:
        """Insert jobs and all their branches in one transaction, with `also` (the chord joins) in it too;
        returns (id, created_at) per job, in order, and created_at None where the idempotency key named an
        existing job (whose id is returned instead, and which is not inserted again). `also` is given the
        connection and the jobs inserted. `running`: record them running (started now) rather than
        pending, for a caller that publishes right after the commit and fails them if it cannot. The
        branches inserted are admitted in the same transaction: with `limit` (ORCH_MAX_ACTIVE_BRANCHES;
        0: no bound) passed, `admission.Full` is raised and nothing is written."""
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
                    self._insert(fresh, now, also, running, limit)
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
        self, jobs: Sequence[NewJob], now: datetime, also: AlsoWithJobs | None, running: bool, limit: int
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
                        "priority": j.priority,
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
            requested = sum(len(j.branches) for j in jobs)
            if not admission.admit(conn, requested, limit):  # last: the row is locked until the commit
                raise admission.Full(admission.active(conn), requested)

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
                    .returning(Job.branch_total)
                ).scalar_one_or_none()
                if failed is not None:
                    admission.release(conn, failed)
                    self._stop_unfinished(conn, job_id, BranchState.CANCELLED, error, now)
                    notifications.announce(conn, job_id, JobState.FAILED)

    def admitted(self) -> int:
        """Branches admitted and unfinished, across every client (see `admission`)."""
        with self.engine.connect() as conn:
            return admission.active(conn)

    # --- branches ----------------------------------------------------------------------------------

    def _start_params(self, job_id: uuid.UUID, sent: SentAs) -> dict[str, Any]:
        return {
            "job": job_id,
            "now": utcnow(),
            "b_tid": sent.task_id,
            "b_task": sent.task,
            "b_runner": sent.runner or this_process(),
            "stall": self.stall_timeout,
        }

    def start_branch(self, job_id: uuid.UUID, index: int, sent: SentAs) -> Started:
        """Claim a branch for this run (see start_branches); one statement for the common case."""
        if sent.retried:
            return self.start_branches(job_id, [index], sent)
        params = {**self._start_params(job_id, sent), "idx": index}
        with self.engine.begin() as conn:
            rows = conn.execute(_START, params).all()
        if rows:
            return self._started(rows)
        return self.start_branches(job_id, [index], sent, taken_only=True)

    def start_branches(
        self, job_id: uuid.UUID, indexes: Sequence[int], sent: SentAs, *, taken_only: bool = False
    ) -> Started:
        """Claim a message's branches for this run, in one statement: those queued, and those whose run
        was lost (see `_TAKEABLE`). Not started: branches already final (a redelivery), running on a
        live worker (a duplicate delivery), or not sent as `sent` (a stray or forged message).

        A branch whose runner is a process of this host that no longer exists (a worker killed and
        restarted; the broker redelivered its messages at once) is taken over without waiting for its
        heartbeat to age: that costs a read, on the redelivery path only."""
        params = {**self._start_params(job_id, sent), "idxs": list(indexes)}
        with self.engine.begin() as conn:
            if sent.retried:
                return self._started(conn.execute(_START_RETRIED, params).all())
            rows = [] if taken_only else list(conn.execute(_START_MANY, params).all())
            me = Runner.parse(params["b_runner"])
            if len(rows) < len(indexes) and me is not None:
                gone = {
                    str(lost)
                    for (runner,) in conn.execute(_BUSY, params).all()
                    if (lost := Runner.parse(runner)) is not None and lost.is_gone(me)
                }
                for runner in sorted(gone):
                    rows += conn.execute(_START_LOST, {**params, "lost_runner": runner}).all()
        return self._started(rows)

    def _started(self, rows: Sequence[Any]) -> Started:
        attempts: dict[int, int] = {}
        poisoned = []
        for row in rows:
            if row.lost_runs > self.max_deliveries:
                error = died_too_often("the branch", row.lost_runs, row.error, self.max_deliveries)
                poisoned.append(Finished(row.index, row.attempts, BranchState.FAILED, None, error))
            else:
                attempts[row.index] = row.attempts
        return Started(attempts, tuple(poisoned))

    def requeue_branch(self, job_id: uuid.UUID, index: int, sent: SentAs) -> bool:
        """running -> pending for a branch whose retry goes back through the broker."""
        params = {**self._start_params(job_id, sent), "idx": index}
        with self.engine.begin() as conn:
            return bool(conn.execute(_REQUEUE, params).rowcount)

    def mark_lost(self, job_id: uuid.UUID, indexes: Sequence[int], task_id: str, reason: str) -> int:
        """The worker process running these branches died (its pool saw it): free them for the message's
        redelivery at once, saying why. Returns how many were running."""
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    update(Branch)
                    .where(
                        Branch.job_id == job_id,
                        Branch.index.in_(list(indexes)),
                        Branch.state == BranchState.RUNNING,
                        Branch.celery_task_id == task_id,
                    )
                    .values(runner=None, error=clip(reason))
                ).rowcount
            )

    def mark_fan_in_lost(self, job_id: uuid.UUID, reason: str) -> bool:
        """The worker process aggregating the job died: free it for the fan-in's redelivery at once."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.AGGREGATING)
                    .values(runner=None, error=clip(reason))
                ).rowcount
            )

    def finish_branches(
        self,
        job_id: uuid.UUID,
        sent: SentAs,
        outcomes: Sequence[Finished],
        also: AlsoInTransaction[T] | None = None,
        *,
        message: Sequence[int] | None = None,
    ) -> T | None:
        """Record a batch's outcomes once, in one transaction; a loser that arrives after a final move (the
        deadline, a cancel) is kept as a late result. `also` runs in the same transaction (the chord count
        of the batch's message, whose branch indexes are `message`; by default just these outcomes'); its
        value is returned. When some branch of the message is still active (another run of the message
        took it over: this one was presumed lost), `also` does not run: that run counts the message. The
        whole message is checked, not only these outcomes: a run whose last write wins or loses its own
        branches may have lost an earlier one to a run still going.

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
                "b_error": clip(o.error),
                "now": now,
                "b_tid": sent.task_id,
                "b_task": sent.task,
                "b_runner": sent.runner or this_process(),
            }
            for o in sorted(outcomes, key=lambda o: o.index)  # one row order too, for two deliveries
        ]
        written = [o.index for o in outcomes]
        with self.engine.begin() as conn:
            conn.execute(_ADD_DONE, {"job": job_id, "n": len(rows)})
            won = conn.execute(_FINISH_MANY, rows).rowcount
            all_won = conn.dialect.supports_sane_multi_rowcount and won == len(rows)
            if not all_won:
                conn.execute(_LATE, rows)
                conn.execute(_RECOUNT_DONE, {"job": job_id})
            if also is None:
                return None
            # Every outcome won and they are the whole message: nothing of it can be active (the common
            # case, one statement fewer).
            others = set(message or ()) - set(written)
            if (not all_won or others) and self._taken(conn, job_id, sorted(others.union(written))):
                return None
            return also(conn)

    @staticmethod
    def _taken(conn: Connection, job_id: uuid.UUID, indexes: Sequence[int]) -> bool:
        """True when some of these branches are active again: another run of their message holds them."""
        return bool(conn.execute(_STILL_ACTIVE, {"job": job_id, "idxs": list(indexes)}).scalar_one())

    def still_active(self, job_id: uuid.UUID, indexes: Sequence[int]) -> bool:
        """Whether some of these branches are pending or running (another run of their message holds
        them, or they wait for one)."""
        with self.engine.connect() as conn:
            return self._taken(conn, job_id, indexes)

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
            "b_error": clip(outcome.error),
            "now": utcnow(),
            "b_tid": sent.task_id,
            "b_task": sent.task,
            "b_runner": sent.runner or this_process(),
        }
        with self.engine.begin() as conn:
            conn.execute(_ADD_DONE, {"job": job_id, "n": 1})  # the job row first: see finish_branches
            won = bool(conn.execute(_FINISH, params).rowcount)
            if not won:
                conn.execute(_LATE, params)
                conn.execute(_RECOUNT_DONE, {"job": job_id})
                if self._taken(conn, job_id, [outcome.index]):
                    return won, None
            return won, also(conn) if also is not None else None

    # --- fan-in ------------------------------------------------------------------------------------

    def claim_fan_in(
        self, job_id: uuid.UUID, runner: str | None = None, *, retried: bool = False
    ) -> FanInClaim | None:
        """running -> aggregating for `runner`, with the outcomes to aggregate. A job still `pending` is
        claimable too: its chord ran, so it was published. A job whose aggregation was lost with its
        worker is taken over (see `_CLAIM_OR_TAKE`, and start_branches for a runner gone from this host);
        after more than ORCH_MAX_DELIVERIES such losses the claim carries `lost`, and the job must end
        failed without aggregating. A `retried` fan-in (Celery's retry after a database error) takes back
        the claim its earlier run made for the same runner."""
        runner = runner or this_process()
        params = {"job": job_id, "b_runner": runner, "stall": self.stall_timeout}
        with self.engine.begin() as conn:
            row = conn.execute(_CLAIM_OR_TAKE, params).one_or_none()
            if row is None and retried:
                row = conn.execute(_CLAIM_OWN, params).one_or_none()
            me = Runner.parse(runner)
            if row is None and me is not None:
                holder = Runner.parse(conn.execute(_AGGREGATED_BY, params).scalar_one_or_none())
                if holder is not None and holder.is_gone(me):
                    row = conn.execute(_CLAIM_LOST, {**params, "lost_runner": str(holder)}).one_or_none()
            if row is None:
                return None
            if row.lost_runs > self.max_deliveries:
                lost = died_too_often("the fan-in", row.lost_runs, row.error, self.max_deliveries)
                return FanInClaim(row.fan_in, row.min_success, row.fan_in_timeout, (), lost)
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

    def expire(
        self, job_id: uuid.UUID, runner: str | None = None
    ) -> tuple[FanInClaim, list[StoppedBranch]] | None:
        """At the deadline: running -> aggregating (for `runner`, which aggregates at once), and every
        unfinished branch -> timed_out, atomically."""
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(_CLAIM, {"job": job_id, "b_runner": runner or this_process()}).one_or_none()
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
            total = conn.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_((JobState.PENDING, JobState.RUNNING)))
                .values(
                    state=JobState.CANCELLED, finished_at=now, error="cancelled", branch_done=Job.branch_total
                )
                .returning(Job.branch_total)
            ).scalar_one_or_none()
            if total is None:
                return None
            admission.release(conn, total)
            notifications.announce(conn, job_id, JobState.CANCELLED)
            return self._stop_unfinished(conn, job_id, BranchState.CANCELLED, "the job was cancelled", now)

    @staticmethod
    def _outcomes(conn: Connection, job_id: uuid.UUID) -> tuple[BranchOutcome, ...]:
        views = [branch_view(r) for r in conn.execute(_BRANCHES, {"job": job_id}).all()]
        return tuple(BranchOutcome(v.index, v.task, v.state, v.result, v.error, v.duration) for v in views)

    def finalize(
        self, job_id: uuid.UUID, state: JobState, result: Any, error: str | None, runner: str | None = None
    ) -> bool:
        """aggregating -> final, for the runner that claimed the job (None: claimed without one)."""
        params = {
            "job": job_id,
            "j_state": state.value,
            "j_result": result,
            "j_error": clip(error),
            "now": utcnow(),
            "b_runner": runner or this_process(),
        }
        with self.engine.begin() as conn:
            total = conn.execute(_FINALIZE, params).scalar_one_or_none()
            if total is None:
                return False
            admission.release(conn, total)  # the job gives its branches back
            notifications.announce(conn, job_id, state)
            return True

    # --- waiting for a final state -------------------------------------------------------------------

    @property
    def notifies(self) -> bool:
        """True when this client can LISTEN for the final moves announced (PostgreSQL NOTIFY), so waiting
        needs no polling; not through a transaction pooler without ORCH_LISTEN_DATABASE_URL."""
        return notifications.listener_engine(self.database_url) is not None

    def final_notifications(
        self, job_id: uuid.UUID
    ) -> AbstractContextManager[Callable[[float], bool] | None]:
        """LISTEN for the job's final move; yields wait(seconds) -> announced, or None when this client
        cannot LISTEN (see `notifies`), or when LISTENERS waits already hold a connection each (the rest
        poll)."""
        engine = notifications.listener_engine(self.database_url)
        if engine is None or not self._listeners.acquire(blocking=False):
            return nullcontext()
        return notifications.listen(engine, job_id, release=self._listeners.release)

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
