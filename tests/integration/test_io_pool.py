"""The io pool's size is how many io branches one worker runs at once, whatever the batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import Orchestrator, Settings, branch
from orchestrator.cli.processes import start_pools, stop_all
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
