"""ORCH_FETCH_ALLOWED_HOSTS: the bundled fetch and probe branches reach only allowed hosts, checked before
any connection and on every redirect hop, so a job spec cannot turn a worker into a way inside."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs import io
from orchestrator import NO_DEADLINE, CircuitBreaker, database
from orchestrator.cli.demo import LocalServer, local_http_server
from orchestrator.hosts import host_allowed
from orchestrator.policy import execute
from orchestrator.registry import catalog


@pytest.fixture(autouse=True)
def fresh_allow_list(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from the default allow-list and leaves no cached list behind."""
    monkeypatch.delenv("ORCH_FETCH_ALLOWED_HOSTS", raising=False)
    io.allowed_hosts.cache_clear()
    yield
    io.allowed_hosts.cache_clear()


def allow(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ORCH_FETCH_ALLOWED_HOSTS", value)
    io.allowed_hosts.cache_clear()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """The demo's local API: /ok answers 200, /redirect?to=URL a 302 to URL."""
    with local_http_server() as s:
        yield s


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A bare TCP listener on 127.0.0.1 that never accepts: a connection attempt would wait in its queue."""
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def was_connected(sock: socket.socket) -> bool:
    """Whether any client connected (the kernel completes a connect before accept, so none is missed)."""
    sock.setblocking(False)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def test_the_default_allows_loopback_only() -> None:
    allowed = io.allowed_hosts()
    assert allowed == (("localhost", None), ("127.0.0.1", None), ("::1", None))
    for host in ("localhost", "LOCALHOST.", "127.0.0.1", "::1", "0:0:0:0:0:0:0:1"):
        assert host_allowed(host, 8080, allowed), host
    for host in ("10.0.0.1", "169.254.169.254", "0.0.0.0", "127.1", "2130706433", "::ffff:127.0.0.1", "db"):
        assert not host_allowed(host, 80, allowed), host


def test_ports_and_wildcards_match_exactly() -> None:
    allowed = (("api.example.com", 443), ("*.example.org", None), ("10.0.0.1", None))
    assert host_allowed("api.example.com", 443, allowed)
    assert not host_allowed("api.example.com", 80, allowed)
    assert host_allowed("a.example.org", 80, allowed) and host_allowed("a.b.Example.org", 1, allowed)
    assert not host_allowed("example.org", 80, allowed)  # *.domain is the subdomains only
    assert not host_allowed("evilexample.org", 80, allowed)
    assert not host_allowed("example.org.evil.com", 80, allowed)
    assert host_allowed("10.0.0.1", 5432, allowed) and not host_allowed("10.0.0.2", 5432, allowed)
    assert host_allowed("anything", 1, (("*", None),))


def test_the_setting_is_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    allow(monkeypatch, "a.example.com")
    assert io.allowed_hosts() == (("a.example.com", None),)
    monkeypatch.setenv("ORCH_FETCH_ALLOWED_HOSTS", "b.example.com")
    assert io.allowed_hosts() == (("a.example.com", None),)  # cached until cache_clear (a new worker)


@pytest.mark.parametrize(
    ("allowed", "probe", "refused"),
    [
        ("localhost", "fetch_url", r"refused '127\.0\.0\.1'.*ORCH_FETCH_ALLOWED_HOSTS"),
        ("127.0.0.1:{other_port}", "fetch_url", "port {port}"),  # another port of an allowed host
        ("db.internal", "tcp_probe", r"refused '127\.0\.0\.1'.*ORCH_FETCH_ALLOWED_HOSTS"),
    ],
)
def test_a_host_not_on_the_list_is_refused_without_connecting(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket, allowed: str, probe: str, refused: str
) -> None:
    port = port_of(listener)
    allow(monkeypatch, allowed.format(other_port=port + 1))
    with pytest.raises(io.HostNotAllowed, match=refused.format(port=port)):
        if probe == "fetch_url":
            io.fetch_url(f"http://127.0.0.1:{port}/", timeout=2)
        else:
            io.tcp_probe("127.0.0.1", port, timeout=2)
    assert not was_connected(listener)


def test_tcp_probe_reaches_an_allowed_host(monkeypatch: pytest.MonkeyPatch, listener: socket.socket) -> None:
    allow(monkeypatch, f"127.0.0.1:{port_of(listener)}")
    assert io.tcp_probe("127.0.0.1", port_of(listener), timeout=2)["port"] == port_of(listener)
    assert was_connected(listener)


def test_an_allowed_local_host_is_fetched_with_the_default(server: LocalServer) -> None:
    out = io.fetch_url(f"http://127.0.0.1:{server.port}/ok", timeout=5)
    assert out["status"] == 200 and out["bytes"] == len(b"hello, shard\n")
    assert io.guarded_fetch(f"http://localhost:{server.port}/ok", timeout=5)["status"] == 200
    assert server.paths == ["/ok", "/ok"]


def test_a_redirect_between_allowed_hosts_is_followed(
    monkeypatch: pytest.MonkeyPatch, server: LocalServer
) -> None:
    allow(monkeypatch, f"127.0.0.1:{server.port}")
    out = io.fetch_url(f"http://127.0.0.1:{server.port}/redirect?to=/ok", timeout=5)
    assert out["url"].endswith("/ok") and out["status"] == 200
    assert server.paths == ["/redirect?to=/ok", "/ok"]


def test_a_redirect_to_a_disallowed_host_is_refused_before_connecting(
    monkeypatch: pytest.MonkeyPatch, server: LocalServer, listener: socket.socket
) -> None:
    allow(monkeypatch, "127.0.0.1")  # not "localhost", although it is the same machine
    target = f"http://localhost:{port_of(listener)}/secret"
    with pytest.raises(io.HostNotAllowed, match=r"refused 'localhost'.*ORCH_FETCH_ALLOWED_HOSTS"):
        io.fetch_url(f"http://127.0.0.1:{server.port}/redirect?to={target}", timeout=2)
    assert server.paths == [f"/redirect?to={target}"]  # the allowed first hop was fetched
    assert not was_connected(listener)


def test_a_refused_branch_fails_with_the_host_and_the_setting(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket
) -> None:
    allow(monkeypatch, "api.example.com")
    url = f"http://127.0.0.1:{port_of(listener)}/"
    outcome = execute(catalog()["jobs.io.fetch_url"], [url], {"timeout": 2}, NO_DEADLINE, 1)
    assert outcome.state == "failed" and outcome.retry_in is None
    assert outcome.error is not None
    assert outcome.error.startswith("HostNotAllowed: refused '127.0.0.1'")
    assert "ORCH_FETCH_ALLOWED_HOSTS" in outcome.error
    assert not was_connected(listener)


def test_a_refused_host_is_not_a_breaker_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, listener: socket.socket
) -> None:
    """shard-api's exclude holds HostNotAllowed: a bad spec must not open the breaker for everyone."""
    url = f"sqlite:///{tmp_path / 'breaker.db'}"
    database.upgrade(url)
    breaker = CircuitBreaker(
        "allow-list", failure_threshold=1, exclude=io.shard_api.exclude, cache_ttl=0.0, database_url=url
    )
    allow(monkeypatch, "api.example.com")
    with pytest.raises(io.HostNotAllowed), breaker:
        io.guarded_fetch(f"http://127.0.0.1:{port_of(listener)}/", timeout=2)
    assert (breaker.view().state, breaker.view().failure_count) == ("closed", 0)
    assert not was_connected(listener)
