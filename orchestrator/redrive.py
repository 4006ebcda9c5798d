"""The redrive: a final job's chosen branches run again, in one transaction. Its run and those branches'
outcomes go to the history tables first, so nothing of the earlier run is lost; the branches are queued
again under new messages; the job is running its next run, with a new chord join.

Of concurrent redrives of one job one wins: the job row is locked (PostgreSQL) or the database is
(SQLite), the conditional UPDATE of its state and run lets one through, and a loser that got as far
as the history insert meets the winner's row on its primary key.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from . import admission
from .errors import JobNotFinal, JobNotFound, NothingToRetry
from .models import Branch, BranchHistory, BranchState, Job, JobHistory, JobState, utcnow
from .store import JOBS, AlsoInTransaction, NewBranch, Store, parse_job_id

_REDRIVABLE = (JobState.SUCCEEDED, JobState.PARTIAL, JobState.FAILED)


@dataclass(frozen=True)
class Redrive:
    """What a redrive sends, planned inside its transaction: each chosen branch's new message task id,
    the job's new deadline, what else to write (the new run's chord join), and the caller's plan."""

    task_ids: dict[int, str]
    deadline_at: datetime | None
    also: AlsoInTransaction[Any] | None
    outgoing: Any = None


def redrive(
    store: Store,
    job_id: uuid.UUID,
    states: Sequence[str],
    prepare: Callable[[Any, dict[int, NewBranch]], Redrive],
    *,
    limit: int = 0,
) -> Redrive:
    """Run a final job's branches in `states` again, in one transaction: the job's run and those
    branches' outcomes are kept in the history tables, the branches are queued again under the
    messages `prepare` plans for them (given the job's row and the branches by index), and the job is
    running its next run. Of concurrent redrives of one job one wins; the others raise JobNotFinal.
    The job's branches are admitted again (`limit`: ORCH_MAX_ACTIVE_BRANCHES)."""
    now = utcnow()
    try:
        with store.engine.begin() as conn:
            job = conn.execute(select(JOBS).where(Job.id == job_id).with_for_update()).one_or_none()
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            if job.state not in _REDRIVABLE:
                raise JobNotFinal(
                    f"job {job_id} is {job.state}: only a succeeded, partial or failed job is retried"
                )
            rows = conn.execute(
                select(Branch.index, Branch.task, Branch.queue, Branch.args)
                .where(Branch.job_id == job_id, Branch.state.in_(list(states)))
                .order_by(Branch.index)
            ).all()
            if not rows:
                raise NothingToRetry(f"no branch of job {job_id} is {' or '.join(states)}")
            chosen = {
                index: NewBranch(task, queue, args["args"], args["kwargs"])
                for index, task, queue, args in rows
            }
            redrive = prepare(job, chosen)
            conn.execute(
                insert(JobHistory).from_select(
                    ["job_id", "run", "state", "started_at", "finished_at", "result", "error"],
                    select(
                        Job.id, Job.run, Job.state, Job.started_at, Job.finished_at, Job.result, Job.error
                    ).where(Job.id == job_id),
                )
            )
            conn.execute(
                insert(BranchHistory).from_select(
                    [
                        "job_id",
                        "index",
                        "run",
                        "state",
                        "attempts",
                        "started_at",
                        "finished_at",
                        "result",
                        "error",
                    ],
                    select(
                        Branch.job_id,
                        Branch.index,
                        Branch.run,
                        Branch.state,
                        Branch.attempts,
                        Branch.started_at,
                        Branch.finished_at,
                        Branch.result,
                        Branch.error,
                    ).where(Branch.job_id == job_id, Branch.index.in_(list(chosen))),
                )
            )
            won = conn.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == job.state, Job.run == job.run)
                .values(
                    state=JobState.RUNNING,
                    run=Job.run + 1,
                    started_at=now,
                    finished_at=None,
                    result=None,
                    error=None,
                    runner=None,
                    heartbeat_at=None,
                    lost_runs=0,
                    deadline_at=redrive.deadline_at,
                    branch_done=Job.branch_done - len(chosen),
                )
            ).rowcount
            if not won:
                raise JobNotFinal(f"job {job_id} was retried by another caller first")
            conn.execute(
                update(Branch)
                .where(Branch.job_id == bindparam("job"), Branch.index == bindparam("idx"))
                .values(
                    state=BranchState.PENDING,
                    run=job.run + 1,
                    attempts=0,
                    celery_task_id=bindparam("b_tid"),
                    started_at=None,
                    finished_at=None,
                    result=None,
                    error=None,
                    late=False,
                    runner=None,
                    heartbeat_at=None,
                    lost_runs=0,
                ),
                [
                    {"job": job_id, "idx": m_index, "b_tid": task_id}
                    for m_index, task_id in sorted(redrive.task_ids.items())
                ],
            )
            if redrive.also is not None:
                redrive.also(conn)
            if not admission.admit(conn, job.branch_total, limit):
                raise admission.Full(admission.active(conn), job.branch_total)
    except IntegrityError:
        # A concurrent redrive kept the same run's history first (PostgreSQL serializes the two on
        # the history's primary key before the job's conditional UPDATE would).
        raise JobNotFinal(f"job {job_id} was retried by another caller first") from None
    return redrive


def history(store: Store, job_id: str | uuid.UUID) -> tuple[list[Any], list[Any]]:
    """The job's earlier runs and its branches' earlier outcomes (rows), oldest first."""
    jid = parse_job_id(job_id)
    with store.engine.connect() as conn:
        runs = conn.execute(
            select(JobHistory.__table__).where(JobHistory.job_id == jid).order_by(JobHistory.run)
        ).all()
        branches = conn.execute(
            select(BranchHistory.__table__)
            .where(BranchHistory.job_id == jid)
            .order_by(BranchHistory.index, BranchHistory.run)
        ).all()
    return list(runs), list(branches)
