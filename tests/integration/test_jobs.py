"""The core slice end to end on every stack: real broker, real database, real worker processes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import pytest

from orchestrator import BranchView, branch
from orchestrator.store import NewBranch
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def _all_in_flight_together(branches: Sequence[BranchView]) -> bool:
    """Every branch started before any finished."""
    started = [b.started_at for b in branches if b.started_at is not None]
    finished = [b.finished_at for b in branches if b.finished_at is not None]
    return len(started) == len(finished) == len(branches) and max(started) < min(finished)


def test_the_readme_job_succeeds(stack: Stack) -> None:
    orc = stack.orc
    job = orc.submit(
        [branch("jobs.io.sleep", seconds=0.2) for _ in range(8)]
        + [branch("jobs.cpu.count_primes", limit=200_000)],
        fan_in="jobs.aggregate.collect",
        name="shards",
    )
    assert job.state == "running" and job.name == "shards" and len(job.branches) == 9
    view = orc.wait(job.id, timeout=30)
    assert view.state == "succeeded", stack.logs()
    assert view.result == {**{str(i): 0.2 for i in range(8)}, "8": 17984}
    assert [b.index for b in view.branches] == list(range(9))
    assert [b.queue for b in view.branches] == ["io"] * 8 + ["cpu"]
    assert all(b.state == "succeeded" and b.attempts == 1 and b.error is None for b in view.branches)
    assert all(b.duration is not None and b.duration >= 0 for b in view.branches)
    assert view.branch_done == view.branch_total == 9
    assert view.finished_at is not None and view.finished_at >= view.created_at
    # The eight io branches were in flight together: every one started before any finished.
    io = view.branches[:8]
    assert _all_in_flight_together(io)
    assert orc.get(job.id) == view
    assert orc.list(limit=1)[0].id == job.id


def test_cpu_branches_run_in_separate_processes(stack: Stack) -> None:
    orc = stack.orc
    job = orc.submit(
        [branch("tests.catalog.spin", 0.4) for _ in range(2)] + [branch("tests.catalog.io_pid")],
        fan_in="jobs.aggregate.collect",
    )
    view = orc.wait(job.id, timeout=30)
    assert view.state == "succeeded", stack.logs()
    cpu_pids = {view.result["0"]["pid"], view.result["1"]["pid"]}
    assert len(cpu_pids) == 2, "two prefork children should each take one cpu branch"
    assert view.result["2"]["pid"] not in cpu_pids
    assert stack.workers["io"].pid == view.result["2"]["pid"]  # the io pool is threads in the main process


def test_a_failing_branch_makes_the_job_partial(stack: Stack) -> None:
    orc = stack.orc
    job = orc.submit(
        [
            branch("jobs.io.sleep", 0.05),
            branch("tests.catalog.boom", message="shard 1 is down"),
            branch("tests.catalog.not_json"),
            branch("jobs.cpu.sha256_rounds", "x", rounds=10),
        ],
        fan_in="tests.catalog.outcomes",
    )
    view = orc.wait(job.id, timeout=30)
    assert view.state == "partial", stack.logs()
    states = [b.state for b in view.branches]
    assert states == ["succeeded", "failed", "failed", "succeeded"]
    assert view.branches[1].error == "RuntimeError: shard 1 is down"
    assert view.branches[2].error is not None and "not JSON-serializable" in view.branches[2].error
    # The aggregator saw every outcome, in submission order, with ok/result/error.
    assert [o["index"] for o in view.result] == [0, 1, 2, 3]
    assert [o["ok"] for o in view.result] == [True, False, False, True]
    assert view.result[1]["error"] == "RuntimeError: shard 1 is down"
    assert view.result[0]["result"] == 0.05 and view.result[0]["task"] == "jobs.io.sleep"


def test_an_aggregator_that_raises_fails_the_job(stack: Stack) -> None:
    orc = stack.orc
    job = orc.submit([branch("jobs.io.sleep", 0.01)], fan_in="tests.catalog.explode")
    view = orc.wait(job.id, timeout=30)
    assert view.state == "failed"
    assert view.error == "fan-in tests.catalog.explode raised ValueError: cannot aggregate 1 outcomes"
    assert view.result is None
    assert view.branches[0].state == "succeeded"


def test_a_deadline_times_out_a_straggler(stack: Stack) -> None:
    orc = stack.orc
    job = orc.submit(
        [branch("jobs.io.sleep", 0.05), branch("tests.catalog.stubborn_sleep", 2)],
        fan_in="jobs.aggregate.summary",
        deadline=0.8,
    )
    view = orc.wait(job.id, timeout=10)
    assert view.state == "partial", stack.logs()
    assert [b.state for b in view.branches] == ["succeeded", "timed_out"]


def test_a_pickled_message_is_refused_and_the_worker_keeps_serving(stack: Stack) -> None:
    orc = stack.orc
    # A real pending branch that the pickled message tries to run.
    job_id, _ = orc.store.create_job(
        name="bait",
        fan_in="jobs.aggregate.collect",
        branches=[NewBranch(task="jobs.io.sleep", queue="io", args=[0], kwargs={})],
    )
    app = orc.app
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, "jobs.io.sleep", args=(str(job_id), 0, [0], {}), kwargs={})
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            serializer="pickle",
            headers=message.headers,
            exchange="orchestrator",
            routing_key="io",
            declare=[app.amqp.queues["io"]],
            **message.properties,
        )
    io = stack.workers["io"]
    deadline = time.monotonic() + 15
    while "pickle" not in io.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ContentDisallowed" in io.log() or "untrusted content" in io.log(), io.log()[-3000:]
    bait = orc.get(str(job_id)).branches[0]
    assert (bait.state, bait.attempts) == ("pending", 0), "the pickled task body must never run"
    assert io.process.poll() is None
    after = orc.wait(orc.submit([branch("jobs.io.sleep", 0.01)], fan_in="jobs.aggregate.total").id, 30)
    assert (after.state, after.result) == ("succeeded", 0.01)


def test_a_wide_job_runs_its_io_branches_in_batches(stack: Stack) -> None:
    orc = stack.orc
    branches = [branch("jobs.io.sleep", 0.3) for _ in range(98)]
    branches += [branch("tests.catalog.boom"), branch("jobs.cpu.count_primes", limit=100)]
    job = orc.submit(branches, "jobs.aggregate.summary", name="wide")
    batches = [b.celery_task_id for b in job.branches]
    # io branches travel per task, 50 to a message: sleep x98 -> 2 batches, boom -> 1; the cpu branch
    # is its own message.
    assert len(set(batches[:50])) == len(set(batches[50:98])) == 1
    assert len(set(batches)) == 4
    view = orc.wait(job.id, timeout=60)
    assert view.state == "partial", stack.logs()
    assert [b.state for b in view.branches] == ["succeeded"] * 98 + ["failed", "succeeded"]
    assert view.branches[98].error == "RuntimeError: backend said no"
    assert all(b.attempts == 1 for b in view.branches)
    assert view.branch_done == view.branch_total == 100
    io = view.branches[:98]
    assert _all_in_flight_together(io)
    assert view.result["states"] == {"failed": 1, "succeeded": 99}


def test_a_wide_job_recorded_in_one_stream_runs(pg_stack: Stack) -> None:
    """Past a hundred rows PostgreSQL records a job's branches with COPY: JSON arguments, ids and states
    come back as submitted, and every branch runs once."""
    orc = pg_stack.orc
    args = [{"n": i, "tags": ["a", None, {"deep": [i]}], "text": "quote ' and tab\t"} for i in range(300)]
    job = orc.submit([branch("tests.catalog.echo", a) for a in args], "jobs.aggregate.collect")
    view = orc.wait(job.id, timeout=60)
    assert view.state == "succeeded", pg_stack.logs()
    assert [b.args for b in view.branches] == [{"args": [a], "kwargs": {}} for a in args]
    assert [b.result for b in view.branches] == args
    assert all(b.attempts == 1 for b in view.branches)
