"""Adaptive pools: `orchestrator worker cpu --autoscale MAX,MIN` hands the pool to Celery's autoscaler,
which grows it for a burst and shrinks it when idle, as `celery inspect stats` shows."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator import branch
from orchestrator.cli.processes import WorkerProcess, start_pools, start_worker, stop_all
from tests.conftest import Stack, stack_services
from tests.integration.test_cli import Cli

pytestmark = pytest.mark.integration


def _autoscaler(stack: Stack, cpu: WorkerProcess) -> dict[str, Any]:
    """`celery inspect stats` of the cpu node alone (its default name is cpu-PID@host), so the call
    returns as soon as that node answers."""
    node = f"cpu-{cpu.pid}@{socket.gethostname()}"
    stats = stack.orc.app.control.inspect(destination=[node], timeout=5.0, limit=1).stats() or {}
    info: dict[str, Any] = stats[node]["autoscaler"]
    return info


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_burst_grows_the_cpu_pool_and_idleness_shrinks_it(tmp_path: Path) -> None:
    with stack_services("postgres-rabbitmq", tmp_path) as env:
        env["AUTOSCALE_KEEPALIVE"] = "1"  # Celery's idle time before it shrinks (30 s by default)
        stack = Stack("autoscale", env, tmp_path)
        assert stack.orc.settings.database_url
        workers = start_pools(("io", "fanin"), env=env, log_dir=tmp_path / "logs")
        cpu = start_worker("cpu", env=env, log_dir=tmp_path / "logs", autoscale="2,1")
        workers.append(cpu)
        try:
            cpu.wait_ready(60)
            assert "--autoscale=2,1" in cpu.log()  # the celery command it printed
            assert _autoscaler(stack, cpu)["current"] == 1
            job = stack.orc.submit([branch("tests.catalog.spin", 1.5)] * 4, "jobs.aggregate.collect")
            _until(lambda: _autoscaler(stack, cpu)["current"] == 2, 30, "the pool to grow to 2")
            assert stack.orc.wait(job.id, timeout=60).state == "succeeded"
            pids = {b.result["pid"] for b in stack.orc.get(job.id).branches}
            assert len(pids) == 2  # two children ran the burst
            _until(lambda: _autoscaler(stack, cpu)["current"] == 1, 30, "the idle pool to shrink to 1")
        finally:
            stop_all(workers)


def test_the_io_threads_pool_refuses_to_autoscale(tmp_path: Path) -> None:
    cli = Cli.on(tmp_path)
    refused = cli("worker", "io", "--autoscale", "8,2", code=2)
    assert "the io pool's threads cannot autoscale" in refused.stderr
    assert "ORCH_IO_POOL=gevent" in refused.stderr
    bad = Cli.on(tmp_path, ORCH_CPU_AUTOSCALE="two")
    assert "ORCH_CPU_AUTOSCALE must be MAX,MIN" in bad("worker", "cpu", code=1).stderr
