"""The io pool's size is how many io branches one worker runs at once, whatever the batches."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator import Orchestrator, Settings, branch
from orchestrator.cli.processes import start_pools, stop_all
from orchestrator.threads import start_every_thread
from tests.conftest import stack_services

pytestmark = pytest.mark.integration


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    return most


def test_orch_io_concurrency_caps_the_branches_running_at_once(tmp_path: Path) -> None:
    """A user sets ORCH_IO_CONCURRENCY to protect a backend: 2 means two calls at a time, although the
    job's 8 branches travel in one batch message (and a second job's in another)."""
    with stack_services("postgres-rabbitmq", tmp_path) as env:
        env["ORCH_IO_CONCURRENCY"] = "2"
        orc = Orchestrator(Settings.from_env(env), migrate=True)
        workers = start_pools(("io", "fanin"), env=env, log_dir=tmp_path / "logs")  # -c from the setting
        try:
            jobs = [
                orc.submit(
                    [branch("tests.catalog.timed_sleep", 0.2) for _ in range(8)], "jobs.aggregate.collect"
                )
                for _ in range(2)
            ]
            views = [orc.wait(job.id, timeout=60) for job in jobs]
        finally:
            stop_all(workers)
    assert [v.state for v in views] == ["succeeded", "succeeded"]
    spans = [(b.result["started"], b.result["finished"]) for v in views for b in v.branches]
    assert _most_at_once(spans) == 2


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


def test_an_io_worker_starts_all_its_threads_before_it_is_ready(tmp_path: Path) -> None:
    """So its memory at full concurrency is taken at boot, not at the first burst that needs 20 threads:
    a worker that has run nothing yet already has them."""
    with stack_services("postgres-rabbitmq", tmp_path) as env:
        Orchestrator(Settings.from_env(env), migrate=True)
        (io,) = start_pools(("io",), env=env, log_dir=tmp_path / "logs", concurrency={"io": 20})
        try:
            assert _threads(io.pid) >= 20 + 1, io.log()[-3000:]  # the pool's 20 and the main thread
            assert "Task " not in io.log()  # no task ran to start them
        finally:
            stop_all([io])


def test_start_every_thread_starts_exactly_the_pools_size() -> None:
    executor = ThreadPoolExecutor(max_workers=6)
    before = threading.active_count()
    try:
        start_every_thread(executor, 6)
        assert threading.active_count() - before == 6
        assert executor.submit(lambda: 7).result(5) == 7  # the started threads take work
        assert threading.active_count() - before == 6  # and no seventh is started for it
    finally:
        executor.shutdown()
