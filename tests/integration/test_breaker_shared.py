"""One breaker shared by real OS processes and by the workers: conditional UPDATEs under contention.

The state machine's own behaviour, on each storage, is tested by BreakerContract (tests/unit/test_breaker.py
and tests/integration/test_breaker_storage.py); this module tests what only real processes show."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orchestrator import CircuitBreaker, CircuitOpen, branch
from orchestrator.breaker_storage import SQLBreakerStorage
from orchestrator.cli.demo import local_http_server
from tests.conftest import Stack

pytestmark = pytest.mark.integration
fork = multiprocessing.get_context("fork")  # cheap children; engines are never shared across a fork


def breaker(url: str, **config: Any) -> CircuitBreaker:
    options = {"failure_threshold": 2, "reset_timeout": 0.5, "probe_lease": 5.0, "cache_ttl": 0.0, **config}
    return CircuitBreaker("shared", storage=SQLBreakerStorage(url), **options)


def _caller(url: str, start_at: float, backend_log: str, results: Any, asked: Any) -> None:
    b = breaker(url)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        with b:
            with open(backend_log, "a") as f:
                f.write(f"{os.getpid()}\n")
            # The probe stays in flight until every other process has asked (SQLite serializes them).
            deadline = time.monotonic() + 60
            while asked.value < 49 and time.monotonic() < deadline:
                time.sleep(0.01)
        results.put("called")
    except CircuitOpen:
        with asked.get_lock():
            asked.value += 1
        results.put("refused")


def test_fifty_processes_after_retry_at_send_exactly_one_probe(database_url: str, tmp_path: Path) -> None:
    url = database_url
    b = breaker(url)
    for _ in range(2):
        b.failure(b.acquire())
    assert b.view().state == "open"
    retry_at = b.view().retry_at
    assert retry_at is not None
    backend_log = tmp_path / "backend-calls"
    results, asked = fork.Queue(), fork.Value("i", 0)
    start_at = max(retry_at.timestamp(), time.time() + 1.0) + 0.05  # all 50 are up, and past retry_at
    procs = [
        fork.Process(target=_caller, args=(url, start_at, str(backend_log), results, asked))
        for _ in range(50)
    ]
    for p in procs:
        p.start()
    outcomes = Counter(results.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
    assert outcomes == {"called": 1, "refused": 49}
    assert len(backend_log.read_text().splitlines()) == 1
    assert b.view().state == "closed"  # the probe succeeded


def _fail_many(url: str, n: int) -> None:
    b = breaker(url, failure_threshold=10_000)
    for _ in range(n):
        b.failure(b.acquire())


def test_two_processes_recording_failures_at_once_lose_no_count(database_url: str) -> None:
    url = database_url
    breaker(url, failure_threshold=10_000).view()
    procs = [fork.Process(target=_fail_many, args=(url, 300)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert breaker(url, failure_threshold=10_000).view().failure_count == 600


def _probe_then_die(url: str) -> None:
    b = breaker(url, probe_lease=0.5)
    b.acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_probe_killed_mid_call_is_replaced_after_its_lease(database_url: str) -> None:
    url = database_url
    b = breaker(url, probe_lease=0.5)
    for _ in range(2):
        b.failure(b.acquire())
    time.sleep(0.55)
    p = fork.Process(target=_probe_then_die, args=(url,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    view = b.view()
    assert view.state == "half_open" and view.probe_started_at is not None
    with pytest.raises(CircuitOpen, match="another caller is probing"):
        b.acquire()
    time.sleep(0.55)
    token = b.acquire()
    assert token is not None
    b.success(token)
    assert b.view().state == "closed"


def test_branches_behind_an_open_breaker_are_short_circuited_and_never_call(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    shard_api = CircuitBreaker(
        "shard-api", failure_threshold=3, reset_timeout=60, database_url=orc.settings.database_url
    )
    for _ in range(3):
        shard_api.failure(shard_api.acquire())
    assert [b.state for b in orc.breakers() if b.name == "shard-api"] == ["open"]
    with local_http_server() as server:
        url = f"{server.url}/flaky"
        guarded = [branch("jobs.io.guarded_fetch", url) for _ in range(3)]
        job = orc.submit([*guarded, branch("jobs.io.sleep", 0.05)], fan_in="jobs.aggregate.summary")
        view = orc.wait(job.id, timeout=30)
        assert server.hits[url.removeprefix(server.url)] == 0  # the backend saw no call
        assert view.state == "partial"  # the fan-in still ran
        assert [b.state for b in view.branches] == ["short_circuited"] * 3 + ["succeeded"]
        assert all("circuit 'shard-api' is open until" in (b.error or "") for b in view.branches[:3])
        assert view.result["states"] == {"short_circuited": 3, "succeeded": 1}
        assert orc.reset_breaker("shard-api").state == "closed"
        # A worker may act on the state it last read for ORCH_BREAKER_CACHE_TTL: the io worker read
        # "open" moments ago, so the reset reaches it once that has passed.
        time.sleep(orc.settings.breaker_cache_ttl)
        again = orc.wait(orc.submit([branch("jobs.io.guarded_fetch", url)], "jobs.aggregate.summary").id, 30)
        assert again.state == "succeeded" and server.hits["/flaky"] == 1
