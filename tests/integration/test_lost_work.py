"""Work whose worker died or stalled ends, on real workers: a poison branch is failed after
ORCH_MAX_DELIVERIES lost runs, a SIGKILLed worker's branches are rescued from SQL even where the broker
would hand them back only after an hour, and a paused worker that resumes records nothing twice."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import signals

from faults.services import PrivateRedis
from orchestrator import branch
from orchestrator.cli.processes import start_worker
from tests.conftest import POOL_SIZES, Stack, stack_services

pytestmark = pytest.mark.integration
STALL = "2"


@contextmanager
def _stack(home: Path, name: str, **extra: str) -> Iterator[Stack]:
    with stack_services(name, home) as env:
        env.pop("ORCH_RESULT_BACKEND", None)  # the default: results and the chord join in SQL
        s = Stack(name, {**env, **extra}, home)
        s.start()
        try:
            yield s
        finally:
            s.stop()


def _wait_for(stack: Stack, job_id: str, states: list[str], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while [b.state for b in stack.orc.get(job_id).branches] != states:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{stack.logs()}")
        time.sleep(0.05)


def test_a_branch_that_kills_its_process_fails_after_max_deliveries(tmp_path: Path) -> None:
    with _stack(tmp_path, "postgres-rabbitmq", ORCH_MAX_DELIVERIES="1") as stack:
        orc = stack.orc
        job = orc.submit(
            [branch("tests.catalog.die", 3), branch("jobs.io.sleep", 0.05)], fan_in="tests.catalog.outcomes"
        )
        view = orc.wait(job.id, timeout=90)
        assert view.state == "partial", stack.logs()
        poison, fine = view.branches
        assert (poison.state, poison.lost_runs, fine.state) == ("failed", 2, "succeeded")
        assert poison.error is not None
        assert poison.error.startswith("the branch's worker died while running it 2 times (last: ")
        assert "exitcode 3" in poison.error and "ORCH_MAX_DELIVERIES=1" in poison.error
        assert [o["state"] for o in view.result] == ["failed", "succeeded"]  # the fan-in ran, once
        # The pool kept serving: the next job's cpu branch runs in a new child.
        after = orc.wait(orc.submit([branch("tests.catalog.spin", 0.05)], fan_in="jobs.aggregate.collect").id)
        assert after.state == "succeeded", stack.logs()


def test_a_killed_io_workers_branches_are_rescued_before_redis_redelivers_them(tmp_path: Path) -> None:
    """Redis hands an unacked message back only after its visibility timeout (an hour, by default):
    the branches of a SIGKILLed worker are published again from SQL once their heartbeat is older than
    ORCH_STALL_TIMEOUT, and each outcome is recorded once."""
    with _stack(
        tmp_path, "postgres-redis", ORCH_VISIBILITY_TIMEOUT="3600", ORCH_STALL_TIMEOUT=STALL
    ) as stack:
        orc = stack.orc
        job = orc.submit(
            [branch("tests.catalog.io_pid", 4.0) for _ in range(3)] + [branch("tests.catalog.spin", 0.05)],
            fan_in="tests.catalog.outcomes",
        )
        _wait_for(stack, job.id, ["running"] * 3 + ["succeeded"], "the io branches to start")
        killed = stack.workers["io"]
        killed.kill()
        replacement = stack.restart("io")
        view = orc.wait(job.id, timeout=60)
        assert view.state == "succeeded", stack.logs()
        io = view.branches[:3]
        assert [(b.attempts, b.lost_runs) for b in io] == [(2, 1)] * 3
        assert {b.result["pid"] for b in io} == {replacement.pid}
        assert view.branch_done == view.branch_total == 4
        assert [o["state"] for o in view.result] == ["succeeded"] * 4
        assert "rescue: publishing 3 branches of 1 jobs in 1 messages again" in stack.logs() + "".join(
            w.log() for w in stack.workers.values()
        )


def test_branches_a_redis_restart_lost_are_published_again_when_the_workers_reconnect(tmp_path: Path) -> None:
    """A Redis broker restarted without persistence loses every queued message. The workers publish the
    queued branches of jobs from before the loss again as soon as they are connected again: the stall
    timeout here (10 minutes) is far longer than the test waits, so the regular sweep cannot be it."""
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    try:
        with stack_services("postgres-redis", tmp_path) as env:
            env.pop("ORCH_RESULT_BACKEND", None)  # the default: results and the chord join in SQL
            env.update(
                ORCH_BROKER_URL=f"{redis.url}/0", ORCH_VISIBILITY_TIMEOUT="3600", ORCH_STALL_TIMEOUT="600"
            )
            stack = Stack("private-redis", env, tmp_path)
            stack.start(("io", "fanin"))  # no cpu pool yet: the cpu branch's message waits in Redis
            try:
                orc = stack.orc
                job = orc.submit(
                    [branch("jobs.io.sleep", 0.05), branch("tests.catalog.spin", 0.05)],
                    fan_in="jobs.aggregate.collect",
                )
                _wait_for(stack, job.id, ["succeeded", "pending"], "the io branch to end")
                redis.restart(save=False)  # the cpu branch's message is gone
                deadline = time.monotonic() + 60  # one of the two reconnected workers takes the job
                while "the broker connection was lost with their messages" not in stack.logs():
                    assert time.monotonic() < deadline, stack.logs()
                    time.sleep(0.1)
                stack.restart("cpu")
                view = orc.wait(job.id, timeout=60)
                assert view.state == "succeeded", stack.logs()
                assert [b.lost_runs for b in view.branches] == [0, 0]
            finally:
                stack.stop()
    finally:
        redis.stop()


def test_a_duplicate_delivery_of_a_running_message_does_not_end_the_job_early(tmp_path: Path) -> None:
    """The same message published twice (same task id): the second delivery finds the branches running
    and starts nothing, and must not count the message's chord part either, or the fan-in would run
    before the branches end and fail them as "ended without recording an outcome"."""
    with _stack(tmp_path, "postgres-rabbitmq") as stack:
        orc = stack.orc
        sent: list[dict[str, Any]] = []

        def keep(sender: Any = None, **kwargs: Any) -> None:
            sent.append({k: kwargs[k] for k in ("body", "exchange", "routing_key", "headers", "properties")})

        signals.before_task_publish.connect(keep, weak=False)
        try:
            job = orc.submit(
                [branch("tests.catalog.io_pid", 1.5) for _ in range(2)], "tests.catalog.outcomes"
            )
        finally:
            signals.before_task_publish.disconnect(keep)
        (batch,) = [m for m in sent if m["headers"]["task"] == "tests.catalog.io_pid"]
        _wait_for(stack, job.id, ["running", "running"], "the branches to start")
        with orc.app.producer_or_acquire() as producer:
            producer.publish(
                batch["body"],
                exchange=batch["exchange"],
                routing_key=batch["routing_key"],
                headers=batch["headers"],
                serializer="json",
                **batch["properties"],
            )
        view = orc.wait(job.id, timeout=60)
        assert view.state == "succeeded", stack.logs()
        assert [(b.state, b.attempts) for b in view.branches] == [("succeeded", 1)] * 2
        assert [o["state"] for o in view.result] == ["succeeded"] * 2


def test_a_paused_worker_loses_its_branch_and_records_nothing_when_it_resumes(tmp_path: Path) -> None:
    with _stack(tmp_path, "postgres-rabbitmq", ORCH_STALL_TIMEOUT=STALL) as stack:
        orc = stack.orc
        job = orc.submit([branch("tests.catalog.io_pid", 4.0)], fan_in="tests.catalog.outcomes")
        _wait_for(stack, job.id, ["running"], "the branch to start")
        paused = stack.workers["io"]
        other = start_worker("io", env=stack.env, log_dir=stack.home / "logs", concurrency=POOL_SIZES["io"])
        try:
            other.wait_ready(60)
            os.kill(paused.pid, signal.SIGSTOP)
            try:
                view = orc.wait(job.id, timeout=60)
            finally:
                os.kill(paused.pid, signal.SIGCONT)
            assert view.state == "succeeded", stack.logs() + other.log()
            (rescued,) = view.branches
            assert (rescued.result["pid"], rescued.attempts, rescued.lost_runs) == (other.pid, 2, 1)
            time.sleep(5)  # the resumed run finishes its 4 s sleep and tries to record its outcome
            again = orc.get(job.id)
            assert again.branches[0].result == rescued.result and again.branch_done == 1
            assert again.result == view.result and again.finished_at == view.finished_at
        finally:
            other.stop()
