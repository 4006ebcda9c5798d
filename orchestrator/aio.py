"""AsyncOrchestrator: the Orchestrator for asyncio programs (FastAPI, aiohttp), never blocking the loop.

SQLAlchemy's engine and kombu's producer are synchronous, and a submit is a few milliseconds of their
work: it runs on a small thread pool of its own, so the loop only awaits. Waiting is where an asyncio
program spends its time, so `wait` holds no thread at all on PostgreSQL: it LISTENs with psycopg's
async connection (one for all its waits) for the NOTIFY the store sends in the transaction that makes a job
final.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from sqlalchemy.engine import make_url

from . import database, notifications
from .api import BranchSpec, JobSpec, Orchestrator
from .errors import WaitTimeout
from .models import FINAL_JOB_STATES, RETRY_STATES
from .settings import Settings
from .store import parse_job_id
from .views import BreakerView, HistoryView, JobView

T = TypeVar("T")


class AsyncOrchestrator:
    """Awaitable `submit`, `submit_many`, `get`, `wait`, `list`, `cancel`, `breakers`, `reset_breaker`,
    with the Orchestrator's arguments and errors. Create it once per process, like an Orchestrator; its
    first call sets it up (checking the schema) in its threads. `await orc.close()` frees them."""

    def __init__(
        self, settings: Settings | None = None, *, migrate: bool | None = None, threads: int = 4
    ) -> None:
        self._settings = settings
        self._migrate = migrate
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="orchestrator-aio")
        self._sync: Orchestrator | None = None
        self._opening: asyncio.Lock | None = None
        self._listener: _Listener | None = None

    async def _orchestrator(self) -> Orchestrator:
        if self._sync is None:
            self._opening = self._opening or asyncio.Lock()
            async with self._opening:
                if self._sync is None:
                    if self._settings is not None:  # its pool, pooler and LISTEN URL, not the environment's
                        database.configure(self._settings)
                    self._sync = await self._run(Orchestrator, self._settings, migrate=self._migrate)
        return self._sync

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kwargs)
        )

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        orc = await self._orchestrator()
        return await self._run(getattr(orc, method), *args, **kwargs)

    @property
    def settings(self) -> Settings:
        return self._sync.settings if self._sync is not None else (self._settings or Settings.from_env())

    async def submit(
        self,
        branches: Sequence[BranchSpec],
        fan_in: str,
        name: str | None = None,
        *,
        deadline: float | None = None,
        min_success: int | None = None,
        fan_in_timeout: float | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        block: bool = True,
        block_timeout: float | None = None,
    ) -> JobView:
        """See `Orchestrator.submit` (a blocked submit waits on this client's threads, not the loop)."""
        view: JobView = await self._call(
            "submit",
            branches,
            fan_in,
            name,
            deadline=deadline,
            min_success=min_success,
            fan_in_timeout=fan_in_timeout,
            idempotency_key=idempotency_key,
            priority=priority,
            block=block,
            block_timeout=block_timeout,
        )
        return view

    async def submit_many(
        self, specs: Sequence[JobSpec], *, block: bool = True, block_timeout: float | None = None
    ) -> list[JobView]:
        """See `Orchestrator.submit_many`."""
        views: list[JobView] = await self._call(
            "submit_many", specs, block=block, block_timeout=block_timeout
        )
        return views

    async def retry(
        self, job_id: str, states: Sequence[str] = RETRY_STATES, *, deadline: float | None = None
    ) -> JobView:
        """See `Orchestrator.retry`."""
        view: JobView = await self._call("retry", job_id, states, deadline=deadline)
        return view

    async def history(self, job_id: str) -> HistoryView:
        """See `Orchestrator.history`."""
        view: HistoryView = await self._call("history", job_id)
        return view

    async def get(self, job_id: str) -> JobView:
        view: JobView = await self._call("get", job_id)
        return view

    async def list(self, state: str | None = None, limit: int = 50) -> list[JobView]:
        views: list[JobView] = await self._call("list", state=state, limit=limit)
        return views

    async def cancel(self, job_id: str) -> JobView:
        view: JobView = await self._call("cancel", job_id)
        return view

    async def breakers(self) -> builtins.list[BreakerView]:
        views: builtins.list[BreakerView] = await self._call("breakers")
        return views

    async def reset_breaker(self, name: str) -> BreakerView:
        view: BreakerView = await self._call("reset_breaker", name)
        return view

    async def wait(self, job_id: str, timeout: float = 60.0, poll: float = 0.05) -> JobView:
        """Until the job is final (raises WaitTimeout). On PostgreSQL it sleeps on the job's NOTIFY
        channel (LISTENing on ORCH_LISTEN_DATABASE_URL when set), re-reading the row at least every second
        all the same; elsewhere, and behind a transaction pooler without that URL, it polls every `poll`
        seconds."""
        uid = parse_job_id(job_id)
        orc = await self._orchestrator()
        deadline = time.monotonic() + timeout
        announced: asyncio.Event | None = None
        listen_at = database.listen_url(orc.settings.database_url)  # None: behind a pooler, poll
        if listen_at is not None:
            if self._listener is None:
                url = make_url(listen_at).set(drivername="postgresql")
                self._listener = _Listener(url.render_as_string(hide_password=False))
            listener, channel = self._listener, notifications.channel(uid)
            announced = await listener.watch(channel)  # before reading the row: no final move is missed
        try:
            while True:
                view = await self._run(orc.store.get, uid)
                if view.state in FINAL_JOB_STATES:
                    return view
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(str(job_id), timeout, view.state)
                if announced is None:
                    await asyncio.sleep(min(poll, left))
                    continue
                announced.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(announced.wait(), min(1.0, left))
        finally:
            if announced is not None:
                await listener.unwatch(channel, announced)

    async def close(self) -> None:
        """Close the LISTEN connection and free the threads (waiting for calls in flight)."""
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)


class _Listener:
    """One LISTEN connection for every wait of a client, whatever their number: a channel per job waited
    for, each notification handed to that job's waiters. (A connection per wait would run PostgreSQL out
    of connections at a hundred concurrent waits.) psycopg holds the connection while it reads
    notifications, so the reader reads in short turns and LISTEN/UNLISTEN run between them."""

    TURN = 0.05  # seconds the reader holds the connection at a time

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.lock = asyncio.Lock()

    async def watch(self, channel: str) -> asyncio.Event:
        event = asyncio.Event()
        async with self.lock:
            if self.conn is None or self.conn.closed:
                self.conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
                self.reader = asyncio.create_task(self._read(self.conn))
                for known in self.waiters:  # a new connection: listen again for the waits in flight
                    await self.conn.execute(f'LISTEN "{known}"')
            if channel not in self.waiters:
                await self.conn.execute(f'LISTEN "{channel}"')
            self.waiters.setdefault(channel, set()).add(event)
        return event

    async def unwatch(self, channel: str, event: asyncio.Event) -> None:
        async with self.lock:
            waiting = self.waiters.get(channel)
            if waiting is None:
                return
            waiting.discard(event)
            if not waiting:
                del self.waiters[channel]
                if self.conn is not None and not self.conn.closed:
                    with contextlib.suppress(psycopg.Error):
                        await self.conn.execute(f'UNLISTEN "{channel}"')

    async def _read(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            while not conn.closed:
                async for note in conn.notifies(timeout=self.TURN):
                    for event in self.waiters.get(note.channel, ()):
                        event.set()
                await asyncio.sleep(0)  # let a LISTEN or UNLISTEN take the connection
        except psycopg.Error:
            # The connection is gone: wake every waiter, so each re-reads its job (and listens anew).
            for waiting in self.waiters.values():
                for event in waiting:
                    event.set()
            await conn.close()

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        if self.conn is not None:
            await self.conn.close()
