"""The breaker's state machine, every state x event, on a real (SQLite) database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator import BreakerNotFound, CircuitBreaker, CircuitOpen, ConfigurationError, database
from orchestrator.breaker import get_view, list_views, reset


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'breaker.db'}"
    database.upgrade(u)
    return u


def make(url: str, **config: object) -> CircuitBreaker:
    options = {"failure_threshold": 3, "reset_timeout": 0.2, "probe_lease": 0.3, "cache_ttl": 0.0, **config}
    return CircuitBreaker("backend", database_url=url, **options)  # type: ignore[arg-type]


def fail(b: CircuitBreaker) -> None:
    with pytest.raises(ConnectionError), b:
        raise ConnectionError("down")


def test_closed_counts_consecutive_failures_and_a_success_resets_them(url: str) -> None:
    b = make(url)
    fail(b)
    fail(b)
    assert (b.view().state, b.view().failure_count) == ("closed", 2)
    with b:
        pass
    assert (b.view().state, b.view().failure_count) == ("closed", 0)


def test_closed_opens_at_the_threshold(url: str) -> None:
    b = make(url)
    for _ in range(3):
        fail(b)
    view = b.view()
    assert (view.state, view.failure_count) == ("open", 3)
    assert view.opened_at is not None and view.retry_at is not None
    assert 0.15 < (view.retry_at - view.opened_at).total_seconds() <= 0.25


def test_open_refuses_without_calling_until_retry_at(url: str) -> None:
    b = make(url)
    for _ in range(3):
        fail(b)
    called: list[int] = []
    with pytest.raises(CircuitOpen, match="circuit 'backend' is open until"):
        b.call(called.append, 1)
    assert called == []


def test_after_retry_at_one_probe_and_the_rest_refused(url: str) -> None:
    b, other = make(url), make(url)
    for _ in range(3):
        fail(b)
    time.sleep(0.25)
    probe = b.acquire()
    assert probe is not None and b.view().state == "half_open"
    with pytest.raises(CircuitOpen, match="half-open: another caller is probing"):
        other.acquire()
    b.success(probe)
    assert (b.view().state, b.view().failure_count, b.view().retry_at) == ("closed", 0, None)
    assert other.acquire() is None  # closed again for everyone


def test_a_failed_probe_reopens_with_a_new_retry_at(url: str) -> None:
    b = make(url)
    for _ in range(3):
        fail(b)
    first_retry = b.view().retry_at
    time.sleep(0.25)
    fail(b)  # this call was the probe
    view = b.view()
    assert view.state == "open" and view.retry_at is not None and first_retry is not None
    assert view.retry_at > first_retry
    with pytest.raises(CircuitOpen):
        b.acquire()


def test_a_probe_that_never_reports_expires_after_its_lease(url: str) -> None:
    b, other = make(url), make(url)
    for _ in range(3):
        fail(b)
    time.sleep(0.25)
    lost = b.acquire()
    assert lost is not None
    with pytest.raises(CircuitOpen):
        other.acquire()
    time.sleep(0.35)
    second = other.acquire()
    assert second is not None and second != lost
    b.success(lost)  # the lost probe reporting late changes nothing: its token was taken over
    assert b.view().state == "half_open"
    other.success(second)
    assert b.view().state == "closed"


def test_excluded_exceptions_do_not_count(url: str) -> None:
    b = make(url, exclude=(ValueError,))
    for _ in range(5):
        with pytest.raises(ValueError), b:
            raise ValueError("the caller's fault")
    assert (b.view().state, b.view().failure_count) == ("closed", 0)


def test_a_failure_recorded_after_another_process_opened_it_changes_nothing(url: str) -> None:
    b, other = make(url), make(url)
    assert b.acquire() is None  # allowed while closed
    for _ in range(3):
        fail(other)
    retry_at = other.view().retry_at
    b.failure(None)
    assert (b.view().state, b.view().failure_count, b.view().retry_at) == ("open", 3, retry_at)


def test_the_cache_refuses_an_open_breaker_without_the_database(url: str) -> None:
    b = make(url, cache_ttl=60.0, reset_timeout=60.0)
    for _ in range(3):
        fail(b)
    database.get_engine(url).dispose()
    (Path(url.removeprefix("sqlite:///"))).rename(Path(url.removeprefix("sqlite:///") + ".gone"))
    started = time.perf_counter()
    with pytest.raises(CircuitOpen):
        b.acquire()
    assert time.perf_counter() - started < 0.5  # no database was consulted (it is gone)


def test_reset_and_views(url: str) -> None:
    b = make(url)
    for _ in range(3):
        fail(b)
    assert [v.name for v in list_views(url)] == ["backend"]
    assert reset(url, "backend").state == "closed"
    assert get_view(url, "backend").failure_count == 0
    with pytest.raises(BreakerNotFound, match="no circuit breaker 'nope'"):
        reset(url, "nope")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be an integer >= 1"),
        ({"reset_timeout": 0}, "reset_timeout must be positive"),
        ({"probe_lease": -1}, "probe_lease must be positive"),
        ({"cache_ttl": -1}, "cache_ttl must be >= 0"),
    ],
)
def test_bad_configuration_is_refused(url: str, config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make(url, **config)
