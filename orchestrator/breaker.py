"""A circuit breaker whose state lives in the orchestrator's SQL database, shared by every process.

Written by hand because no library does this right: pybreaker's shared storage has no compare-and-set,
so every process sends its own half-open probe. Here each transition is one conditional UPDATE, so two
processes racing agree on one winner, exactly one caller across all hosts wins the probe, and no lock or
transaction is held while the backend call runs. Reads may be served from a per-process snapshot for
`cache_ttl` seconds, so an open breaker refuses in microseconds without touching the database.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy import Engine, case, or_, select, update

from .database import dialect, get_engine
from .errors import BreakerNotFound, CircuitOpen, ConfigurationError
from .models import Breaker, BreakerState, utcnow
from .views import BreakerView

T = TypeVar("T")


@dataclass(frozen=True)
class _Snapshot:
    state: str
    failure_count: int
    retry_at: datetime | None
    probe_started_at: datetime | None
    read_at: float  # time.monotonic()


class CircuitBreaker:
    """closed -> open -> half_open -> closed | open; use it as ``with breaker: ...`` or ``breaker.call(f)``.

    exclude: exception types that are the caller's fault; they neither count as failures nor reopen it.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int | None = None,
        reset_timeout: float | None = None,
        exclude: tuple[type[BaseException], ...] = (),
        probe_lease: float | None = None,
        cache_ttl: float | None = None,
        database_url: str | None = None,
    ) -> None:
        from .settings import Settings

        defaults = Settings.from_env()
        self.name = name
        self.failure_threshold = (
            defaults.breaker_failure_threshold if failure_threshold is None else failure_threshold
        )
        self.reset_timeout = defaults.breaker_reset_timeout if reset_timeout is None else reset_timeout
        self.probe_lease = defaults.breaker_probe_lease if probe_lease is None else probe_lease
        self.cache_ttl = defaults.breaker_cache_ttl if cache_ttl is None else cache_ttl
        self.exclude = tuple(exclude)
        self.database_url = database_url or defaults.database_url
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ConfigurationError(f"a breaker name must be a string of 1 to 200 characters, got {name!r}")
        if (
            isinstance(self.failure_threshold, bool)
            or not isinstance(self.failure_threshold, int)
            or (self.failure_threshold < 1)
        ):
            raise ConfigurationError(
                f"failure_threshold must be an integer >= 1, got {self.failure_threshold!r}"
            )
        for what, value in (("reset_timeout", self.reset_timeout), ("probe_lease", self.probe_lease)):
            if not value > 0:
                raise ConfigurationError(f"{what} must be positive, got {value!r}")
        if self.cache_ttl < 0:
            raise ConfigurationError(f"cache_ttl must be >= 0, got {self.cache_ttl!r}")
        self._insert = dialect(self.database_url).insert
        self._snapshot: _Snapshot | None = None
        self._declared_in: int | None = None  # pid of the process that upserted our configuration
        self._local = threading.local()

    @property
    def engine(self) -> Engine:
        return get_engine(self.database_url)

    # --- reads -------------------------------------------------------------------------------------

    def _declare(self) -> None:
        """Create the row, or update its thresholds, once per process."""
        if self._declared_in == os.getpid():
            return
        config = {
            "failure_threshold": self.failure_threshold,
            "reset_timeout": self.reset_timeout,
            "probe_lease": self.probe_lease,
        }
        stmt = self._insert(Breaker).values(
            name=self.name, state=BreakerState.CLOSED, failure_count=0, updated_at=utcnow(), **config
        )
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=[Breaker.name], set_=config))
        self._declared_in = os.getpid()
        self._snapshot = None

    def _read(self) -> _Snapshot:
        snap = self._snapshot
        if snap is not None and time.monotonic() - snap.read_at < self.cache_ttl:
            return snap
        self._declare()
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    Breaker.state, Breaker.failure_count, Breaker.retry_at, Breaker.probe_started_at
                ).where(Breaker.name == self.name)
            ).one()
        return self._remember(row.state, row.failure_count, row.retry_at, row.probe_started_at)

    def _remember(
        self, state: str, failures: int, retry_at: datetime | None, probe_started_at: datetime | None
    ) -> _Snapshot:
        snap = _Snapshot(state, failures, retry_at, probe_started_at, time.monotonic())
        self._snapshot = snap
        return snap

    @property
    def state(self) -> str:
        return self._read().state

    # --- transitions, each one conditional UPDATE ---------------------------------------------------

    def acquire(self) -> str | None:
        """Ask to call the backend: None for a normal (closed) call, a probe token for the one half-open
        probe; raises CircuitOpen, without calling anything, when the breaker refuses."""
        snap = self._read()
        if snap.state == BreakerState.CLOSED:
            return None
        now = utcnow()
        if snap.state == BreakerState.OPEN and snap.retry_at is not None and now < snap.retry_at:
            raise CircuitOpen(self.name, f"circuit {self.name!r} is open until {snap.retry_at:%H:%M:%S.%f}")
        lease_start = snap.probe_started_at
        if (
            snap.state == BreakerState.HALF_OPEN
            and lease_start is not None
            and (now < lease_start + timedelta(seconds=self.probe_lease))
        ):
            raise CircuitOpen(self.name, f"circuit {self.name!r} is half-open: another caller is probing")
        token = uuid.uuid4().hex
        stale = now - timedelta(seconds=self.probe_lease)
        with self.engine.begin() as conn:
            won = conn.execute(
                update(Breaker)
                .where(
                    Breaker.name == self.name,
                    or_(
                        (Breaker.state == BreakerState.OPEN) & (Breaker.retry_at <= now),
                        (Breaker.state == BreakerState.HALF_OPEN) & (Breaker.probe_started_at <= stale),
                    ),
                )
                .values(state=BreakerState.HALF_OPEN, probe_token=token, probe_started_at=now, updated_at=now)
            ).rowcount
        if won:
            self._remember(BreakerState.HALF_OPEN, snap.failure_count, snap.retry_at, now)
            return token
        self._snapshot = None  # someone else moved it: read afresh next time
        raise CircuitOpen(self.name, f"circuit {self.name!r} is half-open: another caller is probing")

    def success(self, token: str | None) -> None:
        now = utcnow()
        if token is not None:
            with self.engine.begin() as conn:
                closed = conn.execute(
                    update(Breaker)
                    .where(Breaker.name == self.name, Breaker.probe_token == token)
                    .values(
                        state=BreakerState.CLOSED,
                        failure_count=0,
                        probe_token=None,
                        probe_started_at=None,
                        opened_at=None,
                        retry_at=None,
                        updated_at=now,
                    )
                ).rowcount
            self._snapshot = None if not closed else self._remember(BreakerState.CLOSED, 0, None, None)
            return
        snap = self._snapshot
        if snap is not None and snap.failure_count == 0:
            return  # the hot path of a healthy backend writes nothing
        with self.engine.begin() as conn:
            conn.execute(
                update(Breaker)
                .where(
                    Breaker.name == self.name, Breaker.state == BreakerState.CLOSED, Breaker.failure_count > 0
                )
                .values(failure_count=0, updated_at=now)
            )
        self._snapshot = None

    def failure(self, token: str | None) -> None:
        now = utcnow()
        retry_at = now + timedelta(seconds=self.reset_timeout)
        with self.engine.begin() as conn:
            if token is not None:
                row = conn.execute(
                    update(Breaker)
                    .where(Breaker.name == self.name, Breaker.probe_token == token)
                    .values(
                        state=BreakerState.OPEN,
                        opened_at=now,
                        retry_at=retry_at,
                        probe_token=None,
                        probe_started_at=None,
                        updated_at=now,
                    )
                    .returning(Breaker.state, Breaker.failure_count, Breaker.retry_at)
                ).one_or_none()
            else:
                trips = Breaker.failure_count + 1 >= Breaker.failure_threshold
                row = conn.execute(
                    update(Breaker)
                    .where(Breaker.name == self.name, Breaker.state == BreakerState.CLOSED)
                    .values(
                        failure_count=Breaker.failure_count + 1,
                        state=case((trips, BreakerState.OPEN.value), else_=Breaker.state),
                        opened_at=case((trips, now), else_=Breaker.opened_at),
                        retry_at=case((trips, retry_at), else_=Breaker.retry_at),
                        updated_at=now,
                    )
                    .returning(Breaker.state, Breaker.failure_count, Breaker.retry_at)
                ).one_or_none()
        if row is None:
            self._snapshot = None
        else:
            self._remember(row.state, row.failure_count, row.retry_at, None)

    def reset(self) -> None:
        """Close the breaker now, whatever its state (an operator's decision)."""
        self._declare()
        reset(self.database_url, self.name)
        self._snapshot = None

    # --- use ---------------------------------------------------------------------------------------

    def __enter__(self) -> CircuitBreaker:
        tokens: list[str | None] = self._local.__dict__.setdefault("tokens", [])
        tokens.append(self.acquire())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        token = self._local.tokens.pop()
        if exc is None or isinstance(exc, self.exclude):
            self.success(token)
        else:
            self.failure(token)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self:
            return fn(*args, **kwargs)

    def view(self) -> BreakerView:
        self._declare()
        return get_view(self.database_url, self.name)


_breakers: dict[str, CircuitBreaker] = {}
_lock = threading.Lock()


def circuit_breaker(name: str, **config: Any) -> CircuitBreaker:
    """Declare (or redeclare) the breaker `name`; branches declared with ``breaker=name`` go through it."""
    breaker = CircuitBreaker(name, **config)
    with _lock:
        _breakers[name] = breaker
    return breaker


def get_breaker(name: str) -> CircuitBreaker:
    """The declared breaker `name`, or one with the ORCH_BREAKER_* defaults."""
    breaker = _breakers.get(name)
    if breaker is None:
        with _lock:
            breaker = _breakers.setdefault(name, CircuitBreaker(name))
    return breaker


def _breaker_view(row: Any) -> BreakerView:
    return BreakerView(
        name=row.name,
        state=row.state,
        failure_count=row.failure_count,
        failure_threshold=row.failure_threshold,
        reset_timeout=row.reset_timeout,
        probe_lease=row.probe_lease,
        opened_at=row.opened_at,
        retry_at=row.retry_at,
        probe_started_at=row.probe_started_at,
        updated_at=row.updated_at,
    )


def list_views(database_url: str) -> list[BreakerView]:
    with get_engine(database_url).connect() as conn:
        rows = conn.execute(select(Breaker.__table__).order_by(Breaker.name)).all()
    return [_breaker_view(r) for r in rows]


def get_view(database_url: str, name: str) -> BreakerView:
    with get_engine(database_url).connect() as conn:
        row = conn.execute(select(Breaker.__table__).where(Breaker.name == name)).one_or_none()
    if row is None:
        raise BreakerNotFound(f"no circuit breaker {name!r}")
    return _breaker_view(row)


def reset(database_url: str, name: str) -> BreakerView:
    with get_engine(database_url).begin() as conn:
        done = conn.execute(
            update(Breaker)
            .where(Breaker.name == name)
            .values(
                state=BreakerState.CLOSED,
                failure_count=0,
                opened_at=None,
                retry_at=None,
                probe_token=None,
                probe_started_at=None,
                updated_at=utcnow(),
            )
        ).rowcount
    if not done:
        raise BreakerNotFound(f"no circuit breaker {name!r}")
    return get_view(database_url, name)
