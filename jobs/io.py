"""Branches that wait on the network; they run on the io queue's thread (or gevent) pool."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from orchestrator import NO_DEADLINE, Deadline, DeadlineExceeded, circuit_breaker, io_task


@io_task
def sleep(seconds: float, *, deadline: Deadline = NO_DEADLINE) -> float:
    """Stands in for a shard query: waits, then returns the seconds slept. Like a well-behaved query it
    gives up when the job's deadline comes first."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    left = deadline.remaining(default=seconds)
    assert left is not None
    if left < seconds:
        time.sleep(left)
        raise DeadlineExceeded(f"stopped after {left:.3f}s of {seconds:g}s at the job's deadline")
    time.sleep(seconds)
    return seconds


@io_task
def fetch_url(url: str, timeout: float = 10, *, deadline: Deadline = NO_DEADLINE) -> dict[str, Any]:
    """A real HTTP GET; a non-2xx answer is a failed branch, because the caller asked for the body."""
    started = time.perf_counter()
    budget = min(timeout, deadline.remaining(default=timeout) or 0.001)
    response = httpx.get(url, timeout=budget, follow_redirects=True)
    response.raise_for_status()
    return {
        "url": str(response.url),
        "status": response.status_code,
        "bytes": len(response.content),
        "elapsed": round(time.perf_counter() - started, 6),
    }


@io_task
def tcp_probe(host: str, port: int, timeout: float = 5) -> dict[str, Any]:
    """Health-check a TCP service: how long the connect takes (e.g. a database or broker)."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout):
        elapsed = time.perf_counter() - started
    return {"host": host, "port": port, "connect_seconds": round(elapsed, 6)}


class ClientError(ValueError):
    """A 4xx answer: the request was wrong, the backend is fine, so the breaker does not count it."""


#: Every process on every host that calls the shard API shares this breaker (its state is in SQL).
shard_api = circuit_breaker("shard-api", failure_threshold=3, reset_timeout=2.0, exclude=(ClientError,))


@io_task(breaker="shard-api")
def guarded_fetch(url: str, timeout: float = 5, *, deadline: Deadline = NO_DEADLINE) -> dict[str, Any]:
    """fetch_url behind the shared "shard-api" circuit breaker: when the API keeps failing, later branches
    are short-circuited at once instead of each waiting on a dead service."""
    started = time.perf_counter()
    response = httpx.get(url, timeout=min(timeout, deadline.remaining(default=timeout) or 0.001))
    if 400 <= response.status_code < 500:
        raise ClientError(f"{response.status_code} from {url}")
    response.raise_for_status()
    return {"status": response.status_code, "bytes": len(response.content),
            "elapsed": round(time.perf_counter() - started, 6)}  # fmt: skip
