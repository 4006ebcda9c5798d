"""The stalled-work rescuer's SQL: heartbeats of running work, and the work found lost.

Celery cannot be trusted to hand back the work of a worker that died: Redis redelivers an unacked
message only after its visibility timeout (an hour by default), a paused worker holds RabbitMQ's
messages until its connection dies, and a message lost with a broker that kept nothing comes back
never (celery#6932, #3541, #7924). So every worker process heartbeats the rows it runs, in the
database's clock, and every worker sweeps for rows whose heartbeat is older than the stall timeout.
Each find is one conditional UPDATE that also renews the row's heartbeat, so of many sweeping
workers one takes each row, and it is not taken again before another stall timeout has passed.
The caller (`lifeline`, the Celery side) republishes what is returned; the store makes sure a lost
run that comes back records nothing (only the row's runner may finish it).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Engine,
    Float,
    Integer,
    String,
    and_,
    bindparam,
    case,
    literal,
    or_,
    select,
    update,
)

from .clock import db_now
from .models import Branch, BranchState, ChordCounter, Job, JobState

_JOB = bindparam("job", type_=Job.__table__.c.id.type)
_RUNNER = bindparam("b_runner", type_=String)
_STALL = bindparam("stall", type_=Float)
_STALE = db_now(_STALL)

_BEAT_BRANCHES = (
    update(Branch)
    .where(Branch.job_id == _JOB, Branch.runner == _RUNNER, Branch.state == BranchState.RUNNING)
    .values(heartbeat_at=db_now())
)
_BEAT_FAN_IN = (
    update(Job)
    .where(Job.id == _JOB, Job.runner == _RUNNER, Job.state == JobState.AGGREGATING)
    .values(heartbeat_at=db_now())
)
_SILENT = or_(Branch.heartbeat_at.is_(None), Branch.heartbeat_at < _STALE)
# The rows taken from a silent runner keep the reason their pool gave when it saw the process die.
_SILENT_REASON = case(
    (Branch.runner.is_(None), Branch.error),
    else_=literal("no heartbeat from its worker ")
    + Branch.runner
    + literal(" for ")
    + bindparam("stall_text", type_=String)
    + literal(" s"),
)
_TAKE_SILENT = (
    update(Branch)
    .where(Branch.state == BranchState.RUNNING, _SILENT)
    .values(runner=None, heartbeat_at=db_now(), error=_SILENT_REASON)
    .returning(Branch.job_id, Branch.index, Branch.task, Branch.queue, Branch.args, Branch.celery_task_id)
)
_UNFINISHED = Job.state.in_((JobState.RUNNING, JobState.AGGREGATING))
_QUEUED_IN_IDLE = (
    select(Branch.index)
    .where(
        Branch.job_id == Job.id,
        Branch.state == BranchState.PENDING,
        Branch.queue.in_(bindparam("idle_queues", expanding=True)),
    )
    .exists()
)
_JOB_DUE = and_(
    _UNFINISHED,
    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < _STALE),
    Job.started_at < _STALE,
    # Only jobs with something to do: their fan-in or their deadline is due, or a queued branch of
    # theirs is in a queue the caller saw idle (its message may be lost). A backlog of queued jobs is
    # not looked at while its queue is busy draining it, and a job is not taken (and so not put off for
    # another stall timeout) on the strength of another queue being idle.
    or_(
        Job.state == JobState.AGGREGATING,
        Job.branch_done >= Job.branch_total,
        Job.deadline_at < _STALE,
        _QUEUED_IN_IDLE,
    ),
)
_DUE = (
    update(Job)
    .where(
        Job.id.in_(select(Job.id).where(_JOB_DUE).limit(bindparam("limit", type_=Integer))),
        _JOB_DUE,
    )
    .values(
        heartbeat_at=db_now(),
        runner=case((Job.state == JobState.AGGREGATING, None), else_=Job.runner),
    )
    .returning(
        Job.id,
        Job.state,
        Job.branch_done,
        Job.branch_total,
        Job.deadline_at,
        Job.fan_in_timeout,
        Job.priority,
    )
)


# Jobs a broker connection loss may have stranded: running since before the loss (`since` seconds ago),
# not looked at since, a queued branch in a queue the caller saw empty. Their messages were lost with a
# broker that kept nothing, or were held by a worker that dropped them with the connection (a Redis
# broker hands those out again only after its visibility timeout).
_LOST_AT = db_now(bindparam("since", type_=Float))
_STRANDED = and_(
    Job.state == JobState.RUNNING,
    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < _LOST_AT),
    Job.started_at < _LOST_AT,
    _QUEUED_IN_IDLE,
)
_TAKE_STRANDED = (
    update(Job)
    .where(Job.id.in_(select(Job.id).where(_STRANDED).limit(bindparam("limit", type_=Integer))), _STRANDED)
    .values(heartbeat_at=db_now())
    .returning(Job.id)
)


def chord_group(job_id: uuid.UUID | str, run: int) -> str:
    """The group id of a job run's chord: the job's id for its first run, `id.N` for its Nth (a
    redrive's chord is a new join)."""
    return str(job_id) if run <= 1 else f"{job_id}.{run}"


@dataclass(frozen=True)
class LostMessage:
    """A branch message to publish again, with the same task id (so the chord counts it once): its job,
    task, queue, the branches still to run as `[index, args, kwargs]`, the job's deadline and priority,
    and the chord the message carried (None when the join is not the orchestrator's)."""

    job_id: uuid.UUID
    task: str
    queue: str
    task_id: str
    branches: list[list[Any]]
    deadline_at: datetime | None
    chord: dict[str, Any] | None
    group_id: str
    priority: int = 0


@dataclass(frozen=True)
class DueJob:
    """An unfinished job nobody has looked at for a stall timeout (see `Rescue.due_jobs`)."""

    id: uuid.UUID
    state: str
    complete: bool  # every branch has its outcome: the fan-in should have run
    deadline_at: datetime | None
    fan_in_timeout: float | None
    priority: int = 0


@dataclass
class Rescue:
    """Heartbeats and sweeps over one database, for one stall timeout."""

    engine: Engine
    stall_timeout: float
    _params: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self._params = {"stall": self.stall_timeout, "stall_text": f"{self.stall_timeout:g}"}

    def beat(self, runner: str, branch_jobs: Sequence[uuid.UUID], fan_in_jobs: Sequence[uuid.UUID]) -> None:
        """Renew the heartbeat of what `runner` runs now: its running branches of these jobs, and these
        jobs' fan-ins; one round trip for each kind."""
        with self.engine.begin() as conn:
            if branch_jobs:
                conn.execute(
                    _BEAT_BRANCHES, [{"job": j, "b_runner": runner} for j in sorted(set(branch_jobs))]
                )
            if fan_in_jobs:
                conn.execute(_BEAT_FAN_IN, [{"job": j, "b_runner": runner} for j in sorted(set(fan_in_jobs))])

    def silent_branches(self) -> list[LostMessage]:
        """Take the running branches whose heartbeat is older than the stall timeout away from their
        runner, and return their messages to publish again."""
        with self.engine.begin() as conn:
            rows = conn.execute(_TAKE_SILENT, self._params).all()
            return self._messages(conn, rows)

    def due_jobs(self, *, idle_queues: Sequence[str] = (), limit: int = 200) -> list[DueJob]:
        """Unfinished jobs started more than a stall timeout ago and not looked at for as long, at most
        `limit`, each taken for this sweep by renewing its heartbeat (a job aggregating loses its silent
        runner: its fan-in is to be published again). Jobs only waiting for their queued branches are
        included when one of those branches is in one of `idle_queues` (the caller saw them empty)."""
        params = {**self._params, "limit": limit, "idle_queues": list(idle_queues)}
        with self.engine.begin() as conn:
            rows = conn.execute(_DUE, params).all()
        return [
            DueJob(
                r.id, r.state, r.branch_done >= r.branch_total, r.deadline_at, r.fan_in_timeout, r.priority
            )
            for r in rows
        ]

    def stranded_jobs(self, since: float, *, idle_queues: Sequence[str], limit: int = 200) -> list[uuid.UUID]:
        """Jobs a broker connection lost `since` seconds ago may have stranded (see `_STRANDED`), at most
        `limit`, each taken by renewing its heartbeat: of the workers that reconnect, one publishes their
        queued branches again, a stall timeout sooner than the sweep would."""
        params = {"since": since, "limit": limit, "idle_queues": list(idle_queues)}
        with self.engine.begin() as conn:
            return list(conn.execute(_TAKE_STRANDED, params).scalars())

    def queued_branches(self, job_ids: Sequence[uuid.UUID]) -> list[LostMessage]:
        """The messages of these jobs' queued branches, to publish again where their queue is empty
        (a message lost with a broker that kept nothing, or with a client that died before publishing)."""
        if not job_ids:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    Branch.job_id, Branch.index, Branch.task, Branch.queue, Branch.args, Branch.celery_task_id
                ).where(Branch.job_id.in_(list(job_ids)), Branch.state == BranchState.PENDING)
            ).all()
            return self._messages(conn, rows)

    @staticmethod
    def _messages(conn: Any, rows: Sequence[Any]) -> list[LostMessage]:
        if not rows:
            return []
        jobs = {
            j.id: j
            for j in conn.execute(
                select(Job.id, Job.deadline_at, Job.priority, Job.run).where(
                    Job.id.in_({r.job_id for r in rows})
                )
            ).all()
        }
        groups = {job_id: chord_group(job_id, job.run) for job_id, job in jobs.items()}
        chords = dict(
            conn.execute(
                select(ChordCounter.group_id, ChordCounter.body).where(
                    ChordCounter.group_id.in_(list(groups.values()))
                )
            ).all()
        )
        grouped: dict[tuple[uuid.UUID, str], list[Any]] = {}
        for r in sorted(rows, key=lambda r: (str(r.job_id), r.index)):
            grouped.setdefault((r.job_id, r.celery_task_id or ""), []).append(r)
        return [
            LostMessage(
                job_id=job_id,
                task=group[0].task,
                queue=group[0].queue,
                task_id=task_id,
                branches=[[r.index, r.args["args"], r.args["kwargs"]] for r in group],
                deadline_at=jobs[job_id].deadline_at,
                chord=chords.get(groups[job_id]),
                group_id=groups[job_id],
                priority=jobs[job_id].priority,
            )
            for (job_id, task_id), group in grouped.items()
            if task_id
        ]
