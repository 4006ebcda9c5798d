"""Where a circuit breaker's state lives, and the only ways it may change.

Every transition of the breaker's state machine is one atomic conditional step: it happens only if the
state is still the one the caller decided on, so callers racing (threads, processes, hosts) agree on one
winner. `SQLBreakerStorage` makes each one a single compare-and-set UPDATE on the `breakers` row, shared
by every process; `MemoryBreakerStorage` makes each one a step under a lock, for one process and for
tests. Neither reads a clock: callers pass `now`, so every storage follows the same timeline.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine, case, or_, select, update

from .database import dialect, get_engine
from .errors import BreakerNotFound, ConfigurationError
from .models import Breaker, BreakerState
from .views import BreakerView, breaker_view

if TYPE_CHECKING:
    from .settings import Settings


def _positive(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ConfigurationError(f"{what} must be positive, got {value!r}")


@dataclass(frozen=True)
class BreakerConfig:
    """How a breaker behaves. The first three are declared into storage (the last declaration wins for
    everyone); cache_ttl is the declaring process's own: how long it may act on the state it last read."""

    failure_threshold: int = 5
    reset_timeout: float = 30.0
    probe_lease: float = 30.0  # a probe not reported within this is presumed dead
    cache_ttl: float = 0.2

    def __post_init__(self) -> None:
        threshold = self.failure_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigurationError(f"failure_threshold must be an integer >= 1, got {threshold!r}")
        _positive("reset_timeout", self.reset_timeout)
        _positive("probe_lease", self.probe_lease)
        ttl = self.cache_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl < math.inf:
            raise ConfigurationError(f"cache_ttl must be >= 0, got {ttl!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        """The ORCH_BREAKER_* defaults of a deployment."""
        return cls(
            failure_threshold=settings.breaker_failure_threshold,
            reset_timeout=settings.breaker_reset_timeout,
            probe_lease=settings.breaker_probe_lease,
            cache_ttl=settings.breaker_cache_ttl,
        )


@dataclass(frozen=True)
class BreakerSnapshot:
    """What a caller needs to decide its next transition."""

    state: BreakerState
    failure_count: int
    retry_at: datetime | None
    probe_started_at: datetime | None


class BreakerStorage(Protocol):
    """The breaker's transitions, each atomic. A transition whose condition no longer holds changes
    nothing and says so (False or None), like an UPDATE that matched no row."""

    def declare(self, name: str, config: BreakerConfig, now: datetime) -> None:
        """Create the breaker, closed; if it exists, only update its thresholds."""
        ...

    def read(self, name: str) -> BreakerSnapshot:
        """The current state; raises BreakerNotFound for a breaker never declared."""
        ...

    def record_failure(self, name: str, now: datetime, retry_at: datetime) -> BreakerSnapshot | None:
        """Closed only: count one more failure, and open until retry_at when that reaches the threshold.
        None when it was not closed (someone else opened it: this failure changes nothing)."""
        ...

    def clear_failures(self, name: str, now: datetime) -> bool:
        """Closed with failures counted: count zero (a success ends the run of failures)."""
        ...

    def try_probe(self, name: str, token: str, now: datetime, stale_before: datetime) -> bool:
        """Open with retry_at <= now, or half-open with a probe started at or before stale_before: become
        half-open with `token` as the one probe. True for the one caller that won."""
        ...

    def close_if_token(self, name: str, token: str, now: datetime) -> bool:
        """The probe `token` succeeded: close, if that probe is still the current one."""
        ...

    def reopen_if_token(
        self, name: str, token: str, now: datetime, retry_at: datetime
    ) -> BreakerSnapshot | None:
        """The probe `token` failed: open until retry_at, if that probe is still the current one."""
        ...

    def reset(self, name: str, now: datetime) -> bool:
        """Close whatever the state (an operator's decision); False for an unknown breaker."""
        ...

    def view(self, name: str) -> BreakerView:
        """Everything stored about one breaker; raises BreakerNotFound for an unknown one."""
        ...

    def views(self) -> list[BreakerView]:
        """Every breaker, by name."""
        ...


def _not_found(name: str) -> BreakerNotFound:
    return BreakerNotFound(f"no circuit breaker {name!r}")


# --- memory ----------------------------------------------------------------------------------------


@dataclass
class _Row:
    name: str
    failure_threshold: int
    reset_timeout: float
    probe_lease: float
    updated_at: datetime
    state: BreakerState = BreakerState.CLOSED
    failure_count: int = 0
    opened_at: datetime | None = None
    retry_at: datetime | None = None
    probe_token: str | None = None
    probe_started_at: datetime | None = None

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(self.state, self.failure_count, self.retry_at, self.probe_started_at)

    def close(self, now: datetime) -> None:
        self.state, self.failure_count, self.updated_at = BreakerState.CLOSED, 0, now
        self.opened_at = self.retry_at = self.probe_started_at = None
        self.probe_token = None


class MemoryBreakerStorage:
    """Breakers in this process's memory, one lock around every transition: the same semantics as SQL
    for a single process (threads share it; forked children each get a copy) and for fast tests."""

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self._lock = threading.Lock()

    def declare(self, name: str, config: BreakerConfig, now: datetime) -> None:
        with self._lock:
            row = self._rows.get(name)
            if row is None:
                self._rows[name] = _Row(
                    name, config.failure_threshold, config.reset_timeout, config.probe_lease, now
                )
            else:
                row.failure_threshold = config.failure_threshold
                row.reset_timeout = config.reset_timeout
                row.probe_lease = config.probe_lease

    def read(self, name: str) -> BreakerSnapshot:
        with self._lock:
            row = self._rows.get(name)
            if row is None:
                raise _not_found(name)
            return row.snapshot()

    def record_failure(self, name: str, now: datetime, retry_at: datetime) -> BreakerSnapshot | None:
        with self._lock:
            row = self._rows.get(name)
            if row is None or row.state != BreakerState.CLOSED:
                return None
            row.failure_count += 1
            if row.failure_count >= row.failure_threshold:
                row.state, row.opened_at, row.retry_at = BreakerState.OPEN, now, retry_at
            row.updated_at = now
            return row.snapshot()

    def clear_failures(self, name: str, now: datetime) -> bool:
        with self._lock:
            row = self._rows.get(name)
            if row is None or row.state != BreakerState.CLOSED or row.failure_count <= 0:
                return False
            row.failure_count, row.updated_at = 0, now
            return True

    def try_probe(self, name: str, token: str, now: datetime, stale_before: datetime) -> bool:
        with self._lock:
            row = self._rows.get(name)
            if row is None:
                return False
            due = row.state == BreakerState.OPEN and row.retry_at is not None and row.retry_at <= now
            stale = (
                row.state == BreakerState.HALF_OPEN
                and row.probe_started_at is not None
                and row.probe_started_at <= stale_before
            )
            if not (due or stale):
                return False
            row.state, row.probe_token, row.probe_started_at, row.updated_at = (
                BreakerState.HALF_OPEN,
                token,
                now,
                now,
            )
            return True

    def close_if_token(self, name: str, token: str, now: datetime) -> bool:
        with self._lock:
            row = self._rows.get(name)
            if row is None or row.probe_token != token:
                return False
            row.close(now)
            return True

    def reopen_if_token(
        self, name: str, token: str, now: datetime, retry_at: datetime
    ) -> BreakerSnapshot | None:
        with self._lock:
            row = self._rows.get(name)
            if row is None or row.probe_token != token:
                return None
            row.state, row.opened_at, row.retry_at, row.updated_at = BreakerState.OPEN, now, retry_at, now
            row.probe_token = row.probe_started_at = None
            return row.snapshot()

    def reset(self, name: str, now: datetime) -> bool:
        with self._lock:
            row = self._rows.get(name)
            if row is None:
                return False
            row.close(now)
            return True

    def view(self, name: str) -> BreakerView:
        with self._lock:
            row = self._rows.get(name)
            if row is None:
                raise _not_found(name)
            return breaker_view(row)

    def views(self) -> list[BreakerView]:
        with self._lock:
            return [breaker_view(row) for _, row in sorted(self._rows.items())]


# --- SQL -------------------------------------------------------------------------------------------

#: A closed breaker: no failures counted, no probe, nothing scheduled.
_CLOSED: dict[str, Any] = {
    "state": BreakerState.CLOSED,
    "failure_count": 0,
    "opened_at": None,
    "retry_at": None,
    "probe_token": None,
    "probe_started_at": None,
}
_SNAPSHOT_COLUMNS = (Breaker.state, Breaker.failure_count, Breaker.retry_at, Breaker.probe_started_at)


def _sql_snapshot(row: Any) -> BreakerSnapshot:
    return BreakerSnapshot(BreakerState(row.state), row.failure_count, row.retry_at, row.probe_started_at)


@dataclass(frozen=True)
class SQLBreakerStorage:
    """Breakers as rows of the orchestrator's database, shared by every process on every host. Each
    transition is one conditional UPDATE (with RETURNING where the caller needs the new state): no lock
    or transaction is held between transitions, so none is held while the backend call runs.

    Only the URL is kept: the engine is looked up per call, so a forked worker child uses its own."""

    database_url: str

    @property
    def engine(self) -> Engine:
        return get_engine(self.database_url)

    def declare(self, name: str, config: BreakerConfig, now: datetime) -> None:
        thresholds = {
            "failure_threshold": config.failure_threshold,
            "reset_timeout": config.reset_timeout,
            "probe_lease": config.probe_lease,
        }
        stmt = (
            dialect(self.database_url)
            .insert(Breaker)
            .values(name=name, state=BreakerState.CLOSED, failure_count=0, updated_at=now, **thresholds)
        )
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=[Breaker.name], set_=thresholds))

    def read(self, name: str) -> BreakerSnapshot:
        with self.engine.connect() as conn:
            row = conn.execute(select(*_SNAPSHOT_COLUMNS).where(Breaker.name == name)).one_or_none()
        if row is None:
            raise _not_found(name)
        return _sql_snapshot(row)

    def _moved(self, stmt: Any) -> bool:
        """Run one conditional UPDATE; True when it moved the row."""
        with self.engine.begin() as conn:
            return bool(conn.execute(stmt).rowcount)

    def _moved_to(self, stmt: Any) -> BreakerSnapshot | None:
        """Run one conditional UPDATE; the row's new state, or None when it did not move."""
        with self.engine.begin() as conn:
            row = conn.execute(stmt.returning(*_SNAPSHOT_COLUMNS)).one_or_none()
        return None if row is None else _sql_snapshot(row)

    def record_failure(self, name: str, now: datetime, retry_at: datetime) -> BreakerSnapshot | None:
        trips = Breaker.failure_count + 1 >= Breaker.failure_threshold
        return self._moved_to(
            update(Breaker)
            .where(Breaker.name == name, Breaker.state == BreakerState.CLOSED)
            .values(
                failure_count=Breaker.failure_count + 1,
                state=case((trips, BreakerState.OPEN.value), else_=Breaker.state),
                opened_at=case((trips, now), else_=Breaker.opened_at),
                retry_at=case((trips, retry_at), else_=Breaker.retry_at),
                updated_at=now,
            )
        )

    def clear_failures(self, name: str, now: datetime) -> bool:
        return self._moved(
            update(Breaker)
            .where(Breaker.name == name, Breaker.state == BreakerState.CLOSED, Breaker.failure_count > 0)
            .values(failure_count=0, updated_at=now)
        )

    def try_probe(self, name: str, token: str, now: datetime, stale_before: datetime) -> bool:
        return self._moved(
            update(Breaker)
            .where(
                Breaker.name == name,
                or_(
                    (Breaker.state == BreakerState.OPEN) & (Breaker.retry_at <= now),
                    (Breaker.state == BreakerState.HALF_OPEN) & (Breaker.probe_started_at <= stale_before),
                ),
            )
            .values(state=BreakerState.HALF_OPEN, probe_token=token, probe_started_at=now, updated_at=now)
        )

    def close_if_token(self, name: str, token: str, now: datetime) -> bool:
        return self._moved(
            update(Breaker)
            .where(Breaker.name == name, Breaker.probe_token == token)
            .values(**_CLOSED, updated_at=now)
        )

    def reopen_if_token(
        self, name: str, token: str, now: datetime, retry_at: datetime
    ) -> BreakerSnapshot | None:
        return self._moved_to(
            update(Breaker)
            .where(Breaker.name == name, Breaker.probe_token == token)
            .values(
                state=BreakerState.OPEN,
                opened_at=now,
                retry_at=retry_at,
                probe_token=None,
                probe_started_at=None,
                updated_at=now,
            )
        )

    def reset(self, name: str, now: datetime) -> bool:
        return self._moved(update(Breaker).where(Breaker.name == name).values(**_CLOSED, updated_at=now))

    def view(self, name: str) -> BreakerView:
        with self.engine.connect() as conn:
            row = conn.execute(select(Breaker.__table__).where(Breaker.name == name)).one_or_none()
        if row is None:
            raise _not_found(name)
        return breaker_view(row)

    def views(self) -> list[BreakerView]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(Breaker.__table__).order_by(Breaker.name)).all()
        return [breaker_view(r) for r in rows]
