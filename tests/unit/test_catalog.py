"""The bundled catalog does real work; aggregators see outcomes in order."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest

from jobs import aggregate, cpu, io
from orchestrator import BranchOutcome, ConfigurationError
from orchestrator.registry import TaskKind, catalog, load


def test_catalog_kinds() -> None:
    kinds = {name: spec.kind for name, spec in catalog().items() if name.startswith("jobs.")}
    assert kinds["jobs.io.sleep"] is TaskKind.IO
    assert kinds["jobs.io.fetch_url"] is TaskKind.IO
    assert kinds["jobs.cpu.count_primes"] is TaskKind.CPU
    assert kinds["jobs.aggregate.summary"] is TaskKind.AGGREGATOR


def test_cpu_tasks_compute_real_answers() -> None:
    assert cpu.count_primes(200_000) == 17984
    assert cpu.count_primes(2) == 0 and cpu.count_primes(3) == 1
    assert cpu.sha256_rounds("a", 2) == hashlib.sha256(hashlib.sha256(b"a").digest()).hexdigest()
    assert cpu.compress_ratio("ab", repeat=1000)["bytes"] == 2000
    with pytest.raises(ValueError):
        cpu.sha256_rounds("a", 0)


@pytest.fixture
def http_server() -> Iterator[str]:
    from orchestrator.cli.demo import local_http_server

    with local_http_server() as server:
        yield server.url


def test_fetch_url_does_a_real_get(http_server: str) -> None:
    out = io.fetch_url(f"{http_server}/bytes/2048", timeout=5)
    assert out["status"] == 200 and out["bytes"] == 2048 and out["elapsed"] > 0
    with pytest.raises(httpx.HTTPStatusError, match="404"):
        io.fetch_url(f"{http_server}/status/404", timeout=5)


def test_tcp_probe_connects(http_server: str) -> None:
    port = int(http_server.rsplit(":", 1)[1])
    assert io.tcp_probe("127.0.0.1", port)["port"] == port


def test_aggregators() -> None:
    outs = [
        BranchOutcome(0, "jobs.io.sleep", "succeeded", 1.5, None, 1.5),
        BranchOutcome(1, "jobs.io.sleep", "failed", None, "RuntimeError: x", 0.1),
        BranchOutcome(2, "jobs.io.sleep", "succeeded", 2, None, 2.0),
    ]
    assert aggregate.collect(outs) == {"0": 1.5, "2": 2}
    assert aggregate.total(outs) == 3.5
    summary = aggregate.summary(outs)
    assert summary["states"] == {"failed": 1, "succeeded": 2}
    assert summary["slowest"] == {"index": 2, "task": "jobs.io.sleep", "seconds": 2.0}
    assert summary["errors"] == {"1": "RuntimeError: x"}
    with pytest.raises(TypeError, match="non-numeric"):
        aggregate.total([BranchOutcome(0, "t", "succeeded", "text")])


def test_loading_a_missing_catalog_module_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="cannot import catalog module 'no_such_catalog'"):
        load(["no_such_catalog"])
