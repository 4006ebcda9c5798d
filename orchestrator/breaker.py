"""A circuit breaker whose state is shared by every process: a state machine over a `BreakerStorage`.

Written by hand because no library does this right: pybreaker's shared storage has no compare-and-set,
so every process sends its own half-open probe. Here each transition is one atomic conditional step of
the storage (in SQL, one conditional UPDATE), so two processes racing agree on one winner, exactly one
caller across all hosts wins the probe, and no lock or transaction is held while the backend call runs.
Reads may be served from a per-process snapshot for `cache_ttl` seconds, so an open breaker refuses in
microseconds without touching the storage.

Breakers are declared at import time (``circuit_breaker(...)`` in a catalog module), before any settings
exist, so one declared without a storage or some thresholds takes them on first use from the process
defaults: `configure(settings)`, called where the process reads its settings (the Celery app, an
`Orchestrator`), or else, once, the ORCH_* environment.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

from .breaker_storage import BreakerConfig, BreakerSnapshot, BreakerStorage, SQLBreakerStorage
from .errors import BreakerNotFound, CircuitOpen, ConfigurationError
from .models import BreakerState, utcnow
from .settings import Settings
from .views import BreakerView

__all__ = [
    "BreakerConfig",
    "BreakerDefaults",
    "CircuitBreaker",
    "circuit_breaker",
    "configure",
    "get_breaker",
    "get_view",
    "list_views",
    "process_defaults",
    "reset",
    "set_defaults",
]

T = TypeVar("T")


@dataclass(frozen=True)
class BreakerDefaults:
    """What breakers declared without a storage, or without some thresholds, use in this process."""

    storage: BreakerStorage
    config: BreakerConfig = field(default_factory=BreakerConfig)


_defaults: BreakerDefaults | None = None
_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Make `settings` this process's breaker defaults: its database as the storage, its ORCH_BREAKER_*
    values as the thresholds of breakers declared without them."""
    set_defaults(
        BreakerDefaults(SQLBreakerStorage(settings.database_url), BreakerConfig.from_settings(settings))
    )


def set_defaults(defaults: BreakerDefaults | None) -> BreakerDefaults | None:
    """Replace the process defaults (None: nothing configured); returns the previous ones. Breakers bound
    to different defaults rebind on their next use; equal defaults change nothing."""
    global _defaults
    with _lock:
        previous = _defaults
        if defaults != previous:
            _defaults = defaults
    return previous


def process_defaults() -> BreakerDefaults:
    """The defaults breakers use now."""
    return _defaults or _defaults_from_environment()


def _defaults_from_environment() -> BreakerDefaults:
    """Nothing called `configure` before a breaker was used (a script calling one directly): read the
    ORCH_* environment, once, as every other entry point does."""
    global _defaults
    settings = Settings.from_env()
    fallback = BreakerDefaults(
        SQLBreakerStorage(settings.database_url), BreakerConfig.from_settings(settings)
    )
    with _lock:
        if _defaults is None:
            _defaults = fallback
        return _defaults


@dataclass(frozen=True)
class _Given:
    """The configuration a breaker was declared with; None takes the process default."""

    failure_threshold: int | None
    reset_timeout: float | None
    probe_lease: float | None
    cache_ttl: float | None

    @property
    def complete(self) -> bool:
        return None not in (self.failure_threshold, self.reset_timeout, self.probe_lease, self.cache_ttl)

    def over(self, base: BreakerConfig) -> BreakerConfig:
        return BreakerConfig(
            failure_threshold=_given_or(self.failure_threshold, base.failure_threshold),
            reset_timeout=_given_or(self.reset_timeout, base.reset_timeout),
            probe_lease=_given_or(self.probe_lease, base.probe_lease),
            cache_ttl=_given_or(self.cache_ttl, base.cache_ttl),
        )


def _given_or(given: T | None, default: T) -> T:
    return default if given is None else given


@dataclass(frozen=True)
class _Binding:
    """A breaker's storage and configuration, and the process defaults they were resolved against (None
    when the breaker was declared with everything and needs none)."""

    defaults: BreakerDefaults | None
    storage: BreakerStorage
    config: BreakerConfig


@dataclass(frozen=True)
class _Cached:
    snapshot: BreakerSnapshot
    read_at: float  # time.monotonic()


class CircuitBreaker:
    """closed -> open -> half_open -> closed | open; use it as ``with breaker: ...`` or ``breaker.call(f)``.

    exclude: exception types that are the caller's fault; they neither count as failures nor reopen it.
    storage (or database_url, for SQLBreakerStorage(database_url)): where its state lives; unset, the
    process default's. Thresholds left unset come from the process default configuration.
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
        storage: BreakerStorage | None = None,
        database_url: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ConfigurationError(f"a breaker name must be a string of 1 to 200 characters, got {name!r}")
        if storage is not None and database_url is not None:
            raise ConfigurationError("give a breaker a storage or a database_url, not both")
        self.name = name
        self.exclude = tuple(exclude)
        self._given = _Given(failure_threshold, reset_timeout, probe_lease, cache_ttl)
        self._given.over(BreakerConfig())  # refuse bad values now, not at first use
        self._storage = SQLBreakerStorage(database_url) if database_url is not None else storage
        self._binding: _Binding | None = None
        self._cached: _Cached | None = None
        self._declared_in: int | None = None  # pid of the process that declared our configuration
        self._local = threading.local()

    # --- configuration -----------------------------------------------------------------------------

    def _bound(self) -> _Binding:
        binding = self._binding
        if binding is not None and (binding.defaults is None or binding.defaults is _defaults):
            return binding
        if self._storage is not None and self._given.complete:
            binding = _Binding(None, self._storage, self._given.over(BreakerConfig()))
        else:
            defaults = process_defaults()
            binding = _Binding(defaults, self._storage or defaults.storage, self._given.over(defaults.config))
        self._binding, self._cached, self._declared_in = binding, None, None
        return binding

    @property
    def config(self) -> BreakerConfig:
        return self._bound().config

    @property
    def storage(self) -> BreakerStorage:
        return self._bound().storage

    @property
    def failure_threshold(self) -> int:
        return self.config.failure_threshold

    @property
    def reset_timeout(self) -> float:
        return self.config.reset_timeout

    @property
    def probe_lease(self) -> float:
        return self.config.probe_lease

    @property
    def cache_ttl(self) -> float:
        return self.config.cache_ttl

    # --- reads -------------------------------------------------------------------------------------

    def _declare(self, binding: _Binding) -> None:
        """Create the breaker, or update its thresholds, once per process."""
        if self._declared_in == os.getpid():
            return
        binding.storage.declare(self.name, binding.config, utcnow())
        self._declared_in = os.getpid()
        self._cached = None

    def _read(self, binding: _Binding) -> BreakerSnapshot:
        cached = self._cached
        if cached is not None and time.monotonic() - cached.read_at < binding.config.cache_ttl:
            return cached.snapshot
        self._declare(binding)
        return self._remember(binding.storage.read(self.name))

    def _remember(self, snapshot: BreakerSnapshot) -> BreakerSnapshot:
        self._cached = _Cached(snapshot, time.monotonic())
        return snapshot

    @property
    def state(self) -> BreakerState:
        return self._read(self._bound()).state

    # --- transitions, each one atomic step of the storage ------------------------------------------

    def acquire(self) -> str | None:
        """Ask to call the backend: None for a normal (closed) call, a probe token for the one half-open
        probe; raises CircuitOpen, without calling anything, when the breaker refuses."""
        binding = self._bound()
        snap = self._read(binding)
        if snap.state == BreakerState.CLOSED:
            return None
        now = utcnow()
        if snap.state == BreakerState.OPEN and snap.retry_at is not None and now < snap.retry_at:
            raise CircuitOpen(self.name, f"circuit {self.name!r} is open until {snap.retry_at:%H:%M:%S.%f}")
        lease = timedelta(seconds=binding.config.probe_lease)
        lease_start = snap.probe_started_at
        if snap.state == BreakerState.HALF_OPEN and lease_start is not None and now < lease_start + lease:
            raise CircuitOpen(self.name, f"circuit {self.name!r} is half-open: another caller is probing")
        token = uuid.uuid4().hex
        if binding.storage.try_probe(self.name, token, now, now - lease):
            self._remember(BreakerSnapshot(BreakerState.HALF_OPEN, snap.failure_count, snap.retry_at, now))
            return token
        self._cached = None  # someone else moved it: read afresh next time
        raise CircuitOpen(self.name, f"circuit {self.name!r} is half-open: another caller is probing")

    def success(self, token: str | None) -> None:
        """Report the call `acquire` allowed as a success (`token`: what acquire returned)."""
        if token is None:
            cached = self._cached
            if cached is not None and cached.snapshot.failure_count == 0:
                return  # the hot path of a healthy backend writes nothing
            self._bound().storage.clear_failures(self.name, utcnow())
            self._cached = None
            return
        if self._bound().storage.close_if_token(self.name, token, utcnow()):
            self._remember(BreakerSnapshot(BreakerState.CLOSED, 0, None, None))
        else:
            self._cached = None

    def failure(self, token: str | None) -> None:
        """Report the call `acquire` allowed as a failure of the backend."""
        binding = self._bound()
        now = utcnow()
        retry_at = now + timedelta(seconds=binding.config.reset_timeout)
        if token is None:
            snap = binding.storage.record_failure(self.name, now, retry_at)
        else:
            snap = binding.storage.reopen_if_token(self.name, token, now, retry_at)
        if snap is None:
            self._cached = None
        else:
            self._remember(snap)

    def reset(self) -> None:
        """Close the breaker now, whatever its state (an operator's decision)."""
        binding = self._bound()
        self._declare(binding)
        binding.storage.reset(self.name, utcnow())
        self._cached = None

    # --- use ---------------------------------------------------------------------------------------

    def __enter__(self) -> CircuitBreaker:
        tokens: list[str | None] = self._local.__dict__.setdefault("tokens", [])  # one stack per thread
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
        binding = self._bound()
        self._declare(binding)
        return binding.storage.view(self.name)


# --- the breakers of this process, by name ----------------------------------------------------------

_breakers: dict[str, CircuitBreaker] = {}


def circuit_breaker(name: str, **config: Any) -> CircuitBreaker:
    """Declare (or redeclare) the breaker `name`; branches declared with ``breaker=name`` go through it."""
    breaker = CircuitBreaker(name, **config)
    with _lock:
        _breakers[name] = breaker
    return breaker


def get_breaker(name: str) -> CircuitBreaker:
    """The declared breaker `name`, or one with the process defaults."""
    breaker = _breakers.get(name)
    if breaker is None:
        with _lock:
            breaker = _breakers.setdefault(name, CircuitBreaker(name))
    return breaker


# --- what operators read and do, by database URL (the API, the CLI, metrics) ------------------------


def list_views(database_url: str) -> list[BreakerView]:
    return SQLBreakerStorage(database_url).views()


def get_view(database_url: str, name: str) -> BreakerView:
    return SQLBreakerStorage(database_url).view(name)


def reset(database_url: str, name: str) -> BreakerView:
    storage = SQLBreakerStorage(database_url)
    if not storage.reset(name, utcnow()):
        raise BreakerNotFound(f"no circuit breaker {name!r}")
    return storage.view(name)
