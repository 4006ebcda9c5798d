"""Backpressure at submit: how many branches are admitted and unfinished, in one row every client sees.

A submit raises the count in the transaction that records its jobs, as the transaction's last statement,
and only if the result stays within the bound (`ORCH_MAX_ACTIVE_BRANCHES`): the bound holds across any
number of client processes, costs one statement, and holds the row's lock only for the commit. A job
gives its branches back in the transaction that ends it (finalize, cancel, a failed publish), so nothing
leaks when a process dies between the two. The count is kept with no bound set too, so a bound can be
set at any time.

Why a SQL row rather than the broker's queue depth: the queues hold messages (a batch carries up to
ORCH_IO_CHUNK_SIZE branches), not branches; a depth read is a broker round trip that does not see what
workers have prefetched or what is being retried; and it cannot be raised atomically with the submit,
so two producers reading the same depth would both push.
"""

from __future__ import annotations

from sqlalchemy import Connection, Integer, bindparam, case, select, update

from .models import Admission

#: The one admission row: unfinished branches.
BRANCHES = "branches"
_N = bindparam("n", type_=Integer)
_ROW = Admission.name == BRANCHES
_ADMIT = (
    update(Admission)
    .where(_ROW, Admission.active + _N <= bindparam("limit", type_=Integer))
    .values(active=Admission.active + _N)
    .returning(Admission.active)
)
_TAKE = update(Admission).where(_ROW).values(active=Admission.active + _N).returning(Admission.active)
# Never below zero: jobs left unfinished by a version without admission give theirs back too.
_RELEASE = (
    update(Admission).where(_ROW).values(active=case((Admission.active > _N, Admission.active - _N), else_=0))
)
_ACTIVE = select(Admission.active).where(_ROW)


def admit(conn: Connection, n: int, limit: int) -> bool:
    """Raise the count by `n` if it stays within `limit` (0: no bound), in the caller's transaction."""
    if n <= 0:
        return True
    if limit <= 0:
        return conn.execute(_TAKE, {"n": n}).first() is not None
    return conn.execute(_ADMIT, {"n": n, "limit": limit}).first() is not None


def release(conn: Connection, n: int) -> None:
    """Lower the count by `n` (a job ended), in the transaction that ends it."""
    if n > 0:
        conn.execute(_RELEASE, {"n": n})


def active(conn: Connection) -> int:
    return int(conn.execute(_ACTIVE).scalar_one_or_none() or 0)


class Full(Exception):
    """Admitting `requested` branches would pass the bound: `active` are admitted and unfinished."""

    def __init__(self, active: int, requested: int) -> None:
        super().__init__(f"{active} branches active, {requested} more requested")
        self.active = active
        self.requested = requested
