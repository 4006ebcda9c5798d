"""Branches that wait on the network; they run on the io queue's thread (or gevent) pool."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from orchestrator import io_task


@io_task
def sleep(seconds: float) -> float:
    """Stands in for a shard query: waits, then returns the seconds slept."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    time.sleep(seconds)
    return seconds


@io_task
def fetch_url(url: str, timeout: float = 10) -> dict[str, Any]:
    """A real HTTP GET; a non-2xx answer is a failed branch, because the caller asked for the body."""
    started = time.perf_counter()
    response = httpx.get(url, timeout=timeout, follow_redirects=True)
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
