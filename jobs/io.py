"""Branches that wait on the network; they run on the io queue's thread (or gevent) pool.

fetch_url, guarded_fetch and tcp_probe take their host from the job spec, so they only reach the hosts in
ORCH_FETCH_ALLOWED_HOSTS (loopback by default): a service that passes user input to `submit` must not
become a way into internal services.
"""

from __future__ import annotations

import functools
import socket
import time
from typing import Any

import httpx

from orchestrator import NO_DEADLINE, Deadline, DeadlineExceeded, Settings, circuit_breaker, io_task
from orchestrator.hosts import Hosts, host_allowed

_DEFAULT_PORTS = {"http": 80, "https": 443}


class HostNotAllowed(PermissionError):
    """A host outside ORCH_FETCH_ALLOWED_HOSTS, refused before any connection. The request was wrong, not
    the backend, so the shard-api breaker does not count it."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"refused {host!r} (port {port}): not in ORCH_FETCH_ALLOWED_HOSTS, checked before connecting"
        )
        self.host = host
        self.port = port


@functools.lru_cache(maxsize=1)
def allowed_hosts() -> Hosts:
    """ORCH_FETCH_ALLOWED_HOSTS, read once per process like every other setting (tests call cache_clear)."""
    return Settings.from_env().fetch_allowed_hosts


def check_host(host: str, port: int) -> None:
    """Raise HostNotAllowed unless the allow-list admits host:port."""
    if not host_allowed(host, port, allowed_hosts()):
        raise HostNotAllowed(host, port)


def _check_request(request: httpx.Request) -> None:
    """An httpx request hook: it runs before every request is sent, each redirect hop included."""
    url = request.url
    check_host(url.raw_host.decode("ascii"), url.port or _DEFAULT_PORTS.get(url.scheme, 80))


def _client(timeout: float, *, follow_redirects: bool) -> httpx.Client:
    """A client that refuses a disallowed host before connecting, wherever a redirect leads."""
    return httpx.Client(
        timeout=timeout, follow_redirects=follow_redirects, event_hooks={"request": [_check_request]}
    )


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
    """A real HTTP GET; a non-2xx answer is a failed branch, because the caller asked for the body. It
    follows redirects, each hop checked against ORCH_FETCH_ALLOWED_HOSTS."""
    started = time.perf_counter()
    budget = min(timeout, deadline.remaining(default=timeout) or 0.001)
    with _client(budget, follow_redirects=True) as client:
        response = client.get(url)
    response.raise_for_status()
    return {
        "url": str(response.url),
        "status": response.status_code,
        "bytes": len(response.content),
        "elapsed": round(time.perf_counter() - started, 6),
    }


@io_task
def tcp_probe(host: str, port: int, timeout: float = 5) -> dict[str, Any]:
    """Health-check a TCP service: how long the connect takes (e.g. a database or broker). The host must be
    in ORCH_FETCH_ALLOWED_HOSTS: a probe is a port scan in the wrong hands."""
    check_host(host, port)
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout):
        elapsed = time.perf_counter() - started
    return {"host": host, "port": port, "connect_seconds": round(elapsed, 6)}


class ClientError(ValueError):
    """A 4xx answer: the request was wrong, the backend is fine, so the breaker does not count it."""


#: Every process on every host that calls the shard API shares this breaker (its state is in SQL).
shard_api = circuit_breaker(
    "shard-api", failure_threshold=3, reset_timeout=2.0, exclude=(ClientError, HostNotAllowed)
)


@io_task(breaker="shard-api")
def guarded_fetch(url: str, timeout: float = 5, *, deadline: Deadline = NO_DEADLINE) -> dict[str, Any]:
    """fetch_url behind the shared "shard-api" circuit breaker: when the API keeps failing, later branches
    are short-circuited at once instead of each waiting on a dead service."""
    started = time.perf_counter()
    budget = min(timeout, deadline.remaining(default=timeout) or 0.001)
    with _client(budget, follow_redirects=False) as client:
        response = client.get(url)
    if 400 <= response.status_code < 500:
        raise ClientError(f"{response.status_code} from {url}")
    response.raise_for_status()
    return {
        "status": response.status_code,
        "bytes": len(response.content),
        "elapsed": round(time.perf_counter() - started, 6),
    }
