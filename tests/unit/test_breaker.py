"""The breaker's state machine, every state x event, on every storage; here in memory, with no services.

`BreakerContract` is the behaviour every `BreakerStorage` must give the breaker: this module runs it on
`MemoryBreakerStorage`, tests/integration/test_breaker_storage.py on SQLite and PostgreSQL. Time is a
fake clock the test moves, so nothing sleeps; the storages read no clock of their own.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator import BreakerNotFound, CircuitBreaker, CircuitOpen, ConfigurationError, Settings
from orchestrator import breaker as breaker_module
from orchestrator.breaker import (
    BreakerConfig,
    BreakerDefaults,
    circuit_breaker,
    configure,
    get_breaker,
    process_defaults,
    set_defaults,
)
from orchestrator.breaker_storage import (
    BreakerSnapshot,
    BreakerStorage,
    MemoryBreakerStorage,
    SQLBreakerStorage,
)
from orchestrator.models import BreakerState
from orchestrator.views import BreakerView

RESET = 10.0  # reset_timeout of the breakers under test, in (fake) seconds
LEASE = 20.0  # their probe_lease


class Clock:
    """Stands in for `utcnow` in orchestrator.breaker: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class CountingStorage:
    """A storage that counts the calls made to the one it wraps: what the breaker asked of it."""

    def __init__(self, inner: BreakerStorage) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def declare(self, name: str, config: BreakerConfig, now: datetime) -> None:
        self.calls["declare"] += 1
        self.inner.declare(name, config, now)

    def read(self, name: str) -> BreakerSnapshot:
        self.calls["read"] += 1
        return self.inner.read(name)

    def record_failure(self, name: str, now: datetime, retry_at: datetime) -> BreakerSnapshot | None:
        self.calls["record_failure"] += 1
        return self.inner.record_failure(name, now, retry_at)

    def clear_failures(self, name: str, now: datetime) -> bool:
        self.calls["clear_failures"] += 1
        return self.inner.clear_failures(name, now)

    def try_probe(self, name: str, token: str, now: datetime, stale_before: datetime) -> bool:
        self.calls["try_probe"] += 1
        return self.inner.try_probe(name, token, now, stale_before)

    def close_if_token(self, name: str, token: str, now: datetime) -> bool:
        self.calls["close_if_token"] += 1
        return self.inner.close_if_token(name, token, now)

    def reopen_if_token(
        self, name: str, token: str, now: datetime, retry_at: datetime
    ) -> BreakerSnapshot | None:
        self.calls["reopen_if_token"] += 1
        return self.inner.reopen_if_token(name, token, now, retry_at)

    def reset(self, name: str, now: datetime) -> bool:
        self.calls["reset"] += 1
        return self.inner.reset(name, now)

    def view(self, name: str) -> BreakerView:
        self.calls["view"] += 1
        return self.inner.view(name)

    def views(self) -> list[BreakerView]:
        self.calls["views"] += 1
        return self.inner.views()


def make(
    storage: BreakerStorage,
    name: str = "backend",
    *,
    failure_threshold: int = 3,
    cache_ttl: float = 0.0,
    reset_timeout: float = RESET,
    exclude: tuple[type[BaseException], ...] = (),
) -> CircuitBreaker:
    """A breaker declared with everything, so it needs no process defaults. Each one stands for another
    process: it has its own snapshot cache and declares itself once."""
    return CircuitBreaker(
        name,
        failure_threshold=failure_threshold,
        reset_timeout=reset_timeout,
        probe_lease=LEASE,
        cache_ttl=cache_ttl,
        exclude=exclude,
        storage=storage,
    )


def fail(b: CircuitBreaker) -> None:
    with pytest.raises(ConnectionError), b:
        raise ConnectionError("down")


def trip(b: CircuitBreaker) -> None:
    for _ in range(b.failure_threshold):
        fail(b)
    assert b.view().state == "open"


class BreakerContract:
    """What the breaker does over any storage. Not collected itself (no Test prefix): a subclass named
    Test... defines the `storage` fixture its tests run on."""

    @pytest.fixture
    def clock(self, monkeypatch: pytest.MonkeyPatch) -> Clock:
        clock = Clock()
        monkeypatch.setattr(breaker_module, "utcnow", clock)
        return clock

    def test_closed_counts_consecutive_failures_and_a_success_resets_them(
        self, storage: BreakerStorage, clock: Clock
    ) -> None:
        b = make(storage)
        fail(b)
        fail(b)
        assert (b.view().state, b.view().failure_count) == ("closed", 2)
        with b:
            pass
        assert (b.view().state, b.view().failure_count) == ("closed", 0)

    def test_closed_opens_at_the_threshold(self, storage: BreakerStorage, clock: Clock) -> None:
        b = make(storage)
        fail(b)
        fail(b)
        clock.advance(1)
        fail(b)
        view = b.view()
        assert (view.state, view.failure_count) == ("open", 3)
        assert (view.opened_at, view.retry_at) == (clock.now, clock.now + timedelta(seconds=RESET))

    def test_open_refuses_without_calling_until_retry_at(self, storage: BreakerStorage, clock: Clock) -> None:
        b = make(storage)
        trip(b)
        called: list[int] = []
        clock.advance(RESET - 0.001)
        with pytest.raises(CircuitOpen, match="circuit 'backend' is open until"):
            b.call(called.append, 1)
        assert called == []
        clock.advance(0.001)  # retry_at itself lets the probe through
        b.call(called.append, 1)
        assert called == [1]

    def test_after_retry_at_one_probe_the_rest_refused_and_its_success_closes(
        self, storage: BreakerStorage, clock: Clock
    ) -> None:
        b, other = make(storage), make(storage)
        trip(b)
        clock.advance(RESET)
        probe = b.acquire()
        assert probe is not None
        view = b.view()
        assert (view.state, view.probe_started_at) == ("half_open", clock.now)
        with pytest.raises(CircuitOpen, match="half-open: another caller is probing"):
            other.acquire()
        b.success(probe)
        assert (b.view().state, b.view().failure_count, b.view().retry_at) == ("closed", 0, None)
        assert other.acquire() is None  # closed again for everyone

    def test_racing_callers_send_exactly_one_probe(self, storage: BreakerStorage, clock: Clock) -> None:
        callers = [make(storage) for _ in range(16)]
        trip(callers[0])
        clock.advance(RESET)
        start = threading.Barrier(len(callers))

        def ask(b: CircuitBreaker) -> str | None:
            start.wait()
            try:
                return b.acquire()
            except CircuitOpen:
                return None

        with ThreadPoolExecutor(len(callers)) as pool:
            tokens = [t for t in pool.map(ask, callers) if t is not None]
        assert len(tokens) == 1
        assert callers[0].view().state == "half_open"

    def test_a_failed_probe_reopens_with_a_new_retry_at(self, storage: BreakerStorage, clock: Clock) -> None:
        b = make(storage)
        trip(b)
        clock.advance(RESET)
        fail(b)  # this call was the probe
        view = b.view()
        assert (view.state, view.opened_at, view.probe_started_at) == ("open", clock.now, None)
        assert view.retry_at == clock.now + timedelta(seconds=RESET)
        with pytest.raises(CircuitOpen, match="is open until"):
            b.acquire()

    def test_a_probe_that_never_reports_is_taken_over_after_its_lease(
        self, storage: BreakerStorage, clock: Clock
    ) -> None:
        b, other = make(storage), make(storage)
        trip(b)
        clock.advance(RESET)
        lost = b.acquire()
        assert lost is not None
        clock.advance(LEASE - 0.001)
        with pytest.raises(CircuitOpen, match="another caller is probing"):
            other.acquire()
        clock.advance(0.001)
        second = other.acquire()
        assert second is not None and second != lost
        b.success(lost)  # the lost probe reporting late changes nothing: its token was taken over
        b.failure(lost)
        assert b.view().state == "half_open"
        other.success(second)
        assert b.view().state == "closed"

    def test_excluded_exceptions_do_not_count(self, storage: BreakerStorage, clock: Clock) -> None:
        b = make(storage, exclude=(ValueError,))
        fail(b)
        for _ in range(5):
            with pytest.raises(ValueError), b:
                raise ValueError("the caller's fault")
        assert (b.view().state, b.view().failure_count) == ("closed", 0)  # and it ended the run of failures

    def test_a_failure_recorded_after_another_caller_opened_it_changes_nothing(
        self, storage: BreakerStorage, clock: Clock
    ) -> None:
        b, other = make(storage), make(storage)
        assert b.acquire() is None  # allowed while closed
        trip(other)
        retry_at = other.view().retry_at
        clock.advance(1)
        b.failure(None)
        assert (b.view().state, b.view().failure_count, b.view().retry_at) == ("open", 3, retry_at)

    def test_failures_recorded_at_once_lose_no_count(self, storage: BreakerStorage, clock: Clock) -> None:
        callers = [make(storage, failure_threshold=10_000) for _ in range(8)]
        start = threading.Barrier(len(callers))

        def fail_many(b: CircuitBreaker) -> None:
            assert b.acquire() is None
            start.wait()
            for _ in range(25):
                b.failure(None)

        with ThreadPoolExecutor(len(callers)) as pool:
            list(pool.map(fail_many, callers))
        assert callers[0].view().failure_count == 200

    def test_the_cache_refuses_an_open_breaker_without_the_storage(
        self, storage: BreakerStorage, clock: Clock
    ) -> None:
        counting = CountingStorage(storage)
        b = make(counting, cache_ttl=60.0)
        trip(b)
        counting.calls.clear()
        for _ in range(100):
            with pytest.raises(CircuitOpen):
                b.acquire()
        assert counting.calls == {}

    def test_a_healthy_success_writes_nothing_and_a_success_after_failures_clears_them(
        self, storage: BreakerStorage, clock: Clock
    ) -> None:
        counting = CountingStorage(storage)
        b = make(counting)
        with b:
            pass
        assert counting.calls == {"declare": 1, "read": 1}  # declared once per process
        counting.calls.clear()
        for _ in range(5):
            with b:
                pass
        assert counting.calls == {"read": 5}  # cache_ttl=0: every call reads, none writes
        fail(b)
        counting.calls.clear()
        with b:
            pass
        assert counting.calls == {"read": 1, "clear_failures": 1}
        assert b.view().failure_count == 0

    def test_reset_closes_whatever_the_state(self, storage: BreakerStorage, clock: Clock) -> None:
        b = make(storage)
        trip(b)
        b.reset()
        assert (b.view().state, b.view().failure_count, b.view().retry_at) == ("closed", 0, None)
        trip(b)
        clock.advance(RESET)
        probe = b.acquire()
        assert probe is not None
        b.reset()
        view = b.view()
        assert (view.state, view.probe_started_at, view.opened_at) == ("closed", None, None)
        b.success(probe)  # a probe reporting after a reset changes nothing
        b.failure(probe)
        assert b.state == "closed"

    def test_each_thread_reports_its_own_token(self, storage: BreakerStorage, clock: Clock) -> None:
        """Threads sharing one breaker: a `with` block reports what its own acquire returned, whatever
        other threads entered or left meanwhile."""
        b, other = make(storage, failure_threshold=2), make(storage, failure_threshold=2)
        entered, leave = threading.Event(), threading.Event()

        def normal_call() -> None:
            with b:  # closed: a normal call, no token
                entered.set()
                leave.wait(10)

        caller = threading.Thread(target=normal_call)
        caller.start()
        assert entered.wait(10)
        trip(other)
        clock.advance(RESET)
        with pytest.raises(ConnectionError), b:  # the probe, entered after the other thread's call
            leave.set()
            caller.join(10)
            raise ConnectionError("still down")
        assert b.view().state == "open"  # the probe's failure reopened it; the normal call closed nothing

    def test_redeclaring_changes_the_thresholds_for_everyone(
        self, storage: BreakerStorage, clock: Clock
    ) -> None:
        b = make(storage, failure_threshold=3)
        fail(b)
        fail(b)
        stricter = make(storage, failure_threshold=2, reset_timeout=5.0)
        assert stricter.view().failure_threshold == 2
        assert (stricter.view().reset_timeout, stricter.view().probe_lease) == (5.0, LEASE)
        fail(b)  # counted against the threshold now declared
        assert (b.view().state, b.view().failure_count) == ("open", 3)

    def test_views_and_unknown_names(self, storage: BreakerStorage, clock: Clock) -> None:
        for name in ("b", "a"):
            make(storage, name).view()
        trip(make(storage, "b"))
        assert [(v.name, v.state) for v in storage.views()] == [("a", "closed"), ("b", "open")]
        view = storage.view("b")
        assert (view.failure_threshold, view.reset_timeout, view.probe_lease) == (3, RESET, LEASE)
        assert view.updated_at == clock.now
        with pytest.raises(BreakerNotFound, match="no circuit breaker 'nope'"):
            storage.view("nope")
        with pytest.raises(BreakerNotFound, match="no circuit breaker 'nope'"):
            storage.read("nope")
        now = clock.now
        assert storage.record_failure("nope", now, now) is None
        assert storage.reopen_if_token("nope", "t", now, now) is None
        assert not storage.try_probe("nope", "t", now, now)
        assert not storage.close_if_token("nope", "t", now)
        assert not storage.clear_failures("nope", now)
        assert not storage.reset("nope", now)
        assert [v.name for v in storage.views()] == ["a", "b"]


class TestMemoryBreaker(BreakerContract):
    @pytest.fixture
    def storage(self) -> BreakerStorage:
        return MemoryBreakerStorage()


# --- configuration and the process defaults ------------------------------------------------------------


@pytest.fixture
def defaults() -> Iterator[BreakerDefaults]:
    """Process defaults of a memory storage for the test, the previous ones restored after."""
    mine = BreakerDefaults(MemoryBreakerStorage(), BreakerConfig(failure_threshold=2, reset_timeout=7.0))
    previous = set_defaults(mine)
    yield mine
    set_defaults(previous)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be an integer >= 1"),
        ({"failure_threshold": True}, "failure_threshold must be an integer >= 1"),
        ({"failure_threshold": 2.5}, "failure_threshold must be an integer >= 1"),
        ({"reset_timeout": 0}, "reset_timeout must be positive"),
        ({"reset_timeout": float("inf")}, "reset_timeout must be positive"),
        ({"probe_lease": -1}, "probe_lease must be positive"),
        ({"probe_lease": float("nan")}, "probe_lease must be positive"),
        ({"cache_ttl": -1}, "cache_ttl must be >= 0"),
        ({"cache_ttl": "0.2"}, "cache_ttl must be >= 0"),
    ],
)
def test_bad_configuration_is_refused_at_declaration(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CircuitBreaker("backend", **config)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=message):
        BreakerConfig(**config)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "x" * 201, 7])
def test_bad_names_are_refused(name: object) -> None:
    with pytest.raises(ConfigurationError, match="a breaker name must be a string of 1 to 200 characters"):
        CircuitBreaker(name)  # type: ignore[arg-type]


def test_a_storage_or_a_database_url_not_both() -> None:
    with pytest.raises(ConfigurationError, match="a storage or a database_url, not both"):
        CircuitBreaker("backend", storage=MemoryBreakerStorage(), database_url="sqlite://")
    b = CircuitBreaker(
        "backend",
        failure_threshold=1,
        reset_timeout=1,
        probe_lease=1,
        cache_ttl=0,
        database_url="sqlite:///b.db",
    )
    assert b.storage == SQLBreakerStorage("sqlite:///b.db")  # given everything: no defaults, no database yet


def test_declaring_a_breaker_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> Settings:
        raise AssertionError("the environment was read")

    monkeypatch.setattr(Settings, "from_env", refuse)
    CircuitBreaker("quiet")
    circuit_breaker("unit-quiet", failure_threshold=3, exclude=(ValueError,))


def test_unset_values_come_from_the_process_defaults_at_first_use(defaults: BreakerDefaults) -> None:
    b = circuit_breaker("unit-defaults", failure_threshold=4)
    assert b.storage is defaults.storage
    assert b.config == BreakerConfig(failure_threshold=4, reset_timeout=7.0)  # the rest: BreakerConfig's
    assert get_breaker("unit-defaults") is b
    fail(b)
    assert [v.name for v in defaults.storage.views()] == ["unit-defaults"]


def test_get_breaker_of_an_undeclared_name_has_the_process_defaults(defaults: BreakerDefaults) -> None:
    b = get_breaker("unit-undeclared")
    assert get_breaker("unit-undeclared") is b
    assert (b.config, b.storage) == (defaults.config, defaults.storage)
    fail(b)
    fail(b)
    assert b.state == "open"  # at the default threshold of 2


def test_a_breaker_given_everything_needs_no_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = set_defaults(None)
    try:
        monkeypatch.setattr(Settings, "from_env", lambda *args: pytest.fail("the environment was read"))
        b = make(MemoryBreakerStorage())
        fail(b)
        assert b.view().failure_count == 1
    finally:
        set_defaults(previous)


def test_breakers_follow_new_process_defaults(defaults: BreakerDefaults) -> None:
    b = CircuitBreaker("unit-follow")
    fail(b)
    other = BreakerDefaults(MemoryBreakerStorage(), BreakerConfig(failure_threshold=9))
    set_defaults(other)
    assert (b.storage, b.failure_threshold) == (other.storage, 9)
    fail(b)
    assert other.storage.view("unit-follow").failure_count == 1  # declared in the new storage
    assert defaults.storage.view("unit-follow").failure_count == 1  # the old one kept its count
    set_defaults(BreakerDefaults(other.storage, BreakerConfig(failure_threshold=9)))  # equal: nothing changes
    assert process_defaults() is other


def test_configure_takes_the_database_and_thresholds_from_settings(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "ORCH_HOME": str(tmp_path),
            "ORCH_BREAKER_FAILURE_THRESHOLD": "7",
            "ORCH_BREAKER_RESET_TIMEOUT": "11",
            "ORCH_BREAKER_PROBE_LEASE": "13",
            "ORCH_BREAKER_CACHE_TTL": "0.5",
        }
    )
    previous = set_defaults(None)
    try:
        configure(settings)
        assert process_defaults() == BreakerDefaults(
            SQLBreakerStorage(settings.database_url),
            BreakerConfig(failure_threshold=7, reset_timeout=11.0, probe_lease=13.0, cache_ttl=0.5),
        )
    finally:
        set_defaults(previous)


def test_nothing_configured_reads_the_environment_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    previous = set_defaults(None)
    reads: list[Settings] = []
    from_env = Settings.from_env

    def counted(env: object = None) -> Settings:
        reads.append(from_env())
        return reads[-1]

    monkeypatch.setattr(Settings, "from_env", counted)
    monkeypatch.setenv("ORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ORCH_BREAKER_FAILURE_THRESHOLD", "6")
    try:
        b = CircuitBreaker("unit-env", storage=MemoryBreakerStorage())
        assert reads == []
        assert (b.failure_threshold, b.reset_timeout) == (6, 30.0)
        b2 = CircuitBreaker("unit-env-2", storage=MemoryBreakerStorage())
        assert b2.failure_threshold == 6
        assert process_defaults().storage == SQLBreakerStorage(f"sqlite:///{tmp_path / 'orchestrator.db'}")
        assert len(reads) == 1
    finally:
        set_defaults(previous)


def test_snapshots_are_what_the_storage_says() -> None:
    storage = MemoryBreakerStorage()
    now = datetime(2030, 1, 1, tzinfo=UTC)
    storage.declare("s", BreakerConfig(failure_threshold=1), now)
    assert storage.read("s") == BreakerSnapshot(BreakerState.CLOSED, 0, None, None)
    later = now + timedelta(seconds=5)
    assert storage.record_failure("s", now, later) == BreakerSnapshot(BreakerState.OPEN, 1, later, None)
    assert storage.record_failure("s", now, later) is None  # open: not counted
