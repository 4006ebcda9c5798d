"""Deadlines, quorum, fan-in time limits, cancel and retries, on real prefork and thread pools."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from orchestrator import JobAlreadyFinal, branch
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def _marks(stack: Stack) -> Path:
    return Path(stack.env["TEST_MARK_DIR"])


def _aggregations(stack: Stack) -> list[str]:
    path = _marks(stack) / "aggregations"
    return path.read_text().splitlines() if path.exists() else []


def test_stragglers_are_timed_out_at_the_deadline_and_their_results_arrive_late(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    job = orc.submit(
        [branch("jobs.io.sleep", 0.1) for _ in range(6)]
        + [branch("tests.catalog.stubborn_sleep", 2.5, token=f"s{i}") for i in range(2)],
        fan_in="jobs.aggregate.summary",
        deadline=1.0,
    )
    view = orc.wait(job.id, timeout=5)
    assert view.state == "partial", pg_stack.logs()
    assert view.deadline_at is not None and view.finished_at is not None
    assert view.finished_at - view.created_at < timedelta(seconds=2)  # the deadline, not the stragglers
    assert [b.state for b in view.branches] == ["succeeded"] * 6 + ["timed_out"] * 2
    assert all(b.error == "the job's deadline passed before the branch finished" for b in view.branches[6:])
    assert view.result["states"] == {"succeeded": 6, "timed_out": 2}
    assert view.branch_done == view.branch_total == 8

    deadline = time.monotonic() + 10
    while not all(b.late for b in orc.get(job.id).branches[6:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    later = orc.get(job.id)
    assert [b.late for b in later.branches] == [False] * 6 + [True] * 2
    assert [b.result for b in later.branches[6:]] == [
        {"slept": 2.5, "token": "s0"},
        {"slept": 2.5, "token": "s1"},
    ]
    assert [b.state for b in later.branches[6:]] == ["timed_out"] * 2  # a late result changes nothing
    assert (later.state, later.result, later.finished_at) == (view.state, view.result, view.finished_at)


def test_a_branch_honouring_its_deadline_stops_there(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    job = orc.submit(
        [branch("jobs.io.sleep", 30), branch("jobs.cpu.count_primes", limit=10)],
        fan_in="jobs.aggregate.summary",
        deadline=0.5,
    )
    view = orc.wait(job.id, timeout=5)
    assert view.state == "partial"
    assert [b.state for b in view.branches] == ["timed_out", "succeeded"]


def test_last_branch_racing_the_deadline_finalizes_every_job_once(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    rng = random.Random(7)
    before = len(_aggregations(pg_stack))
    jobs = [
        orc.submit(
            [branch("tests.catalog.stubborn_sleep", rng.uniform(0.3, 0.7)) for _ in range(2)],
            fan_in="tests.catalog.record_calls",
            deadline=0.5,
        )
        for _ in range(24)
    ]
    views = [orc.wait(j.id, timeout=15) for j in jobs]
    time.sleep(1.0)  # let every straggler report, late or not
    runs = _aggregations(pg_stack)[before:]
    # Every job's result names one recorded aggregator run, and there were as many runs as jobs.
    assert sorted(v.result["call"] for v in views) == sorted(runs)
    outcomes: Counter[str] = Counter()
    for view in views:
        assert view.state in ("succeeded", "partial"), view
        final = orc.get(view.id)
        assert final.branch_done == final.branch_total == 2
        assert (final.state, final.result) == (view.state, view.result)
        for b in final.branches:
            outcomes[b.state] += 1
            assert b.state in ("succeeded", "timed_out")
            assert not (b.state == "succeeded" and b.late), "a recorded success is never late"
    assert outcomes["succeeded"] > 0 and outcomes["timed_out"] > 0, outcomes  # both sides of the race ran


def test_a_fan_in_over_its_soft_time_limit_fails_the_job(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    job = orc.submit([branch("jobs.io.sleep", 0.01)], fan_in="tests.catalog.slow_aggregate", fan_in_timeout=1)
    view = orc.wait(job.id, timeout=15)
    assert view.state == "failed"
    assert view.error == "fan-in tests.catalog.slow_aggregate exceeded its soft time limit of 1s"
    assert view.finished_at is not None and view.finished_at - view.created_at < timedelta(seconds=10)


def test_below_min_success_fails_without_calling_the_aggregator(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    before = len(_aggregations(pg_stack))
    job = orc.submit(
        [
            branch("tests.catalog.stubborn_sleep", 0.01),
            branch("tests.catalog.boom"),
            branch("tests.catalog.boom"),
        ],
        fan_in="tests.catalog.record_calls",
        min_success=2,
    )
    view = orc.wait(job.id, timeout=15)
    assert (view.state, view.result) == ("failed", None)
    assert view.error == "only 1 of 3 branches succeeded; min_success is 2"
    assert len(_aggregations(pg_stack)) == before


def test_cancel_revokes_branches_terminates_cpu_work_and_skips_the_fan_in(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    before = len(_aggregations(pg_stack))
    job = orc.submit(
        [branch("tests.catalog.spin", 20), branch("tests.catalog.stubborn_sleep", 1.0)],
        fan_in="tests.catalog.record_calls",
    )
    deadline = time.monotonic() + 15
    while orc.get(job.id).branches[0].state != "running":
        assert time.monotonic() < deadline, pg_stack.logs()
        time.sleep(0.05)
    cancelled = orc.cancel(job.id)
    assert cancelled.state == "cancelled"
    assert [b.state for b in cancelled.branches] == ["cancelled", "cancelled"]
    spin_id = cancelled.branches[0].celery_task_id
    cpu = pg_stack.workers["cpu"]
    while f"Terminating {spin_id}" not in cpu.log():
        assert time.monotonic() < deadline, cpu.log()[-3000:]
        time.sleep(0.05)
    with pytest.raises(JobAlreadyFinal, match=f"job {job.id} is already cancelled; nothing was cancelled"):
        orc.cancel(job.id)
    time.sleep(1.5)  # the io branch finishes: its result is kept as late, the fan-in never runs
    final = orc.get(job.id)
    assert final.state == "cancelled" and final.branches[1].late
    assert len(_aggregations(pg_stack)) == before
    # The cpu pool serves new work at once: the terminated child was replaced.
    again = orc.wait(orc.submit([branch("tests.catalog.spin", 0.1)] * 2, "jobs.aggregate.collect").id, 15)
    assert again.state == "succeeded"


def test_retries_back_off_and_are_counted(pg_stack: Stack, tmp_path: Path) -> None:
    orc = pg_stack.orc
    marker = _marks(pg_stack) / uuid.uuid4().hex
    marker.mkdir()
    view = orc.wait(
        orc.submit([branch("tests.catalog.flaky", str(marker), 2)], "jobs.aggregate.collect").id, 15
    )
    assert view.state == "succeeded"
    assert (view.branches[0].attempts, view.branches[0].result) == (3, 3)


def test_retries_are_never_scheduled_past_the_deadline(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    job = orc.submit([branch("tests.catalog.always_fails")], "jobs.aggregate.collect", deadline=1.5)
    view = orc.wait(job.id, timeout=10)
    b = view.branches[0]
    assert b.state == "failed" and b.error == "ConnectionError: the backend is down"
    assert 1 <= b.attempts < 21
    assert view.deadline_at is not None and b.finished_at is not None and b.finished_at < view.deadline_at
    assert view.state == "partial"  # the fan-in ran when the last branch gave up, before the deadline


def test_a_straggler_in_a_batch_does_not_hold_back_its_siblings(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    flaky_dir = _marks(pg_stack) / uuid.uuid4().hex
    flaky_dir.mkdir()
    # 67 branches of one task: batches of 50 and 17, the straggler (index 66) in the second.
    branches = [branch("tests.catalog.stubborn_sleep", 0.05) for _ in range(66)]
    branches += [
        branch("tests.catalog.stubborn_sleep", 2.0),
        branch("tests.catalog.flaky", str(flaky_dir), 1),
    ]
    job = orc.submit(branches, "jobs.aggregate.summary", deadline=1.0)
    batches = [b.celery_task_id for b in job.branches]
    assert len(set(batches)) == 3 and batches[66] == batches[50] != batches[49]
    view = orc.wait(job.id, timeout=10)
    assert view.state == "partial", pg_stack.logs()
    assert [b.state for b in view.branches] == ["succeeded"] * 66 + ["timed_out", "succeeded"]
    assert view.deadline_at is not None
    # The straggler's batch siblings were recorded as they finished, long before the deadline.
    assert all(b.finished_at < view.deadline_at for b in view.branches[50:66])  # type: ignore[operator]
    assert view.branches[67].attempts == 2  # retried inside its batch
    deadline = time.monotonic() + 10
    while not orc.get(job.id).branches[66].late and time.monotonic() < deadline:
        time.sleep(0.1)
    assert orc.get(job.id).branches[66].result == {"slept": 2.0, "token": None}


def test_the_readme_deadline_example_ends_at_its_deadline_without_deadlocks(pg_stack: Stack) -> None:
    """Stragglers that honour their deadline finish at the very moment the watchdog times them out: both
    lock the job and its branches, in one order, so neither deadlocks (PostgreSQL would abort one and the
    job would end late). Ten of the README's example jobs at once, so the races overlap."""
    orc = pg_stack.orc
    warm_up = [
        orc.submit([branch("jobs.io.sleep", 0.1)], fan_in="jobs.aggregate.summary", deadline=0.05)
        for _ in range(4)
    ]  # the fan-in pool's children make their first connections here, not in the measured runs
    for job in warm_up:
        orc.wait(job.id, timeout=10)
    jobs = [
        orc.submit(
            [branch("jobs.io.sleep", 0.2) for _ in range(6)]
            + [branch("jobs.io.sleep", 60) for _ in range(2)],
            fan_in="jobs.aggregate.summary",
            deadline=1.5,
        )
        for _ in range(10)
    ]
    late = []
    for job in jobs:
        view = orc.wait(job.id, timeout=10)
        assert view.state == "partial"
        assert [b.state for b in view.branches] == ["succeeded"] * 6 + ["timed_out"] * 2
        assert view.deadline_at is not None and view.finished_at is not None
        late.append((view.finished_at - view.deadline_at).total_seconds())
    logs = pg_stack.logs()
    assert "DeadlockDetected" not in logs and "deadlock detected" not in logs
    assert max(late) <= 0.2, late
