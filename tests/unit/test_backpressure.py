"""Backpressure at submit on the embedded default (no workers: nothing drains): a full deployment
refuses at once without blocking, waits up to block_timeout when blocking, never writes a refused job,
and admits again once a job ends."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from orchestrator import BranchSpec, InvalidJobSpec, JobSpec, Orchestrator, Overloaded, Settings, branch
from tests.conftest import base_env, row_counts


@pytest.fixture
def orc(tmp_path: Path) -> Orchestrator:
    return Orchestrator(Settings.from_env(base_env(tmp_path, ORCH_MAX_ACTIVE_BRANCHES="5")))


def _job(n: int) -> list[BranchSpec]:
    return [branch("jobs.io.sleep", 1)] * n


def test_a_full_deployment_refuses_with_how_full_and_writes_nothing(orc: Orchestrator) -> None:
    first = orc.submit(_job(4), "jobs.aggregate.collect")
    assert orc.store.admitted() == 4
    with pytest.raises(Overloaded) as refused:
        orc.submit(_job(2), "jobs.aggregate.collect", block=False)
    error = refused.value
    assert (error.active, error.limit, error.requested, error.retry_after) == (4, 5, 2, 1.0)
    assert str(error).startswith(
        "overloaded: 4 of ORCH_MAX_ACTIVE_BRANCHES=5 branches are admitted and unfinished, and this submit "
        "needs 2 more"
    )
    assert row_counts(orc) == (1, 4)

    started = time.monotonic()
    with pytest.raises(Overloaded) as waited:
        orc.submit_many([JobSpec(_job(2), "jobs.aggregate.collect")], block_timeout=0.3)
    assert waited.value.waited >= 0.3 and time.monotonic() - started >= 0.3
    assert row_counts(orc) == (1, 4)

    with pytest.raises(InvalidJobSpec, match="6 branches can never be admitted at once"):
        orc.submit(_job(6), "jobs.aggregate.collect")

    orc.cancel(first.id)  # the job ends: its branches are given back
    assert orc.store.admitted() == 0
    orc.submit(_job(5), "jobs.aggregate.collect", block=False)
    assert orc.store.admitted() == 5


def test_a_blocked_submit_goes_through_when_room_comes(orc: Orchestrator) -> None:
    first = orc.submit(_job(5), "jobs.aggregate.collect")

    def free_soon() -> None:
        time.sleep(0.3)
        orc.cancel(first.id)

    threading.Thread(target=free_soon).start()
    started = time.monotonic()
    job = orc.submit(_job(3), "jobs.aggregate.collect", block_timeout=30)
    assert time.monotonic() - started >= 0.3
    assert orc.get(job.id).state == "running" and orc.store.admitted() == 3


def test_priorities_are_checked_at_submit(orc: Orchestrator) -> None:
    with pytest.raises(
        InvalidJobSpec, match=r"priority must be an integer from 0 to 9 \(ORCH_MAX_PRIORITY\)"
    ):
        orc.submit(_job(1), "jobs.aggregate.collect", priority=10)
    urgent = orc.submit(_job(1), "jobs.aggregate.collect", priority=9)
    assert urgent.priority == orc.get(urgent.id).priority == 9
