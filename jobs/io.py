"""Branches that wait on the network; they run on the io queue's thread (or gevent) pool."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from orchestrator import Deadline, DeadlineExceeded, io_task


@io_task
def sleep(seconds: float, *, deadline: Deadline) -> float:
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
def fetch_url(url: str, timeout: float = 10, *, deadline: Deadline) -> dict[str, Any]:
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
