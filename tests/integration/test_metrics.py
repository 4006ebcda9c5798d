"""`orchestrator metrics` serves Prometheus metrics read from SQL and the broker: scraped for real."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import CircuitBreaker, branch
from orchestrator.cli.processes import orchestrator_executable, spawn
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_are_scraped_from_sql(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    branches = [branch("jobs.io.sleep", 0.05)] * 3 + [branch("tests.catalog.boom")]
    done = orc.wait(orc.submit(branches, "jobs.aggregate.summary").id, 30)
    assert done.state == "partial"
    CircuitBreaker("metrics-demo", database_url=orc.settings.database_url).view()
    port = _free_port()
    server = spawn(
        [*orchestrator_executable(), "metrics", "--port", str(port), "--address", "127.0.0.1"],
        name="metrics",
        env=pg_stack.env,
        log_dir=pg_stack.home / "logs",
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                break
            except httpx.TransportError:
                server.check_alive()
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
        assert response.status_code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }
        jobs = {dict(k[1])["state"]: v for k, v in samples.items() if k[0] == "orchestrator_jobs"}
        assert jobs["partial"] >= 1 and jobs["running"] >= 0
        sleep_ok = ("orchestrator_branches", (("state", "succeeded"), ("task", "jobs.io.sleep")))
        assert samples[sleep_ok] >= 3
        assert samples[("orchestrator_branches", (("state", "failed"), ("task", "tests.catalog.boom")))] >= 1
        count = samples[("orchestrator_branch_duration_seconds_count", (("task", "jobs.io.sleep"),))]
        under_a_second = samples[
            ("orchestrator_branch_duration_seconds_bucket", (("le", "1.0"), ("task", "jobs.io.sleep")))
        ]
        too_fast = samples[
            ("orchestrator_branch_duration_seconds_bucket", (("le", "0.025"), ("task", "jobs.io.sleep")))
        ]
        assert count >= 3 and under_a_second == count and too_fast == 0  # they slept 50 ms each
        assert samples[("orchestrator_breaker_state", (("name", "metrics-demo"), ("state", "closed")))] == 1
        assert samples[("orchestrator_breaker_state", (("name", "metrics-demo"), ("state", "open")))] == 0
        for queue in ("io", "cpu", "fanin"):
            assert samples[("orchestrator_queue_depth", (("queue", queue),))] >= 0
    finally:
        server.stop(10)
