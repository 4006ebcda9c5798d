"""BreakerContract on SQLBreakerStorage, over SQLite and PostgreSQL, and what operators do by URL."""

from __future__ import annotations

import pytest

from orchestrator import BreakerNotFound, CircuitBreaker
from orchestrator.breaker import get_view, list_views, reset
from orchestrator.breaker_storage import BreakerStorage, SQLBreakerStorage
from tests.unit.test_breaker import BreakerContract, make, trip

pytestmark = pytest.mark.integration


class TestSQLBreaker(BreakerContract):
    @pytest.fixture
    def storage(self, database_url: str) -> BreakerStorage:
        return SQLBreakerStorage(database_url)


def test_operators_read_and_reset_breakers_by_database_url(database_url: str) -> None:
    assert list_views(database_url) == []
    trip(make(SQLBreakerStorage(database_url)))
    assert [(v.name, v.state) for v in list_views(database_url)] == [("backend", "open")]
    assert reset(database_url, "backend").state == "closed"
    assert get_view(database_url, "backend").failure_count == 0
    with pytest.raises(BreakerNotFound, match="no circuit breaker 'nope'"):
        reset(database_url, "nope")
    with pytest.raises(BreakerNotFound, match="no circuit breaker 'nope'"):
        get_view(database_url, "nope")


def test_a_breaker_given_a_database_url_keeps_its_state_there(database_url: str) -> None:
    b = CircuitBreaker(
        "by-url", failure_threshold=1, reset_timeout=60, probe_lease=5, cache_ttl=0, database_url=database_url
    )
    b.failure(b.acquire())
    assert get_view(database_url, "by-url").state == "open"
