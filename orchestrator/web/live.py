"""Live updates of a running job as server-sent events, without blocking the event loop.

Progress (branches done) is not announced by the store, so the stream reads the job's row, one
primary-key read in a worker thread, every `interval`. The final move is: on PostgreSQL the stream
LISTENs on the job's NOTIFY channel (notifications.channel) over psycopg's async connection, LISTEN first
and read after, so a move committed in between is not missed, and the final state reaches the page as it
commits instead of at the next read. On SQLite, or past `Listeners.limit` streams at once, it reads only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import psycopg
from sqlalchemy.engine import make_url
from starlette.concurrency import run_in_threadpool

from .. import database, notifications
from ..errors import JobNotFound
from .reads import Progress, WebReads

#: wait(seconds) -> True when the final move was announced within them.
Wait = Callable[[float], Awaitable[bool]]


@dataclass
class Listeners:
    """How many streams may hold a PostgreSQL connection for LISTEN at once; the rest read only. Used
    on the event loop's thread alone, so a plain counter is safe."""

    limit: int = 32
    in_use: int = 0


def listen_conninfo(database_url: str) -> str | None:
    """The psycopg connection string where the final moves of `database_url` can be heard (its direct
    URL behind a transaction pooler: ORCH_LISTEN_DATABASE_URL), else None (the stream reads only)."""
    where = database.listen_url(database_url)
    if where is None:
        return None
    return make_url(where).set(drivername="postgresql").render_as_string(hide_password=False)


@asynccontextmanager
async def final_moves(
    conninfo: str | None, job_id: uuid.UUID, listeners: Listeners
) -> AsyncIterator[Wait | None]:
    """LISTEN for the job's final move; yields wait(seconds), or None when the stream must read only."""
    if conninfo is None or listeners.in_use >= listeners.limit:
        yield None
        return
    listeners.in_use += 1
    try:
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        except psycopg.Error:
            conn = None  # the reads will tell the truth; they fail loudly if the database is gone
        if conn is None:
            yield None
            return
        async with conn:
            await conn.execute(f'LISTEN "{notifications.channel(job_id)}"')

            async def wait(seconds: float) -> bool:
                async for _ in conn.notifies(timeout=max(seconds, 0.0), stop_after=1):
                    return True
                return False

            yield wait
    finally:
        listeners.in_use -= 1


def event(name: str, data: object) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def job_events(
    reads: WebReads,
    job_id: uuid.UUID,
    *,
    conninfo: str | None,
    listeners: Listeners,
    interval: float = 0.5,
    heartbeat: float = 15.0,
    lifetime: float = 600.0,
) -> AsyncIterator[str]:
    """`progress` whenever the job's state or counter changed, then `final` once, and the stream ends.
    A comment every `heartbeat` seconds keeps proxies from closing an idle stream; after `lifetime` the
    stream ends and the browser's EventSource reconnects (a fresh read, a fresh LISTEN)."""
    yield "retry: 2000\n\n"
    started = last_sent = time.monotonic()
    last: Progress | None = None
    async with final_moves(conninfo, job_id, listeners) as announced:
        while True:
            try:
                now = await run_in_threadpool(reads.progress, job_id)
            except JobNotFound:
                yield event("final", {"state": "gone", "done": 0, "total": 0, "final": True})
                return
            if now != last:
                yield event("final" if now.final else "progress", now.as_dict())
                last, last_sent = now, time.monotonic()
                if now.final:
                    return
            elif time.monotonic() - last_sent >= heartbeat:
                yield ": still running\n\n"
                last_sent = time.monotonic()
            if time.monotonic() - started >= lifetime:
                return
            if announced is not None:
                await announced(interval)
            else:
                await anyio.sleep(interval)
