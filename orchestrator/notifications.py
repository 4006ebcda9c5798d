"""Final job states announced with PostgreSQL NOTIFY, so a client waits for a job without polling.

The announcement is part of the transaction that makes the move (delivered at commit); a waiter LISTENs on
the job's own channel first and reads the row after, so a move committed in between is not missed.

A NOTIFY sent through a transaction pooler (PgBouncer, pool_mode=transaction) still reaches listeners,
but a LISTEN through one does not stay on any server connection: waiters then LISTEN on the direct URL
`ORCH_LISTEN_DATABASE_URL` names, or poll (`database.listen_url`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine

from .database import dialect, get_engine, listen_url


def channel(job_id: uuid.UUID) -> str:
    return f"orchestrator_job_{job_id.hex}"


def announce(conn: Connection, job_id: uuid.UUID, state: str) -> None:
    """Inside the transaction that makes a job final; a no-op where the database has no NOTIFY."""
    dialect(conn).notify(conn, channel(job_id), str(state))


def listener_engine(database_url: str) -> Engine | None:
    """The engine to LISTEN on for what `database_url`'s transactions announce; None: waiters poll."""
    url = listen_url(database_url)
    return None if url is None else get_engine(url)


@contextmanager
def listen(
    engine: Engine, job_id: uuid.UUID, release: Callable[[], None] = lambda: None
) -> Iterator[Callable[[float], bool]]:
    """LISTEN for the job's final move on a pooled connection; yields wait(seconds) -> announced?
    `release` is called once the connection is back in the pool."""
    try:
        raw = engine.raw_connection()
    except BaseException:
        release()
        raise
    pg: Any = raw.driver_connection
    name = channel(job_id)
    try:
        pg.autocommit = True
        pg.execute(f'LISTEN "{name}"')

        def wait(seconds: float) -> bool:
            return any(True for _ in pg.notifies(timeout=max(seconds, 0.0), stop_after=1))

        yield wait
    finally:
        try:
            pg.execute(f'UNLISTEN "{name}"')
            pg.autocommit = False
        finally:
            raw.close()
            release()
